"""RankByGene: setup, construction, training, representations, save/load and bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import numpy as np
import pytest
import scvi
import torch
from conftest import HER2ST, requires_her2st
from torch import nn

import rankbygene as rbg


@pytest.fixture(scope="module")
def small():
    """Two small synthetic slides, set up; tests copy it before changing it."""
    adata = rbg.datasets.synthetic(n_slides=2, n_spots=60, n_genes=30, seed=0)
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    return adata


def _tiny_model(adata, **kwargs):
    options = {"image_encoder": "resnet18", "input_size": 32, "n_latent": 16, **kwargs}
    return rbg.RankByGene(adata, **options)


def _fresh(adata):
    """A copy without scvi-tools' registration, as a user's AnnData before setup."""
    out = adata.copy()
    for key in [k for k in out.uns if k.startswith("_scvi")]:
        del out.uns[key]
    return out


# -- setup ------------------------------------------------------------------------------------
def test_setup_registers_fields(small, capsys):
    model = _tiny_model(small)
    manager = model.adata_manager
    assert manager.get_from_registry("X").shape == (small.n_obs, small.n_vars)
    np.testing.assert_array_equal(manager.get_from_registry("spatial"), small.obsm["spatial"])
    assert model.library_key == "library_id"
    model.view_anndata_setup()
    shown = capsys.readouterr().out
    assert "adata.layers['counts']" in shown
    assert "adata.obsm['spatial']" in shown
    print(model)  # scvi-tools models print their summary
    assert "RankByGene: image encoder resnet18" in capsys.readouterr().out


def _no_spatial(a):
    del a.obsm["spatial"]


def _nan_counts(a):
    a.layers["counts"] = a.layers["counts"].toarray()
    a.layers["counts"][3, 2] = np.nan


def _negative_counts(a):
    a.layers["counts"] = a.layers["counts"].toarray()
    a.layers["counts"][0, 0] = -1


def _constant_gene(a):
    a.layers["counts"] = a.layers["counts"].toarray()
    a.layers["counts"][:, 4] = 2.0


def _unknown_library(a):
    a.obs["library_id"] = a.obs["library_id"].cat.rename_categories({"slide_1": "slide_9"})


def _no_image(a):
    a.uns["spatial"]["slide_0"]["images"] = {}


def _no_diameter(a):
    del a.uns["spatial"]["slide_1"]["scalefactors"]["spot_diameter_fullres"]


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "match"),
    [
        (_no_spatial, {}, KeyError, r"obsm\['spatial'\]"),
        (_nan_counts, {}, ValueError, r"layers\['counts'\] has 1 NaN"),
        (_negative_counts, {}, ValueError, "1 negative values"),
        (_constant_gene, {}, ValueError, r"1 genes have zero variance.*TUMOR_5|zero variance"),
        (_unknown_library, {}, KeyError, "slide_9"),
        (_no_image, {}, KeyError, "slide_0"),
        (_no_diameter, {}, KeyError, "spot_diameter_fullres"),
        (None, {"layer": "raw"}, KeyError, "'raw' not in adata.layers"),
        (None, {"library_key": "batch"}, KeyError, "batch"),
        (None, {"features_key": "X_uni"}, KeyError, "X_uni"),
    ],
)
def test_setup_rejects_bad_input_and_leaves_adata_alone(small, change, kwargs, error, match):
    adata = _fresh(small)
    if change is not None:
        change(adata)
    before = (set(adata.uns), set(adata.obsm), set(adata.obs.columns), set(adata.layers))
    options = {"layer": "counts", "library_key": "library_id", **kwargs}
    with pytest.raises(error, match=match):
        rbg.RankByGene.setup_anndata(adata, **options)
    assert (set(adata.uns), set(adata.obsm), set(adata.obs.columns), set(adata.layers)) == before


def test_setup_rejects_one_gene_and_repeated_gene_names(small):
    one_gene = _fresh(small)[:, :1].copy()
    with pytest.raises(ValueError, match="1 genes: too few"):
        rbg.RankByGene.setup_anndata(one_gene, layer="counts", library_key="library_id")
    repeated = _fresh(small)
    repeated.var_names = [repeated.var_names[0], *repeated.var_names[:-1]]
    with pytest.raises(ValueError, match="var_names repeat"):
        rbg.RankByGene.setup_anndata(repeated, layer="counts", library_key="library_id")
    assert not any(key.startswith("_scvi") for key in repeated.uns)


def test_setup_rejects_log_normalized_counts_unless_told(small):
    adata = _fresh(small)
    rbg.pp.normalize(adata, layer="counts")  # log1p of counts normalised to 1e4 per spot
    with pytest.raises(ValueError, match=r"layers\['lognorm'\] looks log-normalised.*below 20"):
        rbg.RankByGene.setup_anndata(adata, layer="lognorm", library_key="library_id")
    assert not any(key.startswith("_scvi") for key in adata.uns)
    rbg.RankByGene.setup_anndata(
        adata, layer="lognorm", library_key="library_id", is_log_normalized=True
    )
    # counts that are integers but small, or large and not integers, are counts
    adata = _fresh(small)
    adata.layers["counts"] = adata.layers["counts"].toarray() * 1.5
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")


def test_setup_rejects_nan_features(small):
    adata = _fresh(small)
    features = np.ones((adata.n_obs, 8), dtype=np.float32)
    features[5, 1] = np.nan
    adata.obsm["X_uni"] = features
    with pytest.raises(ValueError, match=r"obsm\['X_uni'\] has 1 NaN"):
        rbg.RankByGene.setup_anndata(
            adata, layer="counts", library_key="library_id", features_key="X_uni"
        )


def test_model_needs_setup(small):
    with pytest.raises(ValueError, match="setup_anndata"):
        rbg.RankByGene(_fresh(small))


# -- encoders ---------------------------------------------------------------------------------
def test_unknown_encoder_named(small):
    with pytest.raises(ValueError, match="timm does not know the image encoder 'resnet_18x'"):
        rbg.RankByGene(small, image_encoder="resnet_18x")


def test_input_size_the_encoder_cannot_take(small):
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))  # only 64 x 64 inputs
    with pytest.raises(ValueError, match="cannot take 32 x 32 inputs"):
        rbg.RankByGene(small, image_encoder=fixed, input_size=32)
    with pytest.raises(ValueError, match="at least 8 pixels"):
        _tiny_model(small, input_size=4)


def test_user_module_encoder_feature_maps_are_pooled(small):
    conv = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())  # returns (B, 6, H, W)
    model = rbg.RankByGene(small, image_encoder=conv, input_size=16, n_latent=8)
    assert model.module.n_features == 6
    emb = model.get_image_representation(indices=np.arange(5), batch_size=4)
    assert emb.shape == (5, 8)
    features = model.get_image_representation(indices=np.arange(5), kind="backbone")
    assert features.shape == (5, 6)
    with pytest.raises(ValueError, match="n_features=7 but"):
        rbg.RankByGene(small, image_encoder=conv, input_size=16, n_features=7)


def test_pretrained_weights_from_a_local_checkpoint(small, tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_weights.pth"
    torch.save(source.state_dict(), path)  # with the classifier, as published weights come
    model = _tiny_model(small, pretrained=path)
    teacher = model.module.teacher_backbone.state_dict()
    assert "fc.weight" not in teacher  # num_classes=0: the classifier was dropped
    for name in ("conv1.weight", "layer4.1.bn2.running_var"):
        torch.testing.assert_close(teacher[name], source.state_dict()[name])
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        _tiny_model(small, pretrained=tmp_path / "missing.pth")


# -- training ---------------------------------------------------------------------------------
def test_batch_size_larger_than_the_data(small):
    model = _tiny_model(small)
    with pytest.raises(ValueError, match="batch_size=500 is larger than the"):
        model.train(max_epochs=1, batch_size=500)
    assert not model.is_trained_


def test_training_shows_no_third_party_deprecation_warnings(small):
    """Lightning's own use of a deprecated PyTorch API is nothing a user can act on."""
    import warnings

    model = _tiny_model(small)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(max_epochs=1, batch_size=16)
    foreign = [w for w in caught if "_pytree" in w.filename or "LeafSpec" in str(w.message)]
    assert not foreign, [str(w.message) for w in foreign]


def test_history_has_every_term_for_train_and_validation(trained_synthetic):
    history = trained_synthetic.model.history
    epochs = trained_synthetic.epochs
    for split in ("train", "validation"):
        for term in ("loss", "contrastive", "rank", "distill", "rank_agreement"):
            key = f"{split}_{term}"
            assert key in history, key
            values = history[key][key].astype(float).to_numpy()
            assert len(values) == epochs
            assert np.isfinite(values).all()
    train_loss = history["train_loss"]["train_loss"].astype(float).to_numpy()
    assert train_loss[-1] < train_loss[0]
    agreement = history["validation_rank_agreement"]["validation_rank_agreement"].astype(float)
    assert agreement.iloc[-1] > agreement.iloc[0]


def test_training_beats_the_untrained_model_on_a_held_out_slide(trained_synthetic):
    run = trained_synthetic
    trained = run.heldout_pearson()
    # The margin is stated in conftest.LEARNING_MARGIN with the numbers it was measured from.
    assert trained > run.untrained_pearson + run.learning_margin, (
        trained,
        run.untrained_pearson,
    )


def test_cross_modal_retrieval_beats_chance(trained_synthetic):
    run = trained_synthetic
    image = run.model.get_image_representation(run.test)
    genes = run.model.get_gene_representation(run.test_setup)
    top5 = np.argsort(-(image @ genes.T), axis=1)[:, :5]
    hit = (top5 == np.arange(len(image))[:, None]).any(axis=1).mean()
    chance = 5 / len(image)
    assert hit > 3 * chance, (hit, chance)
    assert hit > run.untrained_top5 + chance


def test_teacher_follows_the_student(trained_synthetic):
    module = trained_synthetic.model.module
    student = dict(module.student_head.named_parameters())
    teacher = dict(module.teacher_head.named_parameters())
    assert not any(p.requires_grad for p in teacher.values())
    # EMA: the teacher moved from its initialisation towards, but not onto, the student
    assert all(not torch.equal(student[n], teacher[n]) for n in ("projection.weight",))
    similarity = nn.functional.cosine_similarity(
        student["projection.weight"].flatten(), teacher["projection.weight"].flatten(), dim=0
    )
    assert similarity > 0.9


def test_same_seed_same_embeddings(small):
    embeddings = []
    for _ in range(2):
        scvi.settings.seed = 3
        model = _tiny_model(small)
        model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
        embeddings.append(model.get_image_representation())
    np.testing.assert_array_equal(embeddings[0], embeddings[1])


class _InterruptAtEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def test_interrupted_training_keeps_a_usable_model(small, capsys):
    scvi.settings.seed = 0
    model = _tiny_model(small)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.warns(UserWarning, match="interrupted.*weights of epoch 0"):
        model.train(
            max_epochs=5,
            batch_size=32,
            enable_progress_bar=False,
            callbacks=[_InterruptAtEpoch(1)],
        )
    printed = capsys.readouterr()
    # scvi-tools prints this (naming NameError) for any exception, an interruption included
    assert "Exception raised during training" not in printed.out + printed.err
    assert "NameError" not in printed.out + printed.err
    runner_module = sys.modules[scvi.train.TrainRunner.__module__]
    assert "print" not in vars(runner_module)  # scvi-tools' own print is back after train()
    assert model.is_trained_
    assert len(model.history["train_loss"]) >= 1
    assert signal.getsignal(signal.SIGINT) == handler  # Ctrl+C still works in the notebook
    embedding = model.get_image_representation()
    assert embedding.shape == (small.n_obs, 16)
    assert np.isfinite(embedding).all()


def test_early_stopping_restores_the_best_epoch(small):
    scvi.settings.seed = 0
    model = _tiny_model(small)
    model.train(
        max_epochs=4,
        batch_size=32,
        train_size=0.7,
        early_stopping=True,
        early_stopping_patience=1,
        enable_progress_bar=False,
    )
    losses = model.history["validation_loss"]["validation_loss"].astype(float)
    assert len(losses) <= 4
    assert model.is_trained_


def test_precomputed_features_train_only_the_heads(small):
    adata = _fresh(small)
    rng = np.random.default_rng(0)
    # features that carry the tissue composition, as a foundation model's would
    fractions = adata.obsm["region_fractions"]
    adata.obsm["X_uni"] = np.hstack([fractions, rng.normal(size=(adata.n_obs, 12))]).astype(
        np.float32
    )
    rbg.RankByGene.setup_anndata(
        adata, layer="counts", library_key="library_id", features_key="X_uni"
    )
    scvi.settings.seed = 0
    model = rbg.RankByGene(adata, n_latent=8)
    assert model.module.uses_features
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    embedding = model.get_image_representation()
    assert embedding.shape == (adata.n_obs, 8)
    assert model.get_image_representation(kind="backbone").shape == (adata.n_obs, 16)
    without = adata.copy()
    del without.obsm["X_uni"]
    with pytest.raises(KeyError, match="X_uni"):
        model.get_image_representation(without)
    broken = adata.copy()
    broken.obsm["X_uni"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.get_image_representation(broken)


def test_frozen_backbone_trains_only_the_heads_and_round_trips(small, tmp_path):
    scvi.settings.seed = 0
    model = _tiny_model(small, freeze_backbone=True)
    backbone = {k: v.clone() for k, v in model.module.student_backbone.state_dict().items()}
    head = {k: v.clone() for k, v in model.module.student_head.state_dict().items()}
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    for name, module in (("student", "student_backbone"), ("teacher", "teacher_backbone")):
        state = getattr(model.module, module).state_dict()
        assert all(torch.equal(backbone[k], state[k]) for k in backbone), name
    moved = model.module.student_head.state_dict()
    assert any(not torch.equal(head[k], moved[k]) for k in head)
    features = model.get_image_representation(kind="backbone")
    live = features.std(axis=0) > 1e-3 * features.std(axis=0).max()
    scale = model.module.feature_scale.numpy()
    np.testing.assert_allclose(scale[live], features[:, live].std(axis=0, ddof=1), rtol=1e-3)
    assert "backbone frozen" in model._model_summary_string
    embedding = model.get_image_representation()  # from images, through the frozen backbone
    model.save(tmp_path / "frozen")
    loaded = rbg.RankByGene.load(tmp_path / "frozen", adata=small)
    np.testing.assert_allclose(loaded.get_image_representation(), embedding, atol=1e-5)


def test_feature_views_student_sees_augmented_views_teacher_the_plain_one():
    from rankbygene.data import BATCH_KEYS, SpotPatchDataset

    FEATURES, FEATURES_WEAK = BATCH_KEYS.features, BATCH_KEYS.features_weak

    features = np.arange(5 * 4 * 2, dtype=np.float32).reshape(5, 4, 2)  # 5 spots, 4 views
    train = SpotPatchDataset(indices=np.arange(5), features=features, random_views=True)
    torch.manual_seed(0)
    seen = {int(train[2][FEATURES][0]) for _ in range(40)}
    assert seen == {int(features[2, v, 0]) for v in (1, 2, 3)}  # never the plain view
    assert torch.equal(train[2][FEATURES_WEAK], torch.from_numpy(features[2, 0]))
    plain = SpotPatchDataset(indices=np.arange(5), features=features)  # validation/getters: view 0
    assert torch.equal(plain[2][FEATURES], torch.from_numpy(features[2, 0]))


def test_frozen_backbone_views_and_features_with_views(small):
    scvi.settings.seed = 0
    model = _tiny_model(small, freeze_backbone=True)
    features, valid = model._frozen_features(small, "raise", n_views=3, precision="32-true")
    assert features.shape == (small.n_obs, 3, model.module.n_features)
    assert valid.all()
    plain = model.get_image_representation(kind="backbone")
    np.testing.assert_allclose(features[:, 0], plain, atol=1e-5)
    assert not np.allclose(features[:, 1], plain, atol=1e-3)  # stain-jittered, flipped views
    with pytest.raises(ValueError, match="n_views must be >= 1"):
        model.train(max_epochs=1, n_views=0)
    # the same views as precomputed features: (n_obs, n_views, n_features) in obsm
    adata = _fresh(small)
    adata.obsm["X_views"] = features
    rbg.RankByGene.setup_anndata(
        adata, layer="counts", library_key="library_id", features_key="X_views"
    )
    heads = rbg.RankByGene(adata, n_latent=8)
    assert heads.module.n_features == model.module.n_features
    heads.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    assert heads.get_image_representation().shape == (adata.n_obs, 8)


# -- representations --------------------------------------------------------------------------
def test_image_getter_accepts_a_slide_without_expression(trained_synthetic):
    run = trained_synthetic
    image_only = run.test[:, :0].copy()  # no genes, no counts
    embedding = run.model.get_image_representation(image_only)
    np.testing.assert_allclose(embedding, run.model.get_image_representation(run.test), atol=1e-6)
    norms = np.linalg.norm(embedding, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert not image_only.obsm.keys() - run.test.obsm.keys()


def test_gene_getter_names_missing_genes(trained_synthetic):
    run = trained_synthetic
    fewer = run.test_setup[:, 3:].copy()
    with pytest.raises(ValueError, match="lacks 3 of the model's"):
        run.model.get_gene_representation(fewer)


# -- save / load ------------------------------------------------------------------------------
def test_save_load_round_trip(trained_synthetic, tmp_path):
    run = trained_synthetic
    before = run.model.get_image_representation(run.test)
    run.model.save(tmp_path / "model")
    with pytest.raises(ValueError, match="already exists"):
        run.model.save(tmp_path / "model")
    loaded = rbg.RankByGene.load(tmp_path / "model", adata=run.train)
    np.testing.assert_allclose(loaded.get_image_representation(run.test), before, atol=1e-6)
    np.testing.assert_allclose(
        loaded.get_gene_representation(), run.model.get_gene_representation(), atol=1e-6
    )
    assert loaded.is_trained_
    # without AnnData the image encoder still works on any slide
    alone = rbg.RankByGene.load(tmp_path / "model")
    np.testing.assert_allclose(alone.get_image_representation(run.test), before, atol=1e-6)


def test_interrupted_overwrite_keeps_the_saved_model(small, tmp_path, monkeypatch):
    model = _tiny_model(small)
    model.save(tmp_path / "model")
    good = (tmp_path / "model" / "model.pt").read_bytes()
    real_save = torch.save

    def killed_midway(obj, f, *args, **kwargs):  # half a file, then the interrupt
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "model", overwrite=True)
    monkeypatch.undo()
    assert (tmp_path / "model" / "model.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial folder left
    rbg.RankByGene.load(tmp_path / "model", adata=small)
    model.save(tmp_path / "model", overwrite=True)  # a finished overwrite replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_load_rejects_other_genes_and_bad_files(trained_synthetic, tmp_path):
    run = trained_synthetic
    run.model.save(tmp_path / "model")
    with pytest.raises(ValueError, match="lacks 2 of the model's"):
        rbg.RankByGene.load(tmp_path / "model", adata=run.train[:, 2:].copy())
    with pytest.raises(ValueError, match="another order"):
        rbg.RankByGene.load(tmp_path / "model", adata=run.train[:, ::-1].copy())
    with pytest.raises(FileNotFoundError, match="No saved model"):
        rbg.RankByGene.load(tmp_path / "nowhere")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        rbg.RankByGene.load(corrupt)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (tmp_path / "model" / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        rbg.RankByGene.load(truncated)


def test_load_rejects_another_models_checkpoint(small, tmp_path):
    adata = _fresh(small)
    scvi.model.SCVI.setup_anndata(adata, layer="counts")
    scvi.model.SCVI(adata, n_latent=2, n_hidden=8).save(tmp_path / "scvi")
    with pytest.raises(ValueError, match="holds a SCVI model, not a RankByGene"):
        rbg.RankByGene.load(tmp_path / "scvi")


# -- distributed and real data ----------------------------------------------------------------
DDP_SCRIPT = """
import json, os, sys
import numpy as np, scvi
import rankbygene as rbg

scvi.settings.seed = 0
adata = rbg.datasets.synthetic(n_slides=2, n_spots=60, n_genes=30, seed=0)
rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=16)
model.train(
    max_epochs=1, batch_size=16, accelerator="cpu", devices=2, strategy="ddp",
    enable_progress_bar=False,
)
if int(os.environ.get("LOCAL_RANK", 0)) == 0:
    embedding = model.get_image_representation()
    out = {
        "history": sorted(model.history),
        "finite": bool(np.isfinite(embedding).all()),
        "shape": list(embedding.shape),
    }
    with open(sys.argv[1], "w") as handle:
        json.dump(out, handle)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_one_epoch(tmp_path):
    import json

    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in output
    out = json.loads((tmp_path / "out.json").read_text())
    assert "train_contrastive" in out["history"]
    assert out["finite"]
    assert out["shape"] == [128, 16]


@pytest.mark.slow
@requires_her2st
def test_real_sections_train_end_to_end():
    import anndata as ad

    sections = [rbg.datasets.her2st(s, path=HER2ST) for s in ("C2", "C3")]
    adata = ad.concat(sections, join="inner", uns_merge="unique")
    rbg.pp.select_genes(adata, n_top=50, flavor="heg", subset=True)
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    scvi.settings.seed = 0
    model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    assert np.isfinite(model.history["train_loss"]["train_loss"].astype(float)).all()
    embedding = model.get_image_representation()
    assert embedding.shape == (adata.n_obs, 16)
    assert np.isfinite(embedding).all()
    assert model.get_gene_representation().shape == (adata.n_obs, 16)


# -- inference loader defaults ------------------------------------------------------------------


def test_inference_loader_settings_follow_the_machine(monkeypatch):
    from rankbygene.model import _data

    monkeypatch.setattr(_data, "available_cpus", lambda: 4)
    monkeypatch.setattr(sys, "platform", "linux")
    cpu = _data.inference_loader_settings(10_000, None, None, "cpu")
    assert cpu == {"batch_size": 128, "num_workers": 3, "multiprocessing_context": "fork"}
    gpu = _data.inference_loader_settings(10_000, None, None, "cuda")
    assert gpu["batch_size"] == 256
    assert gpu["num_workers"] == 3
    monkeypatch.setattr(_data, "available_cpus", lambda: 64)  # capped: 8 on CPUs, 16 beside GPUs
    assert _data.inference_loader_settings(10_000, None, None, "cpu")["num_workers"] == 8
    assert _data.inference_loader_settings(10_000, None, None, "cuda")["num_workers"] == 16
    monkeypatch.setattr(_data, "available_cpus", lambda: 4)
    # too little work, precomputed features, or no fork: no worker processes
    assert _data.inference_loader_settings(200, None, None, "cpu")["num_workers"] == 0
    features = _data.inference_loader_settings(10_000, None, None, "cpu", reads_images=False)
    assert features["num_workers"] == 0
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _data.inference_loader_settings(10_000, None, None, "cpu")["num_workers"] == 0
    # what the caller asks for is kept
    explicit = _data.inference_loader_settings(10, 7, 2, "cpu")
    assert explicit == {"batch_size": 7, "num_workers": 2, "multiprocessing_context": None}
    with pytest.raises(ValueError, match="num_workers"):
        _data.inference_loader_settings(10, 7, -1, "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        _data.inference_loader_settings(10, 0, 0, "cpu")


def test_default_workers_give_the_same_embeddings(tiny_model, monkeypatch):
    from rankbygene.model import _data

    monkeypatch.setattr(_data, "available_cpus", lambda: 2)
    used = []
    original = _data.inference_loader_settings

    def recording(*args, **kwargs):
        used.append(original(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(_data, "inference_loader_settings", recording)
    auto = tiny_model.get_image_representation(batch_size=8)  # 30 spots: 4 batches
    serial = tiny_model.get_image_representation(batch_size=8, num_workers=0)
    expected = 1 if sys.platform.startswith("linux") else 0
    assert used[0]["num_workers"] == expected
    assert used[1]["num_workers"] == 0
    np.testing.assert_allclose(auto, serial, atol=1e-6)


# -- defects: gene check without AnnData, provenance of log-normalised expression ---------------


def test_gene_check_works_for_a_model_loaded_without_anndata(small, tmp_path):
    scvi.settings.seed = 0
    _tiny_model(small).save(tmp_path / "m")
    loaded = rbg.RankByGene.load(tmp_path / "m")  # no AnnData: the panel comes from the registry
    assert loaded.adata is None
    fewer = _fresh(small)[:, 3:].copy()
    with pytest.raises(ValueError, match="lacks 3 of the model's 30 genes"):
        loaded.get_gene_representation(fewer)
    shuffled = _fresh(small)[:, ::-1].copy()
    with pytest.raises(ValueError, match="another order"):
        loaded.get_gene_representation(shuffled)


def test_provenance_scale_follows_is_log_normalized(small):
    adata = _fresh(small)
    rbg.pp.normalize(adata, layer="counts")
    rbg.RankByGene.setup_anndata(
        adata, layer="lognorm", library_key="library_id", is_log_normalized=True
    )
    model = _tiny_model(adata)
    model.predict_expression(adata)
    assert adata.uns["rankbygene"]["predicted"]["scale"].startswith("as given at setup")
    counts = _fresh(small)
    rbg.RankByGene.setup_anndata(counts, layer="counts", library_key="library_id")
    model = _tiny_model(counts)
    model.predict_expression(counts)
    assert counts.uns["rankbygene"]["predicted"]["scale"].startswith("log1p(counts / total")


def test_setup_warns_about_repeated_spot_names(small):
    adata = _fresh(small)
    adata.obs_names = ["spot"] * 10 + list(adata.obs_names[10:])
    with pytest.warns(UserWarning, match=r"obs_names repeat.*obs_names_make_unique"):
        rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")


def test_latent_representation_is_the_image_representation(tiny_model):
    adata = tiny_model.adata
    latent = tiny_model.get_latent_representation(batch_size=8, num_workers=0)
    image = tiny_model.get_image_representation(batch_size=8, num_workers=0)
    assert latent.shape == (adata.n_obs, 8)
    np.testing.assert_array_equal(latent, image)
    subset = tiny_model.get_latent_representation(adata, indices=[0, 3], num_workers=0)
    np.testing.assert_allclose(subset, image[[0, 3]], atol=1e-6)  # other batch: float noise
    assert "image representation" in type(tiny_model).get_latent_representation.__doc__


@pytest.mark.parametrize(
    ("name", "use"),
    [
        ("get_normalized_expression", "predict_expression"),
        ("differential_abundance", "X_rankbygene"),
        ("get_normalized_function_name", "predict_expression"),
    ],
)
def test_scvi_methods_that_cannot_work_are_hidden(tiny_model, name, use):
    assert not hasattr(tiny_model, name)
    assert not hasattr(rbg.RankByGene, name)
    assert name not in dir(tiny_model)
    with pytest.raises(AttributeError, match=f"RankByGene has no {name}.*{use}"):
        getattr(tiny_model, name)()
    # the scvi-tools methods that work stay
    for kept in ("get_latent_representation", "view_anndata_setup", "save", "train"):
        assert kept in dir(tiny_model)
