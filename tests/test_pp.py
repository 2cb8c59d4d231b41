from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from conftest import HER2ST
from scipy import sparse
from scipy.spatial import cKDTree

from rankbygene import pp
from rankbygene._layout import resolve_library_key
from rankbygene.datasets._synthetic import synthetic
from rankbygene.pp._smooth import _infer_n_neighs


@pytest.fixture(scope="module")
def base():
    return synthetic(n_slides=2, n_spots=100, n_genes=40, seed=1)


@pytest.fixture
def adata(base):
    return base.copy()


def _keys(adata):
    return {
        "shape": adata.shape,
        "obs": list(adata.obs.columns),
        "var": list(adata.var.columns),
        "uns": sorted(adata.uns),
        "obsm": sorted(adata.obsm),
        "obsp": sorted(adata.obsp),
        "varm": sorted(adata.varm),
        "layers": sorted(adata.layers),
    }


def _dense(x):
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _square_grid(n_rows=7, n_cols=7, step=(10.0, 10.0), n_libraries=1):
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    xy = np.column_stack([cols.ravel() * step[0], rows.ravel() * step[1]])
    xy = np.vstack([xy] * n_libraries)
    obs = pd.DataFrame(
        {"library_id": np.repeat([f"lib{i}" for i in range(n_libraries)], n_rows * n_cols)},
        index=[f"s{i}" for i in range(len(xy))],
    )
    return AnnData(X=np.zeros((len(xy), 3), dtype=np.float32), obs=obs, obsm={"spatial": xy})


def _expected_mean_of_spike(xy, spike, radius):
    """Mean over each spot and its neighbours (within radius) of a unit spike at ``spike``."""
    tree = cKDTree(xy)
    neighbours = tree.query_ball_point(xy, radius)  # includes the spot itself
    return np.array([(spike in nb) / len(nb) for nb in neighbours])


# --------------------------------------------------------------------------- normalize


def test_normalize_writes_only_its_layer(adata):
    before = _keys(adata)
    counts = adata.layers["counts"].copy()
    pp.normalize(adata, layer="counts")
    after = _keys(adata)
    assert after["layers"] == sorted([*before["layers"], "lognorm"])
    after["layers"] = before["layers"]
    assert after == before
    assert (adata.layers["counts"] != counts).nnz == 0
    c = counts.toarray().astype(np.float64)
    expected = np.log1p(c / c.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(_dense(adata.layers["lognorm"]), expected, rtol=1e-5, atol=1e-5)
    assert sparse.issparse(adata.layers["lognorm"])


def test_normalize_dense_x_and_key(adata):
    adata.X = adata.layers["counts"].toarray()
    pp.normalize(adata, target_sum=100, key_added="ln")
    c = adata.X.astype(np.float64)
    np.testing.assert_allclose(
        adata.layers["ln"], np.log1p(c / c.sum(axis=1, keepdims=True) * 100), rtol=1e-5
    )
    np.testing.assert_array_equal(adata.X, c)


def test_normalize_copy(adata):
    before = _keys(adata)
    out = pp.normalize(adata, layer="counts", copy=True)
    assert isinstance(out, AnnData)
    assert "lognorm" in out.layers
    assert _keys(adata) == before


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_normalize_rejects_bad_counts(adata, bad):
    x = adata.layers["counts"].toarray()
    x[3, 5] = bad
    x[7, 1] = bad
    adata.layers["counts"] = sparse.csr_matrix(x)
    before = _keys(adata)
    word = "NaN" if np.isnan(bad) else "negative"
    with pytest.raises(ValueError, match=rf"layers\['counts'\] contains 2 {word}"):
        pp.normalize(adata, layer="counts")
    assert _keys(adata) == before


def test_normalize_bad_arguments(adata):
    before = _keys(adata)
    with pytest.raises(KeyError, match="nope"):
        pp.normalize(adata, layer="nope")
    with pytest.raises(ValueError, match="overwrite"):
        pp.normalize(adata, layer="counts", key_added="counts")
    with pytest.raises(ValueError, match="target_sum"):
        pp.normalize(adata, target_sum=0)
    assert _keys(adata) == before


# --------------------------------------------------------------------------- select_genes


def _hand_adata():
    # Library sizes differ, so raw means and normalised means rank genes differently.
    counts = np.array(
        [
            [10, 0, 5, 85],
            [20, 10, 10, 160],
            [1, 2, 1, 0],
        ],
        dtype=np.float32,
    )
    return AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame(index=["a", "b", "c"]),
        var=pd.DataFrame(index=["g0", "g1", "g2", "g3"]),
    )


def test_heg_picks_highest_mean_normalised_genes():
    adata = _hand_adata()
    # Normalised means: g0 (.1+.1+.25)/3=.15, g1 (0+.05+.5)/3=.183, g2 (.05+.05+.25)/3=.117,
    # g3 (.85+.8+0)/3=.55  -> top 2: g3, g1 (raw means would pick g3, g0).
    pp.select_genes(adata, n_top=2, flavor="heg", subset=True)
    assert list(adata.var_names) == ["g1", "g3"]  # AnnData order
    adata = _hand_adata()
    adata.X = adata.X.toarray()
    pp.select_genes(adata, n_top=3)
    assert adata.var["rankbygene_panel"].tolist() == [True, True, False, True]
    assert adata.n_vars == 4


def test_select_genes_subset_in_place(adata):
    before = _keys(adata)
    pp.select_genes(adata, n_top=10, layer="counts", subset=True)
    after = _keys(adata)
    assert after["shape"] == (before["shape"][0], 10)
    assert adata.var["rankbygene_panel"].all()
    assert after["var"] == [*before["var"], "rankbygene_panel"]
    after["shape"], after["var"] = before["shape"], before["var"]
    assert after == before
    assert adata.layers["counts"].shape == (adata.n_obs, 10)


def test_select_genes_marks_by_default_as_scanpy_hvg(adata):
    before = _keys(adata)
    n_vars = adata.n_vars
    assert pp.select_genes(adata, n_top=10) is None
    assert adata.n_vars == n_vars  # marked, not subset: scanpy's highly_variable_genes default
    assert adata.var["rankbygene_panel"].dtype == bool
    assert adata.var["rankbygene_panel"].sum() == 10
    after = _keys(adata)
    assert after["var"] == [*before["var"], "rankbygene_panel"]
    after["var"] = before["var"]
    assert after == before


def test_select_genes_hvg_adds_nothing_else(adata):
    before = _keys(adata)
    pp.select_genes(adata, n_top=12, flavor="hvg", layer="counts", subset=True)
    assert adata.n_vars == 12
    after = _keys(adata)
    after["shape"] = before["shape"]
    assert after["var"] == [*before["var"], "rankbygene_panel"]
    after["var"] = before["var"]
    assert after == before  # no highly_variable / means / hvg entries


# seurat_v3 on these crashed the interpreter inside scikit-misc's loess (a segfault), so they run
# in a child process: a regression fails the test instead of killing the test run
SMALL_HVG_SCRIPT = """
import logging, sys
import numpy as np
from anndata import AnnData
from rankbygene import pp

logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
n_spots, n_genes = int(sys.argv[1]), int(sys.argv[2])
counts = np.random.default_rng(0).poisson(3, size=(n_spots, n_genes)).astype(np.float32)
adata = AnnData(counts)
pp.select_genes(adata, n_top=5, flavor="hvg", subset=True)
print("panel", adata.n_vars)
"""


@pytest.mark.parametrize(
    ("n_spots", "n_genes", "n_panel"), [(50, 2, 2), (1, 40, 5), (1, 1, 1), (30, 4, 4)]
)
def test_select_genes_hvg_small_input_falls_back_without_crashing(n_spots, n_genes, n_panel):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", SMALL_HVG_SCRIPT, str(n_spots), str(n_genes)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert f"panel {n_panel}" in done.stdout
    assert "selecting highly expressed genes (flavor='heg') instead" in done.stdout


def test_select_genes_hvg_degenerate_loess_falls_back(caplog):
    # every gene holds the same values in another order: one mean for all genes, so the loess
    # fit of variance on mean is singular (scikit-misc: b'svddc failed in l2fit.')
    rng = np.random.default_rng(0)
    values = (np.arange(60) % 7).astype(np.float32)
    adata = AnnData(np.stack([rng.permutation(values) for _ in range(30)], axis=1))
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        pp.select_genes(adata, n_top=10, flavor="hvg", subset=True)
    assert adata.n_vars == 10
    assert "svddc failed in l2fit" in caplog.text
    assert "flavor='heg'" in caplog.text


def test_select_genes_hvg_enough_genes_is_not_a_fallback(adata, caplog):
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        pp.select_genes(adata, n_top=12, flavor="hvg", layer="counts")
    assert "instead" not in caplog.text


def test_select_genes_copy(adata):
    before = _keys(adata)
    out = pp.select_genes(adata, n_top=5, subset=True, copy=True)
    assert out.n_vars == 5
    out2 = pp.select_genes(adata, n_top=5, copy=True)
    assert out2.var["rankbygene_panel"].sum() == 5
    assert _keys(adata) == before


def test_select_genes_inplace_false_returns_the_mark_and_changes_nothing(adata):
    before = _keys(adata)
    marked = pp.select_genes(adata, n_top=5, copy=True)
    panel = pp.select_genes(adata, n_top=5, inplace=False)
    assert list(panel.columns) == ["rankbygene_panel"]
    assert (panel.index == adata.var_names).all()
    assert (panel["rankbygene_panel"] == marked.var["rankbygene_panel"]).all()
    assert _keys(adata) == before
    with pytest.raises(ValueError, match="inplace=False"):
        pp.select_genes(adata, n_top=5, inplace=False, copy=True)
    assert _keys(adata) == before


def test_select_genes_list_reports_missing(adata, caplog):
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        pp.select_genes(adata, genes=["HK_2", "TUMOR_3", "NOPE_1", "NOPE_2", "HK_2"], subset=True)
    assert list(adata.var_names) == ["HK_2", "TUMOR_3"]  # list order, duplicates dropped
    assert "2 of 4 genes" in caplog.text
    assert "NOPE_1" in caplog.text


def test_select_genes_file(adata, tmp_path):
    path = tmp_path / "panel.txt"
    path.write_text("# my panel\nSTROMA_2\n\nIMMUNE_1\nMISSING\n")
    pp.select_genes(adata, genes=path)
    assert adata.var_names[adata.var["rankbygene_panel"]].tolist() == ["STROMA_2", "IMMUNE_1"]
    pp.select_genes(adata, genes=str(path), subset=True)
    assert list(adata.var_names) == ["STROMA_2", "IMMUNE_1"]


@pytest.mark.skipif(not (HER2ST / "her_hvg_cut_1000.txt").is_file(), reason="her2st data absent")
def test_select_genes_her2st_panel_file():
    panel = (HER2ST / "her_hvg_cut_1000.txt").read_text().split()
    names = [*panel[:50], "OTHER_1", "OTHER_2"]
    adata = AnnData(
        X=np.ones((4, len(names)), dtype=np.float32),
        var=pd.DataFrame(index=names),
    )
    pp.select_genes(adata, genes=HER2ST / "her_hvg_cut_1000.txt", subset=True)
    assert list(adata.var_names) == panel[:50]


def test_select_genes_bad_input_changes_nothing(adata, tmp_path):
    before = _keys(adata)
    with pytest.raises(ValueError, match="none of the 2 genes"):
        pp.select_genes(adata, genes=["A", "B"])
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        pp.select_genes(adata, genes=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="n_top"):
        pp.select_genes(adata, n_top=0)
    with pytest.raises(ValueError, match="flavor"):
        pp.select_genes(adata, flavor="pca")
    with pytest.raises(KeyError, match="nope"):
        pp.select_genes(adata, layer="nope")
    x = adata.layers["counts"].toarray()
    x[0, 0] = np.nan
    adata.layers["counts"] = sparse.csr_matrix(x)
    with pytest.raises(ValueError, match="1 NaN"):
        pp.select_genes(adata, layer="counts")
    x[0, 0] = -2
    adata.layers["counts"] = x
    with pytest.raises(ValueError, match="1 negative"):
        pp.select_genes(adata, layer="counts", flavor="hvg")
    assert _keys(adata) == before


# --------------------------------------------------------------------------- smooth_expression


def test_smooth_writes_only_its_layer(adata):
    pp.normalize(adata, layer="counts")
    before = _keys(adata)
    pp.smooth_expression(adata, layer="lognorm", library_key="library_id")
    after = _keys(adata)
    assert after["layers"] == sorted([*before["layers"], "lognorm_smoothed"])
    after["layers"] = before["layers"]
    assert after == before  # no obsp / uns entries from squidpy
    assert sparse.issparse(adata.layers["lognorm_smoothed"])  # sparse in, sparse out
    assert adata.layers["lognorm_smoothed"].shape == adata.shape


def test_smooth_default_key_and_copy(adata):
    before = _keys(adata)
    out = pp.smooth_expression(adata, library_key="library_id", copy=True)
    assert "smoothed" in out.layers
    assert _keys(adata) == before


def test_smooth_constant_field_is_noop(adata):
    adata.X = np.full(adata.shape, 3.5, dtype=np.float32)
    pp.smooth_expression(adata, n_rings=2, library_key="library_id")
    np.testing.assert_allclose(adata.layers["smoothed"], 3.5, rtol=1e-6)


@pytest.mark.parametrize("n_rings", [1, 2])
def test_smooth_spike_hex_grid(adata, n_rings):
    mask = (adata.obs["library_id"] == "slide_0").to_numpy()
    xy = adata.obsm["spatial"][mask]
    # An interior spot: all of its rings present.
    counts = np.array([len(nb) for nb in cKDTree(xy).query_ball_point(xy, 201.0)])
    spike = int(np.flatnonzero(counts == 19)[0])
    x = np.zeros(adata.shape, dtype=np.float32)
    x[np.flatnonzero(mask)[spike], :] = 1.0
    adata.X = sparse.csr_matrix(x)
    pp.smooth_expression(adata, n_rings=n_rings, library_key="library_id")
    got = _dense(adata.layers["smoothed"])[mask, 0]
    # Ring k of a hexagonal grid lies within k spot spacings (100 px); the next ring is beyond.
    expected = _expected_mean_of_spike(xy, spike, radius=100.0 * n_rings + 1)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[spike] == pytest.approx(1 / (1 + 6 * n_rings * (n_rings + 1) // 2))
    assert (got > 0).sum() == 1 + 6 * n_rings * (n_rings + 1) // 2
    # The other slide is untouched.
    assert np.abs(_dense(adata.layers["smoothed"])[~mask]).max() == 0


@pytest.mark.parametrize("spike", [24, 0, 3])  # centre, corner, edge of a 7x7 grid
def test_smooth_spike_square_grid(spike):
    adata = _square_grid()
    assert _infer_n_neighs(adata.obsm["spatial"], np.zeros(adata.n_obs, dtype=int)) == 8
    adata.X[spike, :] = 2.0
    pp.smooth_expression(adata)
    # 3x3 mean: neighbours within a diagonal step (10 * sqrt 2).
    expected = 2.0 * _expected_mean_of_spike(adata.obsm["spatial"], spike, radius=14.2)
    np.testing.assert_allclose(adata.layers["smoothed"][:, 1], expected, atol=1e-6)
    if spike == 24:
        assert (adata.layers["smoothed"][:, 0] > 0).sum() == 9
        assert adata.layers["smoothed"][spike, 0] == pytest.approx(2 / 9)
    else:
        assert adata.layers["smoothed"][spike, 0] == pytest.approx(2 / (4 if spike == 0 else 6))


def test_smooth_square_grid_four_neighbours():
    adata = _square_grid()
    adata.X[24, :] = 1.0
    pp.smooth_expression(adata, n_neighs=4)
    expected = _expected_mean_of_spike(adata.obsm["spatial"], 24, radius=10.1)
    np.testing.assert_allclose(adata.layers["smoothed"][:, 0], expected, atol=1e-6)


def test_smooth_anisotropic_st_grid_inferred_square():
    # Legacy ST pixel coordinates: square array, slightly different x and y steps.
    adata = _square_grid(step=(318.0, 289.0))
    assert _infer_n_neighs(adata.obsm["spatial"], np.zeros(adata.n_obs, dtype=int)) == 8


def test_smooth_respects_libraries():
    adata = _square_grid(n_libraries=2)  # both libraries share one coordinate frame
    adata.X[24, :] = 1.0  # centre of lib0
    with pytest.raises(ValueError, match="library_key"):
        pp.smooth_expression(adata)
    assert "smoothed" not in adata.layers
    pp.smooth_expression(adata, library_key="library_id")
    smoothed = adata.layers["smoothed"]
    assert (smoothed[:49, 0] > 0).sum() == 9
    assert np.abs(smoothed[49:]).max() == 0


def test_smooth_finds_the_library_column_as_setup_anndata_does():
    # squidpy's layout: uns["spatial"] names the libraries, obs["library_id"] holds them
    adata = _square_grid(n_libraries=2)
    adata.X[24, :] = 1.0
    adata.uns["spatial"] = {"lib0": {}, "lib1": {}}
    assert resolve_library_key(adata) == "library_id"  # what setup_anndata uses
    pp.smooth_expression(adata)  # no library_key: found, no "share the same coordinates"
    expected = adata.copy()
    pp.smooth_expression(expected, library_key="library_id")
    np.testing.assert_array_equal(adata.layers["smoothed"], expected.layers["smoothed"])
    assert np.abs(adata.layers["smoothed"][49:]).max() == 0
    adata.obs["other"] = adata.obs["library_id"].astype(str)  # a second qualifying column
    adata.obs = adata.obs.rename(columns={"library_id": "slide"})
    with pytest.raises(ValueError, match=r"Several obs columns.*\['slide', 'other'\]"):
        pp.smooth_expression(adata)


@pytest.mark.skipif(not (HER2ST / "ST-spotfiles").is_dir(), reason="her2st data absent")
def test_infer_grid_on_her2st_spots():
    spots = pd.read_csv(HER2ST / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    xy = spots[["pixel_x", "pixel_y"]].to_numpy()
    assert _infer_n_neighs(xy, np.zeros(len(xy), dtype=int)) == 8


def test_smooth_bad_input_changes_nothing(adata):
    before = _keys(adata)
    with pytest.raises(KeyError, match="obsm\\['spatial_missing'\\]"):
        pp.smooth_expression(adata, spatial_key="spatial_missing")
    with pytest.raises(KeyError, match="batch"):
        pp.smooth_expression(adata, library_key="batch")
    with pytest.raises(KeyError, match="nope"):
        pp.smooth_expression(adata, layer="nope", library_key="library_id")
    with pytest.raises(ValueError, match="n_rings"):
        pp.smooth_expression(adata, n_rings=0)
    adata.obsm["spatial3"] = np.zeros((adata.n_obs, 1))
    with pytest.raises(ValueError, match="shape"):
        pp.smooth_expression(adata, spatial_key="spatial3")
    del adata.obsm["spatial3"]
    x = adata.X.toarray()
    x[0, 0] = np.nan
    adata.layers["bad"] = x
    with pytest.raises(ValueError, match="NaN"):
        pp.smooth_expression(adata, layer="bad", library_key="library_id")
    del adata.layers["bad"]
    assert _keys(adata) == before


def test_smooth_with_older_squidpy_api(adata, monkeypatch):
    import squidpy as sq

    expected = pp.smooth_expression(adata, library_key="library_id", copy=True)
    monkeypatch.delattr(sq.gr, "spatial_neighbors_grid")
    pp.smooth_expression(adata, library_key="library_id")
    np.testing.assert_allclose(
        _dense(adata.layers["smoothed"]), _dense(expected.layers["smoothed"])
    )
    assert "spatial_connectivities" not in adata.obsp


@pytest.mark.skipif(not (HER2ST / "ST-cnts").is_dir(), reason="her2st data absent")
def test_smoothing_infers_the_square_grid_of_every_her2st_section():
    import anndata as ad

    from rankbygene.datasets import her2st

    sections = [her2st(s, path=HER2ST) for s in ("B4", "C2", "C3", "C4")]
    adata = ad.concat(sections, join="inner", uns_merge="unique")
    for section in sections:
        # legacy ST: a square grid, smoothed over the 3 x 3 neighbourhood as the reference does
        assert _infer_n_neighs(section.obsm["spatial"], np.zeros(section.n_obs)) == 8
    pp.smooth_expression(adata, layer="counts", key_added="smoothed", library_key="library_id")
    assert adata.layers["smoothed"].shape == adata.shape


def test_normalize_inplace_false_returns_the_values_and_writes_nothing(adata):
    before = _keys(adata)
    values = pp.normalize(adata, layer="counts", inplace=False)
    assert _keys(adata) == before
    written = pp.normalize(adata, layer="counts", copy=True).layers["lognorm"]
    np.testing.assert_allclose(values.toarray(), written.toarray())
    with pytest.raises(ValueError, match="inplace=False"):
        pp.normalize(adata, layer="counts", inplace=False, copy=True)
    assert _keys(adata) == before


@pytest.mark.parametrize("to_sparse", [False, True])
def test_log_normalisations_agree(to_sparse):
    # the same counts through pp.normalize, tl.log_normalize, scanpy itself and the model's
    # torch version (run on each batch): one transform, whatever the caller
    import scanpy as sc
    import torch

    from rankbygene import tl
    from rankbygene.model import RankByGeneModule

    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.5, 4.0, size=(40, 30))).astype(np.float32)
    counts[3] = 0  # a spot without counts stays zero everywhere
    x = sparse.csr_matrix(counts) if to_sparse else counts
    adata = AnnData(X=x.copy())
    pp.normalize(adata, target_sum=1e4)
    reference = AnnData(X=x.copy())
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    module = RankByGeneModule(n_genes=counts.shape[1], backbone=None, n_input_features=8)
    with torch.no_grad():
        in_torch = module.log_normalize(torch.as_tensor(counts)).numpy()

    expected = _dense(reference.X)
    assert expected[3].max() == 0
    assert expected.max() > 5
    for values in (_dense(adata.layers["lognorm"]), tl.log_normalize(x), in_torch):
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
