"""Mixed precision: the GPU's code paths, run on the CPU under the same autocast.

On a GPU the encoders run under bf16 autocast (``precision="bf16-mixed"``); the same precision
name selects the same code path on the CPU, so these tests exercise it here and compare with
float32. The colour statistics, losses and read-outs must stay float32 under any autocast.
"""

from __future__ import annotations

import logging
import sys

import anndata as ad
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import rankbygene as rbg
from rankbygene._precision import (
    autocast_dtype,
    default_precision,
    float32_region,
    inference_autocast,
)
from rankbygene.data import PatchStatistics, patch_statistics_tensor
from rankbygene.model import _data
from rankbygene.model._training_mixin import trains_on_gpu

N_STATISTICS = PatchStatistics.n_statistics
#: Cosine distance between bf16-mixed and float32 embeddings of the same patches, at most
#: (measured: up to 0.004 for ResNet-18 at 32 px, with and without statistics).
EMBEDDING_TOLERANCE = 0.02


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1.0 - (a * b).sum(axis=1)


def _he_like(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """H&E-coloured noise with dark blobs, ``(n, 3, size, size)`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor([0.92, 0.75, 0.85]).view(1, 3, 1, 1)
    blobs = torch.rand(n, 1, size, size, generator=generator) > 0.7
    images = torch.where(blobs, torch.tensor([0.35, 0.2, 0.5]).view(1, 3, 1, 1), base)
    return (images + 0.05 * torch.randn(n, 3, size, size, generator=generator)).clamp(0, 1)


# -- the float32 islands --------------------------------------------------------------------------


def test_statistics_under_bf16_autocast_equal_float32():
    images = _he_like(6)
    reference = patch_statistics_tensor(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = patch_statistics_tensor(images)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, atol=1e-4, rtol=0)


def test_encoder_with_statistics_keeps_them_float32_under_autocast():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    encoder = PatchStatistics(
        torch.nn.Sequential(conv, torch.nn.Flatten()), (0.5,) * 3, (0.25,) * 3
    )
    normalised = (_he_like(4) - 0.5) / 0.25
    reference = encoder(normalised)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = encoder(normalised)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(
        mixed[:, -N_STATISTICS:], reference[:, -N_STATISTICS:], atol=1e-4, rtol=0
    )
    # the convolution itself did run in bf16: its features are rounded
    assert not torch.equal(mixed[:, :-N_STATISTICS], reference[:, :-N_STATISTICS])


def test_precision_names():
    assert default_precision("cpu") == "32-true"
    assert autocast_dtype("bf16-mixed") is torch.bfloat16
    assert autocast_dtype("16-mixed") is torch.float16
    assert autocast_dtype(32) is None
    assert autocast_dtype("bf16") is torch.bfloat16  # Lightning's short spelling
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("bf17")


def test_full_precision_holds_inside_a_callers_autocast():
    a = torch.ones(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with inference_autocast("cpu", "32-true"):
            assert (a @ a).dtype == torch.float32
        with float32_region("cpu"):
            assert (a @ a).dtype == torch.float32
    with inference_autocast("cpu", "bf16-mixed"):
        assert (a @ a).dtype == torch.bfloat16


# -- inference: bf16-mixed against float32 --------------------------------------------------------


@pytest.fixture(scope="module")
def statistics_model():
    """An untrained ResNet-18 with patch statistics, on one small synthetic slide."""
    import scvi

    scvi.settings.seed = 0
    adata = rbg.datasets.synthetic(n_slides=2, n_spots=40, n_genes=12, seed=2)
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    model = rbg.RankByGene(
        adata, image_encoder="resnet18", input_size=32, n_latent=8, patch_statistics=True
    )
    return model, adata


@pytest.mark.parametrize("kind", ["embedding", "backbone"])
def test_image_representation_in_bf16_agrees_with_float32(statistics_model, kind):
    model, _ = statistics_model
    full = model.get_image_representation(kind=kind, precision="32-true", num_workers=0)
    mixed = model.get_image_representation(kind=kind, precision="bf16-mixed", num_workers=0)
    assert mixed.dtype == np.float32
    assert not np.array_equal(mixed, full)  # bf16 did run
    if kind == "backbone":  # the statistics are the same numbers
        np.testing.assert_allclose(mixed[:, -N_STATISTICS:], full[:, -N_STATISTICS:], atol=1e-4)
        assert _cosine_distance(mixed[:, :-N_STATISTICS], full[:, :-N_STATISTICS]).max() < (
            EMBEDDING_TOLERANCE
        )
    else:
        assert _cosine_distance(mixed, full).max() < EMBEDDING_TOLERANCE
    # the default on the CPU is float32
    np.testing.assert_array_equal(model.get_image_representation(kind=kind, num_workers=0), full)


def test_unknown_precision_fails_before_work(statistics_model):
    model, _ = statistics_model
    with pytest.raises(ValueError, match="precision"):
        model.get_image_representation(precision="fp8")


def test_prediction_in_bf16_agrees_with_float32(statistics_model):
    model, adata = statistics_model
    query = adata[adata.obs["library_id"] == "slide_1"].copy()
    reference = adata[adata.obs["library_id"] == "slide_0"].copy()
    rbg.RankByGene.setup_anndata(reference, layer="counts", library_key="library_id")
    layers = {}
    for precision in ("32-true", "bf16-mixed"):
        model.predict_expression(
            query, reference=reference, alpha=10.0, precision=precision, num_workers=0
        )
        layers[precision] = query.layers["rankbygene_predicted"].copy()
    full, mixed = layers["32-true"], layers["bf16-mixed"]
    assert mixed.dtype == np.float32
    # ridge fits in float64 on either: the predictions differ by the embeddings' rounding only
    assert np.abs(mixed - full).max() < 0.05 * np.abs(full).max()
    per_gene = [np.corrcoef(mixed[:, g], full[:, g])[0, 1] for g in range(full.shape[1])]
    assert np.nanmin(per_gene) > 0.95


def test_mlp_readout_stays_float32_under_autocast():
    from rankbygene.model._readout import MlpPredictor

    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 5)).astype(np.float32)
    expression = features @ rng.normal(size=(5, 3)).astype(np.float32)
    reference = MlpPredictor(max_epochs=5).fit(features, expression).predict(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = MlpPredictor(max_epochs=5).fit(features, expression).predict(features)
    np.testing.assert_allclose(mixed, reference, atol=1e-6)


def test_feature_extractor_under_a_callers_autocast(statistics_model):
    model, _ = statistics_model
    extractor = rbg.model.FeatureExtractor(model, kind="backbone")
    tiles = (np.asarray(_he_like(4, size=40, seed=5)) * 255).astype(np.uint8)
    batch = torch.as_tensor(tiles).permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3) uint8
    full = extractor(batch).numpy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = extractor(batch).numpy()
    assert mixed.dtype == np.float32
    np.testing.assert_allclose(mixed[:, -N_STATISTICS:], full[:, -N_STATISTICS:], atol=1e-4)
    assert _cosine_distance(mixed[:, :-N_STATISTICS], full[:, :-N_STATISTICS]).max() < (
        EMBEDDING_TOLERANCE
    )


def test_embed_slides_in_bf16_agrees_with_float32(statistics_model, tmp_path):
    model, _ = statistics_model
    cohort = rbg.datasets.synthetic_cohort(tmp_path / "slides", n_slides=4, n_spots=60, seed=0)
    embeddings = {}
    for precision in ("32-true", "bf16-mixed"):
        done = rbg.tl.embed_slides(
            model,
            cohort["path"].iloc[:1],
            tmp_path / precision,
            precision=precision,
            num_workers=0,
            progress=False,
        )
        embeddings[precision] = ad.read_h5ad(done["output"].iloc[0]).obsm["X_rankbygene"]
    full, mixed = embeddings["32-true"], embeddings["bf16-mixed"]
    assert full.shape == mixed.shape
    assert len(full) > 0
    assert _cosine_distance(mixed, full).max() < EMBEDDING_TOLERANCE


# -- training under bf16-mixed --------------------------------------------------------------------


class _Record(Callback):
    """What Lightning trained with: its precision, and the dtype of the student's convolutions."""

    def __init__(self) -> None:
        self.precision = None
        self.feature_dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.precision = trainer.precision
        convolutions = pl_module.module.student_backbone.modules()
        first = next(m for m in convolutions if isinstance(m, torch.nn.Conv2d))
        first.register_forward_hook(lambda module, args, out: self.feature_dtypes.add(out.dtype))


@pytest.mark.parametrize(
    ("freeze_backbone", "patch_statistics", "augmentation"),
    [(False, False, "loader"), (False, True, "device"), (True, True, None)],
    ids=["finetune", "finetune+statistics, views on the device", "frozen+statistics"],
)
def test_training_in_bf16_follows_float32(freeze_backbone, patch_statistics, augmentation):
    """A GPU's training path (bf16-mixed; views made on the device) on the CPU."""
    import scvi

    adata = rbg.datasets.synthetic(n_slides=1, n_spots=64, n_genes=12, seed=3)
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    losses, records = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        scvi.settings.seed = 0
        model = rbg.RankByGene(
            adata,
            image_encoder="resnet18",
            input_size=32,
            n_latent=8,
            freeze_backbone=freeze_backbone,
            patch_statistics=patch_statistics,
        )
        records[precision] = _Record()
        model.train(
            max_epochs=1,
            batch_size=16,
            n_views=2,
            precision=precision,
            augmentation=augmentation,
            enable_progress_bar=False,
            callbacks=[records[precision]],
        )
        losses[precision] = model.history["train_loss"]["train_loss"].to_numpy(dtype=float)
        embedding = model.get_image_representation(num_workers=0)
        assert np.isfinite(embedding).all()
    assert records["bf16-mixed"].precision == "bf16-mixed"
    assert records["32-true"].precision == "32-true"
    if not freeze_backbone:  # the backbone trained in bf16 (frozen: features computed once)
        assert records["bf16-mixed"].feature_dtypes == {torch.bfloat16}
        assert records["32-true"].feature_dtypes == {torch.float32}
    assert np.isfinite(losses["bf16-mixed"]).all()
    # the same data, seed and initial weights: the first epoch's loss nearly the same
    np.testing.assert_allclose(losses["bf16-mixed"][0], losses["32-true"][0], rtol=0.05)


def test_training_logs_its_device_precision_and_workers(caplog):
    adata = rbg.datasets.synthetic(n_slides=1, n_spots=40, n_genes=12, seed=3)
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=8)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    line = "Training on the CPU: 32-true precision, 0 DataLoader workers, views augmented in"
    assert f"{line} the DataLoader" in caplog.text
    with pytest.raises(ValueError, match="precision must be one of"):
        model.train(max_epochs=1, batch_size=16, precision="8-mixed")
    with pytest.raises(ValueError, match="augmentation must be"):
        model.train(max_epochs=1, batch_size=16, augmentation="gpu")


# -- the machine's defaults -----------------------------------------------------------------------


def test_training_loader_settings_follow_the_machine(monkeypatch):
    monkeypatch.setattr(_data, "available_cpus", lambda: 16)
    monkeypatch.setattr(sys, "platform", "linux")
    gpu = _data.training_loader_settings(None, on_gpu=True)
    assert gpu == {"num_workers": 15, "pin_memory": True, "multiprocessing_context": "fork"}
    monkeypatch.setattr(_data, "available_cpus", lambda: 64)
    assert _data.training_loader_settings(None, on_gpu=True)["num_workers"] == 16
    monkeypatch.setattr(_data, "available_cpus", lambda: 1)
    assert _data.training_loader_settings(None, on_gpu=True)["num_workers"] == 0
    # the CPU, precomputed features, no fork: no worker processes
    cpu = _data.training_loader_settings(None, on_gpu=False)
    assert cpu == {"num_workers": 0, "pin_memory": False, "multiprocessing_context": None}
    assert _data.training_loader_settings(None, True, reads_images=False)["num_workers"] == 0
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _data.training_loader_settings(None, on_gpu=True)["num_workers"] == 0
    # what the caller asks for is kept
    assert _data.training_loader_settings(3, on_gpu=False)["num_workers"] == 3
    with pytest.raises(ValueError, match="num_workers"):
        _data.training_loader_settings(-1, on_gpu=True)


def test_gpu_is_chosen_by_lightnings_accelerator_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for accelerator in ("auto", "gpu", "cuda"):
        assert trains_on_gpu(accelerator)
    assert not trains_on_gpu("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not trains_on_gpu("auto")


def test_batches_move_to_channels_last_on_a_gpu(monkeypatch):
    module = _data.SpotDataModule(n_obs=8, expression=np.zeros((8, 5)), batch_size=2)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda tensor: True))
    batch = {"image": torch.zeros(2, 3, 8, 8), "expression": torch.zeros(2, 5)}
    moved = module.on_after_batch_transfer(batch, 0)
    assert moved["image"].is_contiguous(memory_format=torch.channels_last)
    assert not batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert moved["expression"] is batch["expression"]
    monkeypatch.undo()  # on the CPU, batches stay as they are
    assert module.on_after_batch_transfer(batch, 0)["image"] is batch["image"]
