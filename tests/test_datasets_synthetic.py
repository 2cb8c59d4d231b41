from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.spatial import cKDTree

from rankbygene.datasets._synthetic import synthetic
from rankbygene.datasets._tissue_render import CELL_TYPES, REGION_TYPES


@pytest.fixture(scope="module")
def generated():
    start = time.perf_counter()
    adata = synthetic()
    return adata, time.perf_counter() - start


@pytest.fixture(scope="module")
def adata(generated):
    return generated[0]


def _lognorm(adata):
    x = adata.layers["counts"].toarray().astype(np.float64)
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


def _patch_features(adata, library_id):
    """Mean RGB, RGB std and fractions of dark / mid / white pixels of the patch under each spot."""
    mask = (adata.obs["library_id"] == library_id).to_numpy()
    image = adata.uns["spatial"][library_id]["images"]["hires"].astype(np.float32)
    half = int(adata.uns["spatial"][library_id]["scalefactors"]["spot_diameter_fullres"]) // 2
    feats = []
    for x, y in np.rint(adata.obsm["spatial"][mask]).astype(int):
        patch = image[y - half : y + half, x - half : x + half].reshape(-1, 3)
        grey = patch.mean(axis=1)
        feats.append(
            np.r_[
                patch.mean(axis=0),
                patch.std(axis=0),
                (grey < 120).mean(),
                (grey < 170).mean(),
                (grey > 215).mean(),
            ]
        )
    return np.asarray(feats), mask


def _ridge(features, target, alpha=10.0):
    """Ridge regression on standardised features; returns a predictor."""
    mean, sd = features.mean(axis=0), features.std(axis=0) + 1e-6
    z = (features - mean) / sd
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (target - target.mean()))
    return lambda f: ((f - mean) / sd) @ w + target.mean()


def test_runtime_budget(generated):
    # ~1 s on 2 cores; generous bound for slow CI machines.
    assert generated[1] < 6.0


def test_shapes_keys_dtypes(adata):
    assert adata.n_vars == 100
    assert 2 * 250 <= adata.n_obs <= 2 * 350
    assert sparse.issparse(adata.X)
    assert adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    counts = adata.layers["counts"]
    assert sparse.issparse(counts)
    assert counts.dtype == np.float32
    assert (counts != adata.X).nnz == 0
    assert adata.layers["counts"] is not adata.X
    np.testing.assert_array_equal(counts.data, np.round(counts.data))
    assert counts.data.min() >= 0

    obs = adata.obs
    assert {"library_id", "array_row", "array_col", "in_tissue", "region"} <= set(obs.columns)
    assert isinstance(obs["library_id"].dtype, pd.CategoricalDtype)
    assert isinstance(obs["region"].dtype, pd.CategoricalDtype)
    assert list(obs["library_id"].cat.categories) == ["slide_0", "slide_1"]
    assert (obs["in_tissue"] == 1).all()
    assert obs.index.is_unique
    assert adata.var_names.is_unique

    regions = adata.uns["synthetic"]["regions"]
    assert regions == list(REGION_TYPES[:4])
    assert list(obs["region"].cat.categories) == regions
    frac = adata.obsm["region_fractions"]
    assert frac.shape == (adata.n_obs, 4)
    np.testing.assert_allclose(frac.sum(axis=1), 1.0)
    np.testing.assert_array_equal(obs["region"].cat.codes.to_numpy(), frac.argmax(axis=1))
    assert set(adata.var["program"]) == {*regions, "housekeeping"}
    assert adata.var_names[0] == "TUMOR_1"
    assert "HK_1" in adata.var_names
    assert 0.5 <= (adata.var["program"] != "housekeeping").mean() <= 0.7

    spatial = adata.obsm["spatial"]
    assert spatial.shape == (adata.n_obs, 2)
    assert spatial.dtype == np.float64


def test_spatial_uns_layout(adata):
    for lib in ["slide_0", "slide_1"]:
        entry = adata.uns["spatial"][lib]
        hires, lowres = entry["images"]["hires"], entry["images"]["lowres"]
        assert hires.dtype == np.uint8
        assert hires.ndim == 3
        assert hires.shape[2] == 3
        assert 1500 <= max(hires.shape[:2]) <= 2300
        assert lowres.dtype == np.uint8
        assert max(lowres.shape[:2]) == 600
        sf = entry["scalefactors"]
        assert sf["tissue_hires_scalef"] == 1.0
        assert sf["spot_diameter_fullres"] == 64.0
        assert sf["fiducial_diameter_fullres"] > sf["spot_diameter_fullres"]
        assert sf["tissue_lowres_scalef"] == pytest.approx(lowres.shape[1] / hires.shape[1])
        assert entry["metadata"] == {"source": "rankbygene.datasets.synthetic", "seed": 0}
        # Spot discs lie inside the image.
        xy = adata.obsm["spatial"][(adata.obs["library_id"] == lib).to_numpy()]
        assert xy.min() >= 32
        assert (xy[:, 0] <= hires.shape[1] - 32).all()
        assert (xy[:, 1] <= hires.shape[0] - 32).all()


def test_hexagonal_grid(adata):
    xy = adata.obsm["spatial"][(adata.obs["library_id"] == "slide_0").to_numpy()]
    dist, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(dist[:, 1], 100.0, rtol=1e-6)
    # Interior spots have 6 neighbours at the spot spacing.
    assert (np.isclose(dist[:, 1:], 100.0).sum(axis=1) == 6).sum() > len(xy) / 2
    obs = adata.obs[adata.obs["library_id"] == "slide_0"]
    assert ((obs["array_row"] + obs["array_col"]) % 2 == 0).all()  # Visium parity


def test_counts_realistic(adata):
    totals = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    assert 1000 <= np.median(totals) <= 10000
    x = adata.layers["counts"].toarray()
    assert 0.05 < (x == 0).mean() < 0.6  # some dropout, not mostly empty
    means = x.mean(axis=0)
    assert means.min() < 1.0  # some weakly expressed genes
    # Overdispersed: variance well above the mean for housekeeping genes.
    hk = (adata.var["program"] == "housekeeping").to_numpy() & (means > 10)
    assert (x[:, hk].var(axis=0) > 2 * means[hk]).all()


def test_expression_follows_regions(adata):
    expr = np.expm1(_lognorm(adata))
    for region in adata.uns["synthetic"]["regions"]:
        markers = (adata.var["program"] == region).to_numpy()
        inside = (adata.obs["region"] == region).to_numpy()
        ratio = expr[inside][:, markers].mean() / expr[~inside][:, markers].mean()
        # Immune genes also follow the lymphocytes that infiltrate tumour and stroma.
        assert ratio > (3 if region == "immune" else 5), (region, ratio)


def _pure(adata, region, threshold=0.95):
    k = adata.uns["synthetic"]["regions"].index(region)
    return adata.obsm["region_fractions"][:, k] > threshold


def _driver_expression(adata, driver):
    """Summed normalised expression of the genes driven by ``driver``, per spot."""
    genes = (adata.var["driver"] == driver).to_numpy()
    assert genes.sum() >= 3, driver
    return np.expm1(_lognorm(adata))[:, genes].sum(axis=1)


def test_cell_counts(adata):
    counts = adata.obsm["cell_counts"]
    assert adata.uns["synthetic"]["cell_types"] == list(CELL_TYPES)
    assert counts.shape == (adata.n_obs, len(CELL_TYPES))
    np.testing.assert_array_equal(counts, np.round(counts))
    assert counts.min() >= 0
    column = {kind: counts[:, j] for j, kind in enumerate(CELL_TYPES)}
    tumor, immune, stroma = _pure(adata, "tumor"), _pure(adata, "immune"), _pure(adata, "stroma")
    # Dense lymphoid aggregates; tumour cells only in tumour; fibroblasts mostly in stroma.
    assert np.median(column["lymphocyte"][immune]) > 30
    assert (column["tumor"] + column["tumor_cycling"])[~_pure(adata, "tumor", 0.0)].max() == 0
    assert np.median(column["fibroblast"][stroma]) > np.median(column["fibroblast"][tumor])
    # Composition varies inside a region: from almost no infiltrating lymphocytes to dense
    # infiltrates, from low- to high-grade (mostly cycling) tumour.
    lymph = column["lymphocyte"][tumor]
    assert np.quantile(lymph, 0.2) <= 2
    assert np.quantile(lymph, 0.9) >= 10
    cycling = column["tumor_cycling"][tumor] / (column["tumor"] + column["tumor_cycling"])[tumor]
    assert np.quantile(cycling, 0.1) < 0.2
    assert np.quantile(cycling, 0.9) > 0.5
    assert {"driver", "program"} <= set(adata.var.columns)
    assert set(adata.var["driver"][adata.var["program"] == "housekeeping"]) == {"all"}


@pytest.mark.parametrize(
    ("region", "driver", "cell_type"),
    [
        ("tumor", "lymphocyte", "lymphocyte"),
        ("stroma", "lymphocyte", "lymphocyte"),
        ("tumor", "tumor_cycling", "tumor_cycling"),
        ("stroma", "fibroblast", "fibroblast"),
    ],
)
def test_expression_follows_cells_under_the_spot(adata, region, driver, cell_type):
    # Inside one region, where region fractions are constant, a program's expression still
    # follows the number of cells that express it.
    pure = _pure(adata, region)
    assert pure.sum() >= 30
    cells = adata.obsm["cell_counts"][pure, CELL_TYPES.index(cell_type)]
    expression = _driver_expression(adata, driver)[pure]
    r = np.corrcoef(np.log1p(cells), np.log1p(expression))[0, 1]
    assert r > 0.7, (region, driver, r)


def _darkness_profile(adata, library_id, spots):
    """Fractions of the pixels of each spot's patch darker than a ladder of grey levels.

    The levels are quantiles of the slide's pixels, so that they follow its stain strength.
    """
    image = adata.uns["spatial"][library_id]["images"]["hires"].astype(np.float32).mean(axis=2)
    half = int(adata.uns["spatial"][library_id]["scalefactors"]["spot_diameter_fullres"]) // 2
    levels = np.quantile(image[::4, ::4], [0.01, 0.03, 0.1, 0.2, 0.3, 0.5])
    feats = []
    for x, y in np.rint(adata.obsm["spatial"][spots]).astype(int):
        grey = image[y - half : y + half, x - half : x + half].ravel()
        feats.append((grey[:, None] < levels).mean(axis=0))
    return np.asarray(feats)


@pytest.mark.parametrize("cell_type", ["lymphocyte", "tumor_cycling"])
def test_image_shows_the_cells_under_the_spot(adata, cell_type):
    # Inside pure tumour, small dark lymphocytes and large hyperchromatic cycling nuclei shift
    # the patch's darkness profile: fitted on one slide, it predicts their number on the other.
    j = CELL_TYPES.index(cell_type)
    data = {}
    for lib in ["slide_0", "slide_1"]:
        spots = _pure(adata, "tumor") & (adata.obs["library_id"] == lib).to_numpy()
        data[lib] = _darkness_profile(adata, lib, spots), adata.obsm["cell_counts"][spots, j]
    predict = _ridge(*data["slide_0"], alpha=1.0)
    r = np.corrcoef(predict(data["slide_1"][0]), data["slide_1"][1])[0, 1]
    assert r > 0.5, (cell_type, r)


def test_image_predicts_expression_on_held_out_slide(adata):
    lognorm = _lognorm(adata)
    f0, m0 = _patch_features(adata, "slide_0")
    f1, m1 = _patch_features(adata, "slide_1")
    for region in adata.uns["synthetic"]["regions"]:
        markers = (adata.var["program"] == region).to_numpy()
        target = np.log1p(np.expm1(lognorm[:, markers]).sum(axis=1))
        predict = _ridge(f0, target[m0])
        r = np.corrcoef(predict(f1), target[m1])[0, 1]
        assert r > 0.5, (region, r)


def test_image_is_tissue_not_noise(adata):
    image = adata.uns["spatial"]["slide_0"]["images"]["hires"].astype(np.float32).mean(axis=2)
    # Neighbouring 32-px blocks have similar brightness (white noise would give ~0 correlation).
    h, w = (s // 32 * 32 for s in image.shape)
    blocks = image[:h, :w].reshape(h // 32, 32, w // 32, 32).mean(axis=(1, 3))
    r = np.corrcoef(blocks[:, :-1].ravel(), blocks[:, 1:].ravel())[0, 1]
    assert r > 0.5
    # Pixels are correlated with their neighbours (nuclei, fibres), but not constant.
    r_px = np.corrcoef(image[:, :-1].ravel(), image[:, 1:].ravel())[0, 1]
    assert 0.5 < r_px < 0.999
    assert image.std() > 20
    # Regions are contiguous: most neighbouring spots share a region.
    mask = (adata.obs["library_id"] == "slide_0").to_numpy()
    xy = adata.obsm["spatial"][mask]
    region = adata.obs["region"].cat.codes.to_numpy()[mask]
    pairs = cKDTree(xy).query_pairs(101.0, output_type="ndarray")
    same = (region[pairs[:, 0]] == region[pairs[:, 1]]).mean()
    chance = (np.bincount(region) / len(region)) @ (np.bincount(region) / len(region))
    assert same > 0.6
    assert same > chance + 0.25


def test_regions_look_different(adata):
    f, mask = _patch_features(adata, "slide_0")
    frac = adata.obsm["region_fractions"][mask]
    means = {}
    for k, region in enumerate(adata.uns["synthetic"]["regions"]):
        pure = frac[:, k] > 0.95
        assert pure.sum() >= 5, region
        means[region] = f[pure].mean(axis=0)
    # Adipose is bright, immune the darkest, stroma the pinkest (red over blue).
    assert means["adipose"][:3].mean() > max(
        m[:3].mean() for r, m in means.items() if r != "adipose"
    )
    assert means["immune"][6] > max(m[6] for r, m in means.items() if r != "immune")
    pink = {r: m[0] - m[2] for r, m in means.items()}
    assert max(pink, key=pink.get) == "stroma"


def test_deterministic_and_seed_dependent():
    a = synthetic(n_slides=2, n_spots=60, n_genes=30, seed=3)
    b = synthetic(n_slides=2, n_spots=60, n_genes=30, seed=3)
    c = synthetic(n_slides=2, n_spots=60, n_genes=30, seed=4)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(
        a.uns["spatial"]["slide_0"]["images"]["hires"],
        b.uns["spatial"]["slide_0"]["images"]["hires"],
    )
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert not np.array_equal(a.obsm["region_fractions"], c.obsm["region_fractions"])
    assert not np.array_equal(
        a.uns["spatial"]["slide_0"]["images"]["hires"],
        c.uns["spatial"]["slide_0"]["images"]["hires"],
    )
    # Slides of one call have different layouts.
    f0 = a.obsm["region_fractions"][(a.obs["library_id"] == "slide_0").to_numpy()]
    f1 = a.obsm["region_fractions"][(a.obs["library_id"] == "slide_1").to_numpy()]
    assert f0.shape == f1.shape
    assert not np.allclose(f0, f1)


def test_parameters():
    adata = synthetic(n_slides=1, n_spots=50, n_genes=40, n_regions=5, seed=1)
    assert adata.uns["synthetic"]["regions"] == list(REGION_TYPES)
    assert adata.obsm["region_fractions"].shape == (adata.n_obs, 5)
    assert "NECROSIS_1" in adata.var_names
    assert 40 <= adata.n_obs <= 60
    assert adata.n_vars == 40
    single = synthetic(n_slides=1, n_spots=30, n_genes=10, n_regions=1, seed=0)
    assert (single.obs["region"] == "tumor").all()
    big = synthetic(n_slides=1, n_spots=40, spot_diameter=90, spot_spacing=150, seed=0)
    xy = big.obsm["spatial"]
    assert cKDTree(xy).query(xy, k=2)[0][:, 1] == pytest.approx(150.0)
    assert big.uns["spatial"]["slide_0"]["scalefactors"]["spot_diameter_fullres"] == 90.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_slides": 0},
        {"n_spots": 2},
        {"n_regions": 6},
        {"n_regions": 0},
        {"n_genes": 3},
        {"spot_diameter": 0},
        {"spot_spacing": -1},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        synthetic(**kwargs)


def test_spatial_scatter_renders(adata):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import squidpy as sq

    slide = adata[adata.obs["library_id"] == "slide_0"]
    sq.pl.spatial_scatter(slide, library_id="slide_0", color="region")
    fig = plt.gcf()
    assert fig.axes
    assert fig.axes[0].images
    plt.close("all")


def test_h5ad_round_trip(adata, tmp_path):
    import anndata as ad

    small = synthetic(n_slides=1, n_spots=30, n_genes=20, seed=2)
    small.write_h5ad(tmp_path / "synthetic.h5ad")
    back = ad.read_h5ad(tmp_path / "synthetic.h5ad")
    np.testing.assert_array_equal(
        back.uns["spatial"]["slide_0"]["images"]["hires"],
        small.uns["spatial"]["slide_0"]["images"]["hires"],
    )
    assert list(back.uns["synthetic"]["regions"]) == small.uns["synthetic"]["regions"]
