"""Verified model folders: checksums written at save and checked at load, finite weights."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import traceback

import numpy as np
import pytest
import scvi
import torch

import rankbygene as rbg
from rankbygene.model._checkpoint import check_finite_state


@pytest.fixture(scope="module")
def small():
    adata = rbg.datasets.synthetic(n_slides=1, n_spots=40, n_genes=20, seed=3)
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    return adata


def _model(adata):
    return rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=8)


def _flip(path, position=None):
    data = bytearray(path.read_bytes())
    position = len(data) // 2 if position is None else position
    data[position] ^= 0x01  # the lowest bit: a float stays finite, only a checksum can tell
    path.write_bytes(bytes(data))


def test_save_records_the_sha256_of_each_file(small, tmp_path):
    _model(small).save(tmp_path / "model", save_anndata=True)
    record = json.loads((tmp_path / "model" / "checksums.json").read_text())
    assert sorted(record["files"]) == ["adata.h5ad", "model.pt"]
    for name, entry in record["files"].items():
        data = (tmp_path / "model" / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    rbg.RankByGene.load(tmp_path / "model", adata=small)  # verified, loads


@pytest.mark.parametrize("name", ["model.pt", "adata.h5ad"])
def test_flipped_byte_is_refused_naming_the_file(small, tmp_path, name):
    _model(small).save(tmp_path / "model", save_anndata=True)
    _flip(tmp_path / "model" / name)
    with pytest.raises(ValueError, match=rf"model/{re.escape(name)} does not match its"):
        rbg.RankByGene.load(tmp_path / "model", adata=small)


def test_truncated_or_missing_file_is_refused(small, tmp_path):
    _model(small).save(tmp_path / "model", save_anndata=True)
    weights = tmp_path / "model" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model\.pt does not match its checksum .* bytes"):
        rbg.RankByGene.load(tmp_path / "model")
    (tmp_path / "model" / "adata.h5ad").unlink()
    with pytest.raises(FileNotFoundError, match=r"adata\.h5ad is listed in .* but missing"):
        rbg.RankByGene.load(tmp_path / "model")


def test_damaged_checksum_file_is_refused(small, tmp_path):
    _model(small).save(tmp_path / "model")
    (tmp_path / "model" / "checksums.json").write_text('{"files": ')
    with pytest.raises(ValueError, match=r"checksum file .*checksums\.json is damaged"):
        rbg.RankByGene.load(tmp_path / "model")


def test_folder_without_checksums_loads_with_a_warning(small, tmp_path):
    model = _model(small)
    model.save(tmp_path / "model", prefix="run1_")
    assert (tmp_path / "model" / "run1_checksums.json").is_file()
    (tmp_path / "model" / "run1_checksums.json").unlink()  # as saved by an older version
    with pytest.warns(UserWarning, match=r"model/run1_model\.pt cannot be verified"):
        loaded = rbg.RankByGene.load(tmp_path / "model", adata=small, prefix="run1_")
    before = model.module.state_dict()
    for key, value in loaded.module.state_dict().items():
        np.testing.assert_array_equal(value.cpu().numpy(), before[key].cpu().numpy())


def test_damaged_weights_without_checksums_load_only_with_the_warning(small, tmp_path):
    model = _model(small)
    model.save(tmp_path / "model")
    (tmp_path / "model" / "checksums.json").unlink()
    _flip(tmp_path / "model" / "model.pt", position=-100)  # inside the last tensor's data
    with pytest.warns(UserWarning, match=r"model\.pt cannot be verified.*damaged file"):
        rbg.RankByGene.load(tmp_path / "model", adata=small)


def test_edited_checkpoint_names_the_file_and_the_tensor(small, tmp_path):
    model = _model(small)
    model.save(tmp_path / "model")
    path = tmp_path / "model" / "model.pt"
    saved = torch.load(path, weights_only=False)
    state = saved["model_state_dict"]
    name = "gene_head.projection.weight"
    state[name] = state[name][:, :-1].clone()
    torch.save(saved, path)
    (tmp_path / "model" / "checksums.json").unlink()
    with (
        pytest.warns(UserWarning, match="cannot be verified"),
        pytest.raises(ValueError, match=rf"{re.escape(str(path))} .*tensor '{name}' has shape"),
    ):
        rbg.RankByGene.load(tmp_path / "model", adata=small)


@pytest.mark.parametrize("with_checksums", [True, False])
def test_non_finite_weights_are_refused_naming_the_tensor(small, tmp_path, with_checksums):
    model = _model(small)
    state = model.module.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 3)
    with torch.no_grad():
        state[name].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    model.save(tmp_path / "model")
    if not with_checksums:
        (tmp_path / "model" / "checksums.json").unlink()
    with pytest.raises(ValueError, match=rf"tensor '{name}' has 3 of"):
        rbg.RankByGene.load(tmp_path / "model", adata=small)


def test_check_finite_state_skips_integer_tensors():
    state = {"count": torch.tensor([3]), "w": torch.ones(4), "b": torch.zeros(2)}
    check_finite_state(state, "here")
    state["w"][1] = float("nan")
    state["b"][0] = float("inf")
    with pytest.raises(ValueError, match=r"in here .* tensor 'w' has 1 of 4 \(1 more tensors"):
        check_finite_state(state, "here")


# -- overwriting a saved model: only its own files, never without a model ---------------------
def _heads(adata, seed):
    """A model of heads on precomputed features: small files, so that saves are quick."""
    scvi.settings.seed = seed
    return rbg.RankByGene(adata, n_latent=8)


@pytest.fixture(scope="module")
def features():
    adata = rbg.datasets.synthetic(n_slides=1, n_spots=40, n_genes=20, seed=3)
    adata.obsm["X_f"] = np.random.default_rng(0).normal(size=(adata.n_obs, 16)).astype("float32")
    rbg.RankByGene.setup_anndata(
        adata, layer="counts", library_key="library_id", features_key="X_f"
    )
    return adata


def _weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}


def _same_weights(loaded, weights):
    state = loaded.module.state_dict()
    return all(torch.equal(state[k].cpu(), v) for k, v in weights.items())


def _write_foreign_files(folder):
    """What a user keeps beside a saved model."""
    files = {
        "notes.txt": b"trained on slides 1-3\n",
        "README.md": b"# my model\n",
        "figures/a.png": b"\x89PNG not really",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_replaces_only_the_models_files(features, tmp_path):
    folder = tmp_path / "res"
    _heads(features, 0).save(folder)
    foreign = _write_foreign_files(folder)
    own = features.copy()
    own.write_h5ad(folder / "adata.h5ad")  # the user's AnnData, not part of the save
    foreign["adata.h5ad"] = (folder / "adata.h5ad").read_bytes()
    second = _heads(features, 1)
    second.save(folder, overwrite=True)
    for name, data in foreign.items():
        assert (folder / name).read_bytes() == data, name
    assert _tree(folder) == sorted([*foreign, "figures", "model.pt", "checksums.json"])
    assert _same_weights(rbg.RankByGene.load(folder, adata=features), _weights(second))


def test_overwrite_removes_the_adata_it_saved_before_only(features, tmp_path):
    folder = tmp_path / "res"
    _heads(features, 0).save(folder, save_anndata=True)
    _heads(features, 1).save(folder, overwrite=True)  # without AnnData: the saved one goes
    assert _tree(folder) == ["checksums.json", "model.pt"]
    _heads(features, 0).save(folder, overwrite=True, save_anndata=True)
    (folder / "adata.h5ad").write_bytes(b"replaced by the user")
    _heads(features, 1).save(folder, overwrite=True)  # no longer the package's: kept
    assert (folder / "adata.h5ad").read_bytes() == b"replaced by the user"
    rbg.RankByGene.load(folder, adata=features)


def test_save_cleans_what_interrupted_saves_left(features, tmp_path):
    folder = tmp_path / "res"
    _heads(features, 0).save(folder)
    staging = folder / ".rankbygene-save-k2x9qab_"
    staging.mkdir()
    (staging / "model.pt").write_bytes(b"half")
    (folder / ".checksums.json.tmp").write_text("{")
    keep = [folder / ".rankbygene-save-mine", folder / ".hidden.txt"]  # not the package's names
    keep[0].mkdir()
    keep[1].write_text("mine")
    # an earlier version moved the old folder aside and the new one in from beside it
    old = tmp_path / ".res.old-abcd1234"
    partial = tmp_path / ".res.partial-abcd1234"
    for leftover in (old, partial):
        leftover.mkdir()
        (leftover / "model.pt").write_bytes((folder / "model.pt").read_bytes())
    _heads(features, 1).save(folder, overwrite=True)
    assert not staging.exists()
    assert not (folder / ".checksums.json.tmp").exists()
    assert all(path.exists() for path in keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]
    rbg.RankByGene.load(folder, adata=features)


def test_missing_model_names_the_folder_an_earlier_version_left(features, tmp_path):
    old = tmp_path / ".res.old-abcd1234"
    _heads(features, 0).save(old)
    with pytest.raises(FileNotFoundError, match=r"left the previous model in .*\.res\.old-abcd"):
        rbg.RankByGene.load(tmp_path / "res")


# Everything a save does to the file system goes through these; shutil.rmtree and tempfile
# use the os functions, so that each of their calls is a step too.
_STEPS = [
    (os, "replace"),
    (os, "rename"),
    (os, "unlink"),
    (os, "remove"),
    (os, "rmdir"),
    (os, "mkdir"),
    (os, "fsync"),
    (torch, "save"),
]


def _save_killed_at(model, folder, step, **kwargs):
    """Save in a forked child that SIGKILLs itself before its ``step``-th file-system call.

    Returns whether it was killed (``False``: the save finished in fewer steps).
    """
    pid = os.fork()
    if pid == 0:  # the child: nothing of pytest runs here, it ends by _exit or the kill
        try:
            calls = 0

            def counted(real):
                def call(*args, **kw):
                    nonlocal calls
                    calls += 1
                    if calls == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kw)

                return call

            for module, name in _STEPS:
                setattr(module, name, counted(getattr(module, name)))
            model.save(folder, overwrite=True, **kwargs)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the save failed in the child"
    return False


@pytest.mark.slow
@pytest.mark.parametrize(("old_adata", "new_adata"), [(False, False), (True, False), (False, True)])
def test_sigkill_at_every_step_of_an_overwrite_leaves_a_model(
    features, tmp_path, old_adata, new_adata
):
    old, new, after = _heads(features, 0), _heads(features, 1), _heads(features, 2)
    template = tmp_path / "template"
    old.save(template, save_anndata=old_adata)
    foreign = _write_foreign_files(template)
    if not (old_adata or new_adata):
        features.write_h5ad(template / "adata.h5ad")  # the user's own, beside the model
        foreign["adata.h5ad"] = (template / "adata.h5ad").read_bytes()
    weights = {"old": _weights(old), "new": _weights(new)}
    seen = set()
    for step in itertools.count(1):
        folder = tmp_path / f"step{step}" / "res"
        shutil.copytree(template, folder)
        killed = _save_killed_at(new, folder, step, save_anndata=new_adata)
        loaded = rbg.RankByGene.load(folder, adata=features)
        which = [name for name, w in weights.items() if _same_weights(loaded, w)]
        assert which, f"killed at step {step}: the folder holds neither model"
        seen.add(which[0])
        for name, data in foreign.items():
            assert (folder / name).read_bytes() == data, f"step {step} changed {name}"
        # the next save removes what the killed one left
        after.save(folder, overwrite=True)
        expected = {*foreign, "figures", "model.pt", "checksums.json"}
        assert set(_tree(folder)) == expected, f"after a kill at step {step}"
        assert _same_weights(rbg.RankByGene.load(folder, adata=features), _weights(after))
        assert sorted(p.name for p in folder.parent.iterdir()) == ["res"]
        if not killed:
            break
    assert step > 10
    assert seen == {"old", "new"}
