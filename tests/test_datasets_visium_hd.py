"""Visium HD: the synthetic bins, reading them from SpatialData, pseudo-spots and smoothing."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("spatialdata", reason="spatialdata is not installed: Visium HD untested")

import spatialdata as sd  # after the skip
from spatialdata.models import TableModel
from spatialdata.transformations import Affine, get_transformation, set_transformation

import rankbygene as rbg
from rankbygene.datasets import synthetic_visium_hd
from rankbygene.io import from_spatialdata, to_spatialdata
from rankbygene.pp import aggregate_bins

MPP = 0.5
DATASET = "hd"
SIZES = (8, 16)


@pytest.fixture(scope="module")
def sdata():
    return synthetic_visium_hd(
        size_um=480, bin_sizes_um=SIZES, microns_per_pixel=MPP, n_genes=40, dataset_id=DATASET
    )


@pytest.fixture(scope="module")
def bins(sdata):
    return from_spatialdata(sdata, table_key="square_008um", hires_size=300)


def _shapes(size: int) -> str:
    """The shapes element of one bin size, as spatialdata-io names it."""
    return f"{DATASET}_square_{size:03d}um"


def _cell(table, size):
    """Position of each bin on the 8 um grid: ``{(row, col): index}``."""
    return {
        (r, c): i
        for i, (r, c) in enumerate(zip(table.obs["array_row"], table.obs["array_col"], strict=True))
    }


# ---------------------------------------------------------------------------- the data set


def test_elements_named_as_spatialdata_io(sdata):
    assert set(sdata.images) == {f"{DATASET}_{k}_image" for k in ("full", "hires", "lowres")}
    assert set(sdata.shapes) == {_shapes(s) for s in SIZES}
    assert set(sdata.tables) == {"square_008um", "square_016um"}
    for size in SIZES:
        table = sdata.tables[f"square_{size:03d}um"]
        attrs = table.uns["spatialdata_attrs"]
        assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == (
            _shapes(size),
            "region",
            "location_id",
        )
        assert list(table.obs.columns[:4]) == ["in_tissue", "array_row", "array_col", "location_id"]
        row, col = table.obs[["array_row", "array_col"]].iloc[0]
        assert table.obs_names[0] == f"s_{size:03d}um_{row:05d}_{col:05d}-1"
        assert table.X.format == "csr"
        assert table.X.dtype == np.float32
        np.testing.assert_array_equal(table.X.data, np.round(table.X.data))
        assert table.uns["synthetic"]["bin_size_um"] == size
        shapes = sdata.shapes[_shapes(size)]
        assert shapes.index.tolist() == table.obs["location_id"].tolist()
        # squares of the bin side, centred on obsm["spatial"], in full-resolution pixels
        side = np.sqrt(shapes.geometry.area.to_numpy())
        np.testing.assert_allclose(side, size / MPP)
        centroids = np.column_stack([shapes.geometry.centroid.x, shapes.geometry.centroid.y])
        np.testing.assert_allclose(centroids, table.obsm["spatial"])
        assert set(get_transformation(shapes, get_all=True)) == {
            DATASET,
            f"{DATASET}_downscaled_hires",
            f"{DATASET}_downscaled_lowres",
        }
    full = sdata.images[f"{DATASET}_full_image"]
    assert full["scale0"].image.dtype == np.uint8
    assert len(full) > 1  # a pyramid
    grid_px = 480 / MPP + 2 * 32 / MPP  # the field and a 32 um margin each side
    assert full["scale0"].image.shape == (3, grid_px, grid_px)


def test_downscaled_images_are_placed_on_the_full_image(sdata):
    full = sdata.images[f"{DATASET}_full_image"]["scale0"].image.transpose("y", "x", "c").values
    hires = sdata.images[f"{DATASET}_hires_image"]
    to_full = get_transformation(hires, to_coordinate_system=DATASET)
    matrix = to_full.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    small = hires.transpose("y", "x", "c").values.astype(np.float64)
    scale = matrix[0, 0]
    assert scale == pytest.approx(full.shape[1] / small.shape[1])
    # a block of the full image averages to the hires pixel it maps to
    y, x = 100, 150
    k = int(round(scale))
    block = full[y * k : (y + 1) * k, x * k : (x + 1) * k].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(block, small[y, x], atol=1.0)


def test_bins_lie_on_their_grid_in_tissue(sdata):
    for size in SIZES:
        table = sdata.tables[f"square_{size:03d}um"]
        assert (table.obs["in_tissue"] == 1).all()
        centre = (32 + (table.obs[["array_col", "array_row"]].to_numpy() + 0.5) * size) / MPP
        np.testing.assert_allclose(table.obsm["spatial"], centre)
    n8, n16 = sdata.tables["square_008um"].n_obs, sdata.tables["square_016um"].n_obs
    # the tissue edge runs inside the 60 x 60 grid of 8 um bins: some bins are on glass
    assert 0.5 * 3600 < n8 < 3600
    assert n16 == pytest.approx(n8 / 4, rel=0.05)


def test_counts_follow_morphology(sdata):
    """Each region's marker share follows the region's area in the bin; immune genes follow the
    lymphocytes; darker bins (more nuclei) have more counts."""
    from scipy.stats import pearsonr, spearmanr

    full = sdata.images[f"{DATASET}_full_image"]["scale0"].image.transpose("y", "x", "c").values
    for size, floor in ((8, 0.75), (16, 0.8)):
        table = sdata.tables[f"square_{size:03d}um"]
        x = table.X.toarray()
        total = x.sum(axis=1)
        assert (total > 0).mean() > 0.99
        for k, region in enumerate(table.uns["synthetic"]["regions"]):
            share = x[:, (table.var["program"] == region).to_numpy()].sum(axis=1) / np.maximum(
                total, 1
            )
            r = pearsonr(table.obsm["region_fractions"][:, k], share)[0]
            assert r > floor, (size, region, r)
        types = table.uns["synthetic"]["cell_types"]
        lymphocytes = table.obsm["cell_equivalents"][:, types.index("lymphocyte")]
        immune = x[:, (table.var["driver"] == "lymphocyte").to_numpy()].sum(axis=1)
        assert pearsonr(lymphocytes, immune)[0] > 0.8
        half = int(size / MPP / 2)
        grey = [
            full[y - half : y + half, x_ - half : x_ + half].mean()
            for x_, y in np.rint(table.obsm["spatial"]).astype(int)
        ]
        assert spearmanr(grey, total)[0] < -0.7
    regions = sdata.tables["square_008um"].obs["tissue_region"]
    assert regions.value_counts().min() > 100  # every region is there


def test_deterministic_and_seed_dependent():
    first = synthetic_visium_hd(size_um=160, bin_sizes_um=16, n_genes=12, seed=3, as_anndata=True)
    again = synthetic_visium_hd(size_um=160, bin_sizes_um=16, n_genes=12, seed=3, as_anndata=True)
    other = synthetic_visium_hd(size_um=160, bin_sizes_um=16, n_genes=12, seed=4, as_anndata=True)
    assert (first.X != again.X).nnz == 0
    library = "synthetic_hd"
    image = first.uns["spatial"][library]["images"]["hires"]
    np.testing.assert_array_equal(image, again.uns["spatial"][library]["images"]["hires"])
    assert first.shape != other.shape or (first.X != other.X).nnz > 0


def test_one_section_has_one_library_id_at_every_bin_size(sdata, bins):
    coarse = from_spatialdata(sdata, table_key="square_016um", hires_size=100)
    for adata, size in ((bins, 8), (coarse, 16)):
        assert list(adata.uns["spatial"]) == [DATASET]  # the section, not the element
        assert adata.obs["library_id"].cat.categories.tolist() == [DATASET]
        assert adata.uns["spatial"][DATASET]["metadata"]["spatialdata_shapes"] == _shapes(size)
        assert set(adata.obs["region"]) == {_shapes(size)}  # the table's own rows, unchanged
    # both bin sizes in one call: the elements keep their names, so the libraries differ
    both = sd.SpatialData(
        images={f"{DATASET}_full_image": sdata.images[f"{DATASET}_full_image"]},
        shapes={_shapes(s): sdata.shapes[_shapes(s)] for s in SIZES},
        tables={"both": _both_tables(sdata)},
    )
    read = from_spatialdata(
        both, table_key="both", hires_size=100, bin_size_um={_shapes(s): s for s in SIZES}
    )
    assert sorted(read.uns["spatial"]) == sorted(_shapes(s) for s in SIZES)


def _both_tables(sdata):
    tables = [sdata.tables[f"square_{s:03d}um"].copy() for s in SIZES]
    for table in tables:
        del table.uns["spatialdata_attrs"]
    both = ad.concat(tables, index_unique="-")
    both.obs["region"] = pd.Categorical(both.obs["region"].astype(str))
    return TableModel.parse(
        both, region=[_shapes(s) for s in SIZES], region_key="region", instance_key="location_id"
    )


def test_as_anndata_is_what_from_spatialdata_reads(sdata, bins):
    direct = synthetic_visium_hd(
        size_um=480,
        bin_sizes_um=8,
        microns_per_pixel=MPP,
        n_genes=40,
        dataset_id=DATASET,
        as_anndata=True,
    )
    library = DATASET
    assert direct.obs["library_id"].unique().tolist() == [library]
    assert (direct.X != bins.X).nnz == 0
    np.testing.assert_allclose(direct.obsm["spatial"], bins.obsm["spatial"])
    ours = direct.uns["spatial"][library]["scalefactors"]
    theirs = bins.uns["spatial"][library]["scalefactors"]
    for key in ("spot_diameter_fullres", "bin_size_um", "microns_per_pixel"):
        assert ours[key] == pytest.approx(theirs[key])
    full = sdata.images[f"{DATASET}_full_image"]["scale0"].image.transpose("y", "x", "c").values
    np.testing.assert_array_equal(direct.uns["spatial"][library]["images"]["hires"], full)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bin_sizes_um": (8, 12)}, "multiple of the smallest"),
        ({"bin_sizes_um": 2.5}, "whole microns"),
        ({"size_um": -1}, "size_um"),
        ({"microns_per_pixel": 0}, "microns_per_pixel"),
        ({"n_regions": 6}, "n_regions"),
        ({"dataset_id": "a b"}, "dataset_id"),
        ({"bin_sizes_um": (8, 16), "as_anndata": True}, "single bin size"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_visium_hd(size_um=kwargs.pop("size_um", 64), **kwargs)


# ---------------------------------------------------------------------------- reading bins


def test_from_spatialdata_reads_squares_and_records_the_bin_size(sdata, bins):
    table = sdata.tables["square_008um"]
    np.testing.assert_allclose(bins.obsm["spatial"], table.obsm["spatial"])
    entry = bins.uns["spatial"][DATASET]
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(8 / MPP)
    assert entry["scalefactors"]["bin_size_um"] == 8.0
    assert entry["scalefactors"]["microns_per_pixel"] == pytest.approx(MPP)
    assert entry["metadata"]["spatialdata_image"] == f"{DATASET}_full_image"  # the sharpest


def test_from_spatialdata_reads_circles_and_rotated_squares(sdata):
    circles = synthetic_visium_hd(
        size_um=480,
        bin_sizes_um=8,
        microns_per_pixel=MPP,
        n_genes=40,
        dataset_id=DATASET,
        bins_as_squares=False,
    )
    assert set(circles.shapes[_shapes(8)].geometry.geom_type) == {"Point"}
    read = from_spatialdata(circles, table_key="square_008um", hires_size=100)
    squares = from_spatialdata(sdata, table_key="square_008um", hires_size=100)
    np.testing.assert_allclose(read.obsm["spatial"], squares.obsm["spatial"])
    entry = read.uns["spatial"][DATASET]["scalefactors"]
    assert (entry["spot_diameter_fullres"], entry["bin_size_um"]) == (8 / MPP, 8.0)

    # squares stored rotated by 30 degrees, the rotation undone by their transformation
    shapes = sdata.shapes[_shapes(16)]
    theta = np.pi / 6
    rotation = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    from shapely import affinity

    rotated = shapes.copy()
    rotated["geometry"] = [
        affinity.affine_transform(g, [*rotation[:2, :2].ravel(), 0, 0]) for g in shapes.geometry
    ]
    set_transformation(
        rotated,
        {DATASET: Affine(np.linalg.inv(rotation), input_axes=("x", "y"), output_axes=("x", "y"))},
        set_all=True,
    )
    tilted = sd.SpatialData(
        images={f"{DATASET}_full_image": sdata.images[f"{DATASET}_full_image"]},
        shapes={_shapes(16): rotated},
        tables={"square_016um": sdata.tables["square_016um"]},
    )
    read = from_spatialdata(tilted, table_key="square_016um", hires_size=100)
    np.testing.assert_allclose(read.obsm["spatial"], sdata.tables["square_016um"].obsm["spatial"])
    scalefactors = read.uns["spatial"][DATASET]["scalefactors"]
    assert scalefactors["spot_diameter_fullres"] == pytest.approx(16 / MPP)
    assert scalefactors["microns_per_pixel"] == pytest.approx(MPP)


def test_bin_size_given_or_left_unknown(sdata):
    table = sdata.tables["square_016um"].copy()
    table.obs["region"] = pd.Categorical(["bins"] * table.n_obs)
    table.uns["spatialdata_attrs"]["region"] = "bins"
    renamed = sd.SpatialData(
        images={f"{DATASET}_full_image": sdata.images[f"{DATASET}_full_image"]},
        shapes={"bins": sdata.shapes[_shapes(16)]},
        tables={"table": table},
    )
    unknown = from_spatialdata(renamed, hires_size=100).uns["spatial"]["bins"]["scalefactors"]
    assert "bin_size_um" not in unknown
    assert "microns_per_pixel" not in unknown
    given = from_spatialdata(renamed, hires_size=100, bin_size_um={"bins": 16})
    assert given.uns["spatial"]["bins"]["scalefactors"]["microns_per_pixel"] == pytest.approx(MPP)


# ---------------------------------------------------------------------------- pseudo-spots


def test_aggregation_sums_counts_exactly(sdata, bins):
    bins = bins.copy()
    bins.layers["counts"] = bins.X.copy()
    spots = aggregate_bins(bins, size_um=16)
    assert spots.X.sum() == pytest.approx(bins.X.sum())  # nothing lost
    # pseudo-spots of four 8 um bins are the 16 um bins Space Ranger-style summing gives
    complete = spots[spots.obs["n_bins"] == 4]
    cells = _cell(sdata.tables["square_016um"], 16)
    rows = [
        cells[rc] for rc in zip(complete.obs["array_row"], complete.obs["array_col"], strict=True)
    ]
    assert len(rows) > 0.8 * sdata.tables["square_016um"].n_obs
    coarse = sdata.tables["square_016um"]
    assert (coarse.X[rows] != complete.X).nnz == 0
    assert (coarse.X[rows] != complete.layers["counts"]).nnz == 0
    np.testing.assert_allclose(complete.obsm["spatial"], coarse.obsm["spatial"][rows])


def test_pseudo_spot_centres_diameters_and_labels(bins):
    spots = aggregate_bins(bins, size_um=32, min_bins=4)
    library = DATASET
    scalefactors = spots.uns["spatial"][library]["scalefactors"]
    assert scalefactors["spot_diameter_fullres"] == pytest.approx(32 / MPP)
    assert scalefactors["bin_size_um"] == 32.0
    assert scalefactors["aggregated_bin_size_um"] == 8.0
    assert scalefactors["microns_per_pixel"] == pytest.approx(MPP)
    assert (
        spots.uns["spatial"][library]["images"]["fullres"]
        is (bins.uns["spatial"][library]["images"]["fullres"])
    )  # the image is shared, not copied
    assert "spatialdata_attrs" not in spots.uns
    assert spots.obs["n_bins"].between(4, 16).all()
    assert (spots.obs["n_bins"] == 16).mean() > 0.6
    # each pseudo-spot: the mean centre, the summed counts and the most frequent region of its bins
    cells = _cell(bins, 8)
    rng = np.random.default_rng(0)
    for i in rng.choice(spots.n_obs, 20, replace=False):
        r, c = spots.obs[["array_row", "array_col"]].iloc[i]
        members = [
            cells[(4 * r + dr, 4 * c + dc)]
            for dr in range(4)
            for dc in range(4)
            if (4 * r + dr, 4 * c + dc) in cells
        ]
        assert spots.obs["n_bins"].iloc[i] == len(members)
        np.testing.assert_allclose(spots.obsm["spatial"][i], bins.obsm["spatial"][members].mean(0))
        np.testing.assert_allclose(spots.X[i].toarray()[0], bins.X[members].sum(axis=0).A1)
        label = bins.obs["tissue_region"].iloc[members].value_counts().idxmax()
        counts = bins.obs["tissue_region"].iloc[members].value_counts()
        assert counts[spots.obs["tissue_region"].iloc[i]] == counts[label]
    assert spots.obs["library_id"].cat.categories.tolist() == [library]
    assert spots.obs_names.is_unique


def test_grid_from_coordinates_and_several_libraries(bins):
    other = bins.copy()
    other.obs["library_id"] = pd.Categorical(["copy"] * other.n_obs)
    other.obs_names = [f"copy_{name}" for name in other.obs_names]
    both = ad.concat([bins, other], uns_merge="first")
    both.uns["spatial"]["copy"] = bins.uns["spatial"][DATASET]
    both.obs["library_id"] = both.obs["library_id"].astype("category")
    spots = aggregate_bins(both, size_um=32, library_key="library_id")
    one = aggregate_bins(bins, size_um=32)
    assert spots.n_obs == 2 * one.n_obs  # bins of different libraries never share a spot
    # without array positions the grid comes from the centres
    bare = bins.copy()
    del bare.obs["array_row"], bare.obs["array_col"]
    from_xy = aggregate_bins(bare, size_um=32)
    np.testing.assert_allclose(from_xy.obsm["spatial"], one.obsm["spatial"])
    assert (from_xy.X != one.X).nnz == 0
    jittered = bare.copy()
    jittered.obsm["spatial"] = bare.obsm["spatial"] + np.random.default_rng(0).uniform(
        -6, 6, bare.obsm["spatial"].shape
    )
    with pytest.raises(ValueError, match="off an axis-aligned grid"):
        aggregate_bins(jittered, size_um=32)


def test_aggregation_errors(bins):
    with pytest.raises(ValueError, match=r"not a whole multiple.*try 48 or 56"):
        aggregate_bins(bins, size_um=55)
    with pytest.raises(ValueError, match="min_bins"):
        aggregate_bins(bins, size_um=32, min_bins=0)
    bare = bins.copy()
    del bare.uns["spatial"][DATASET]["scalefactors"]["bin_size_um"]
    with pytest.raises(KeyError, match="pass bin_size_um"):
        aggregate_bins(bare, size_um=32)
    given = aggregate_bins(bare, size_um=32, bin_size_um=8)
    assert given.obs["n_bins"].max() == 16


def test_bin_size_that_disagrees_with_the_bins_is_refused(bins):
    # recorded as 8 um: another bin size is refused, naming both
    with pytest.raises(ValueError, match=r"bin_size_um=16 disagrees .* recorded as 8 um"):
        aggregate_bins(bins, size_um=32, bin_size_um=16)
    assert aggregate_bins(bins, size_um=32, bin_size_um=8).obs["n_bins"].max() == 16
    # not recorded: the bins' spacing at the recorded resolution says 8 um
    bare = bins.copy()
    del bare.uns["spatial"][next(iter(bare.uns["spatial"]))]["scalefactors"]["bin_size_um"]
    with pytest.raises(ValueError, match=rf"lie {8 / MPP:g} px apart, 8 um .*not 16 um"):
        aggregate_bins(bare, size_um=32, bin_size_um=16)
    # with every other bin missing (their grid positions tell), and without grid positions
    sparse_bins = bare[(bare.obs["array_row"] + bare.obs["array_col"]) % 2 == 0].copy()
    with pytest.raises(ValueError, match=r"8 um at the recorded .*not 16 um"):
        aggregate_bins(sparse_bins, size_um=32, bin_size_um=16)
    del bare.obs["array_row"], bare.obs["array_col"]
    with pytest.raises(ValueError, match=r"8 um at the recorded .*not 16 um"):
        aggregate_bins(bare, size_um=32, bin_size_um=16)
    # a recorded size that the spacing contradicts is refused too
    wrong = bins.copy()
    wrong.uns["spatial"][next(iter(wrong.uns["spatial"]))]["scalefactors"]["bin_size_um"] = 16.0
    with pytest.raises(ValueError, match=r"8 um at the recorded .*not 16 um \(scalefactors"):
        aggregate_bins(wrong, size_um=32)


def test_smoothing_on_square_bins(bins):
    """A bin's smoothed value is the mean over its 3 x 3 block of bins (those in the tissue)."""
    adata = bins.copy()
    rbg.pp.smooth_expression(adata)
    x, smoothed = adata.X.toarray(), adata.layers["smoothed"].toarray()
    cells = _cell(adata, 8)
    for (r, c), i in list(cells.items())[::7]:
        block = [
            cells[(r + dr, c + dc)]
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (r + dr, c + dc) in cells
        ]
        np.testing.assert_allclose(smoothed[i], x[block].mean(axis=0), rtol=1e-5, atol=1e-5)
    spots = aggregate_bins(bins, size_um=32, min_bins=8)
    rbg.pp.smooth_expression(spots, library_key="library_id")  # pseudo-spots: a square grid too
    assert spots.layers["smoothed"].shape == spots.shape


# ---------------------------------------------------------------------------- the model


def test_tiny_model_trains_on_pseudo_spots_and_predicts_bins(sdata, bins):
    import scvi

    scvi.settings.seed = 0
    spots = aggregate_bins(bins, size_um=48, min_bins=9)
    rbg.RankByGene.setup_anndata(spots, library_key="library_id")
    model = rbg.RankByGene(spots, image_encoder="resnet18", input_size=32, n_latent=8)
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    assert model.is_trained_
    coarse = from_spatialdata(sdata, table_key="square_016um", hires_size=100)
    model.predict_expression(coarse)
    predicted = coarse.layers["rankbygene_predicted"]
    assert predicted.shape == coarse.shape
    assert np.isfinite(predicted).all()
    to_spatialdata(coarse, sdata, table_key="square_016um", keys=["rankbygene_predicted"])
    np.testing.assert_allclose(
        sdata.tables["square_016um"].layers["rankbygene_predicted"], predicted
    )
    del sdata.tables["square_016um"].layers["rankbygene_predicted"]  # the fixture is shared
