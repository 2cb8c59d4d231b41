"""Verified model folders: checksums written at save and checked at load, finite weights."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import numpy as np
import pytest
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


def test_folder_without_checksums_loads_with_a_warning(small, tmp_path, caplog):
    model = _model(small)
    model.save(tmp_path / "model", prefix="run1_")
    assert (tmp_path / "model" / "run1_checksums.json").is_file()
    (tmp_path / "model" / "run1_checksums.json").unlink()  # as saved by an older version
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        loaded = rbg.RankByGene.load(tmp_path / "model", adata=small, prefix="run1_")
    assert "has no checksums" in caplog.text
    before = model.module.state_dict()
    for key, value in loaded.module.state_dict().items():
        np.testing.assert_array_equal(value.cpu().numpy(), before[key].cpu().numpy())


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
