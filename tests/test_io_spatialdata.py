"""SpatialData in and out: rbg.io.from_spatialdata and rbg.io.to_spatialdata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip(
    "spatialdata", reason="spatialdata is not installed: SpatialData input and output untested"
)

import dask.array as da  # after the skip: comes with spatialdata
import spatialdata as sd
import xarray as xr
from shapely.geometry import Polygon
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, Translation

import rankbygene as rbg
from rankbygene._layout import image_sources
from rankbygene.io import from_spatialdata, open_image, to_spatialdata

MPP = 0.5  # the circles live in microns: global units per full-resolution pixel
SHIFT = 10.0  # and are translated, so that two transformations compose


def _synthetic(n_slides: int = 2, n_spots: int = 30, n_genes: int = 12):
    adata = rbg.datasets.synthetic(n_slides=n_slides, n_spots=n_spots, n_genes=n_genes, seed=0)
    # spatialdata-io names the table's region column "region": the tissue region moves aside
    adata.obs = adata.obs.rename(columns={"region": "tissue"})
    return adata


def _to_sdata(adata, images=None, multiscale: bool = False, system=None):
    """A SpatialData of ``adata`` built with spatialdata's own constructors.

    Per library: the full-resolution image (``images[lib]`` or the synthetic ``hires``, which is
    full resolution) scaled into microns, and circles in microns shifted by ``SHIFT``, whose
    transformation takes the shift back; both in the coordinate system named after the library
    (or ``system``). The table annotates the circles by ``region`` and ``spot_id`` (ids from
    100, so that they are no positions).
    """
    images_out, shapes = {}, {}
    for lib, entry in adata.uns["spatial"].items():
        cs = system or lib
        pixels = (images or {}).get(lib, entry["images"]["hires"])
        images_out[f"{lib}_he"] = Image2DModel.parse(
            pixels,
            dims=("y", "x", "c"),
            transformations={cs: Scale([MPP, MPP], axes=("y", "x"))},
            scale_factors=[2] if multiscale else None,
            chunks=(3, 128, 128),
        )
        spots = (adata.obs["library_id"] == lib).to_numpy()
        diameter = entry["scalefactors"]["spot_diameter_fullres"]
        shapes[lib] = ShapesModel.parse(
            adata.obsm["spatial"][spots] * MPP + SHIFT,
            geometry=0,
            radius=np.full(spots.sum(), diameter * MPP / 2),
            index=np.arange(spots.sum()) + 100,
            transformations={cs: Translation([-SHIFT, -SHIFT], axes=("x", "y"))},
        )
    table = adata.copy()
    del table.uns["spatial"], table.obsm["spatial"]
    table.obs["region"] = pd.Categorical(table.obs["library_id"].astype(str))
    table.obs["spot_id"] = table.obs.groupby("library_id", observed=True).cumcount() + 100
    table = TableModel.parse(
        table, region=list(adata.uns["spatial"]), region_key="region", instance_key="spot_id"
    )
    return sd.SpatialData(images=images_out, shapes=shapes, tables={"table": table})


class CountingArray:
    """A numpy array that records the pixels read from it, to show what is read lazily."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads: list[int] = []

    def __getitem__(self, index):
        out = self.array[index]
        self.reads.append(int(np.prod(out.shape[:2])))
        return out


@pytest.fixture(scope="module")
def adata():
    return _synthetic()


@pytest.fixture
def sdata(adata):
    return _to_sdata(adata)


def test_round_trip_coordinates_and_layout(adata, sdata):
    out = from_spatialdata(sdata)
    assert list(out.obs_names) == list(adata.obs_names)
    np.testing.assert_allclose(out.obsm["spatial"], adata.obsm["spatial"], rtol=0, atol=1e-6)
    assert out.obs["library_id"].astype(str).tolist() == adata.obs["library_id"].tolist()
    np.testing.assert_array_equal(out.layers["counts"].toarray(), adata.layers["counts"].toarray())
    for lib, entry in adata.uns["spatial"].items():
        got = out.uns["spatial"][lib]
        assert got["scalefactors"]["spot_diameter_fullres"] == pytest.approx(64.0)
        assert got["scalefactors"]["tissue_fullres_scalef"] == 1.0
        assert got["metadata"] == {
            "spatialdata_table": "table",
            "spatialdata_shapes": lib,
            "spatialdata_image": f"{lib}_he",
        }
        # the image is no larger than the thumbnail size: the thumbnail is the image itself
        np.testing.assert_array_equal(got["images"]["hires"], entry["images"]["hires"])
        assert got["scalefactors"]["tissue_hires_scalef"] == 1.0
        # patches from the lazy element are the patches of the original image
        lazy, original = open_image(got["images"]["fullres"]), open_image(entry["images"]["hires"])
        x, y = adata.obsm["spatial"][adata.obs["library_id"] == lib][3] - 32
        np.testing.assert_array_equal(
            lazy.read_region(x, y, 64, 64, out_size=32),
            original.read_region(x, y, 64, 64, out_size=32),
        )
    # the table of the SpatialData object is left alone
    assert "spatial" not in sdata.tables["table"].obsm
    assert "spatial" not in sdata.tables["table"].uns


def test_shapes_key_and_multiscale_image(adata):
    sdata = _to_sdata(adata, multiscale=True)
    out = from_spatialdata(sdata, shapes_key="slide_1", hires_size=300)
    assert set(out.obs["library_id"]) == {"slide_1"}
    assert list(out.uns["spatial"]) == ["slide_1"]
    spots = (adata.obs["library_id"] == "slide_1").to_numpy()
    np.testing.assert_allclose(out.obsm["spatial"], adata.obsm["spatial"][spots], atol=1e-6)
    entry = out.uns["spatial"]["slide_1"]
    assert entry["images"]["fullres"].shape == (734, 750, 3)  # level 0
    scale = entry["scalefactors"]["tissue_hires_scalef"]
    assert scale == pytest.approx(300 / 750)
    assert entry["images"]["hires"].shape == (round(734 * scale), 300, 3)
    # the thumbnail is the image, downscaled (bilinear on block means: close, not equal)
    original = adata.uns["spatial"]["slide_1"]["images"]["hires"]
    expected = open_image(original).thumbnail(300)[0]
    assert np.abs(entry["images"]["hires"].astype(int) - expected).mean() < 8


def test_image_is_read_lazily(adata):
    lib = "slide_0"
    pixels = adata.uns["spatial"][lib]["images"]["hires"]
    counting = CountingArray(pixels)
    lazy = da.from_array(counting, chunks=(128, 128, 3), asarray=False)
    sdata = _to_sdata(adata, images={lib: lazy})
    counting.reads.clear()
    out = from_spatialdata(sdata, shapes_key=lib, hires_size=100)
    # the thumbnail is made chunk by chunk: no read of the whole image, each pixel read once
    assert max(counting.reads) <= 128 * 128
    assert sum(counting.reads) <= pixels.shape[0] * pixels.shape[1]
    fullres = out.uns["spatial"][lib]["images"]["fullres"]
    assert isinstance(fullres, da.Array)
    counting.reads.clear()
    patch = open_image(fullres).read_region(130, 130, 64, 64)
    np.testing.assert_array_equal(patch, pixels[130:194, 130:194])
    assert counting.reads == [128 * 128]  # the one chunk the patch lies in, nothing else
    # with a pyramid, the thumbnail comes from the coarser level: level 0 is not read at all
    tree = _to_sdata(adata, images={lib: lazy}, multiscale=True).images[f"{lib}_he"]
    coarse = tree["scale1"].to_dataset()
    coarse["image"] = coarse["image"].copy(data=da.zeros(coarse["image"].shape, np.uint8))
    tree["scale1"] = xr.DataTree(coarse)
    sdata.images[f"{lib}_he"] = tree
    counting.reads.clear()
    from_spatialdata(sdata, shapes_key=lib, hires_size=300)
    assert counting.reads == []


def test_train_predict_and_write_back(adata, sdata):
    import scvi

    scvi.settings.seed = 0
    # a thumbnail smaller than the image: patches come from the lazy full-resolution element
    out = from_spatialdata(sdata, hires_size=300)
    source = image_sources(out, ["slide_0"])["slide_0"]
    assert (source.kind, source.image_key, source.scale) == ("memory", "fullres", 1.0)
    rbg.RankByGene.setup_anndata(out, layer="counts", library_key="library_id")
    model = rbg.RankByGene(out, image_encoder="resnet18", input_size=32, n_latent=8)
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    out.obsm["X_rankbygene"] = model.get_image_representation(out)
    model.predict_expression(out)
    assert to_spatialdata(out, sdata) is sdata
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["X_rankbygene"], out.obsm["X_rankbygene"])
    np.testing.assert_allclose(
        table.layers["rankbygene_predicted"], out.layers["rankbygene_predicted"]
    )
    assert table.uns["rankbygene"]["predicted"]["method"] == "ridge"
    # spatialdata-plot colours circles by a gene through get_values with table_layer
    gene = str(out.var_names[0])
    values = sd.get_values(
        gene,
        sdata=sdata,
        element_name="slide_1",
        table_name="table",
        table_layer="rankbygene_predicted",
    )
    spots = (out.obs["library_id"] == "slide_1").to_numpy()
    np.testing.assert_allclose(
        np.asarray(values[gene]), out[spots, gene].layers["rankbygene_predicted"].ravel()
    )
    # squidpy finds the circles through the table
    import squidpy as sq

    systems = {lib: lib for lib in ("slide_0", "slide_1")}
    neighbors = getattr(sq.gr, "spatial_neighbors_knn", sq.gr.spatial_neighbors)  # squidpy 1.8
    neighbors(sdata, elements_to_coordinate_systems=systems, table_key="table")
    assert "spatial_connectivities" in table.obsp
    sq.gr.spatial_autocorr(table, genes=[gene], layer="rankbygene_predicted", n_perms=None)
    assert np.isfinite(table.uns["moranI"].loc[gene, "I"])


def test_disk_backed_object(adata, tmp_path):
    _to_sdata(adata, multiscale=True).write(tmp_path / "slides.zarr")
    sdata = sd.read_zarr(tmp_path / "slides.zarr")
    out = from_spatialdata(sdata)
    np.testing.assert_allclose(out.obsm["spatial"], adata.obsm["spatial"], rtol=0, atol=1e-6)
    fullres = out.uns["spatial"]["slide_1"]["images"]["fullres"]
    assert isinstance(fullres, da.Array)  # backed by the zarr store, read by region
    original = adata.uns["spatial"]["slide_1"]["images"]["hires"]
    np.testing.assert_array_equal(
        open_image(fullres).read_region(100, 120, 50, 40), original[120:160, 100:150]
    )


def test_results_join_a_zarr_store_as_a_new_table(adata, tmp_path):
    path = tmp_path / "slides.zarr"
    _to_sdata(adata).write(path)
    sdata = sd.read_zarr(path)
    out = from_spatialdata(sdata)
    out.layers["rankbygene_predicted"] = np.random.default_rng(0).random(out.shape)
    out.obsm["X_rankbygene"] = np.arange(out.n_obs * 3, dtype=np.float32).reshape(-1, 3)
    # the table itself cannot be rewritten in its own store: refused before any change
    with pytest.raises(ValueError, match="pass key_added"):
        to_spatialdata(out, sdata, write=True)
    assert "X_rankbygene" not in sdata.tables["table"].obsm
    with pytest.raises(ValueError, match="key_added must name a new table"):
        to_spatialdata(out, sdata, key_added="table", write=True)
    with pytest.raises(ValueError, match="'my results' cannot name a SpatialData element"):
        to_spatialdata(out, sdata, key_added="my results", write=True)
    to_spatialdata(out, sdata, key_added="rankbygene", write=True)
    assert "X_rankbygene" not in sdata.tables["table"].obsm  # the table is unchanged
    again = sd.read_zarr(path)
    saved = again.tables["rankbygene"]
    np.testing.assert_allclose(
        saved.layers["rankbygene_predicted"], out.layers["rankbygene_predicted"]
    )
    np.testing.assert_array_equal(saved.obsm["X_rankbygene"], out.obsm["X_rankbygene"])
    attrs = saved.uns["spatialdata_attrs"]
    assert (attrs["region_key"], attrs["instance_key"]) == ("region", "spot_id")
    np.testing.assert_array_equal(saved.obs["spot_id"], sdata.tables["table"].obs["spot_id"])
    gene = str(out.var_names[0])
    values = sd.get_values(gene, sdata=again, element_name="slide_0", table_name="rankbygene")
    assert len(values) == 30
    # a second run replaces the table it wrote
    out.obsm["X_rankbygene"] += 1
    to_spatialdata(out, sd.read_zarr(path), key_added="rankbygene", write=True)
    np.testing.assert_array_equal(
        sd.read_zarr(path).tables["rankbygene"].obsm["X_rankbygene"], out.obsm["X_rankbygene"]
    )
    with pytest.raises(ValueError, match=r"sdata\.write"):
        to_spatialdata(out, write=True)
    in_memory = _to_sdata(adata)
    with pytest.raises(ValueError, match=r"sdata\.path is None"):
        to_spatialdata(out, in_memory, key_added="rankbygene", write=True)


def test_write_back_matches_rows_and_fills_missing(adata, sdata):
    out = from_spatialdata(sdata)
    part = out[::-2].copy()  # half the rows, reversed
    part.obsm["X_rankbygene"] = np.arange(part.n_obs * 2, dtype=float).reshape(-1, 2)
    part.obs["rank_consistency"] = np.linspace(0, 1, part.n_obs)
    to_spatialdata(part, sdata)
    table = sdata.tables["table"]
    rows = table.obs_names.get_indexer(part.obs_names)
    np.testing.assert_array_equal(table.obsm["X_rankbygene"][rows], part.obsm["X_rankbygene"])
    missing = np.setdiff1d(np.arange(table.n_obs), rows)
    assert np.isnan(table.obsm["X_rankbygene"][missing]).all()
    np.testing.assert_allclose(
        table.obs["rank_consistency"].to_numpy()[rows], part.obs["rank_consistency"]
    )
    assert table.obs["rank_consistency"].iloc[missing].isna().all()


def test_predictions_over_other_genes_go_to_a_new_table(adata, sdata):
    out = from_spatialdata(sdata)
    panel = out[:, :5].copy()
    panel.layers["rankbygene_predicted"] = np.random.default_rng(0).random(panel.shape)
    to_spatialdata(panel, sdata)
    assert "rankbygene_predicted" not in sdata.tables["table"].layers
    new = sdata.tables["table_rankbygene"]
    assert list(new.var_names) == list(panel.var_names)
    np.testing.assert_allclose(
        new.layers["rankbygene_predicted"], panel.layers["rankbygene_predicted"]
    )
    attrs = new.uns["spatialdata_attrs"]
    assert sorted(attrs["region"]) == ["slide_0", "slide_1"]
    assert (attrs["region_key"], attrs["instance_key"]) == ("region", "spot_id")
    values = sd.get_values(
        str(panel.var_names[2]), sdata=sdata, element_name="slide_0", table_name="table_rankbygene"
    )
    assert len(values) == 30


def test_new_spatialdata_round_trip(adata):
    sdata = to_spatialdata(adata)
    assert set(sdata.shapes) == {"slide_0", "slide_1"}
    assert set(sdata.images) == {"slide_0_full_image", "slide_1_full_image"}
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"]["region_key"] == "library_id"
    back = from_spatialdata(sdata)
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"], atol=1e-6)
    # the lazy image of a converted object goes back as an image element, not into the table
    again = to_spatialdata(back)
    assert isinstance(again.images["slide_0_full_image"].data, da.Array)
    assert "fullres" not in again.tables["table"].uns["spatial"]["slide_0"]["images"]


def _renamed(adata, old, new):
    renamed = adata.copy()
    renamed.obs["library_id"] = renamed.obs["library_id"].cat.rename_categories({old: new})
    renamed.uns["spatial"] = {
        (new if key == old else key): value for key, value in renamed.uns["spatial"].items()
    }
    return renamed


@pytest.mark.parametrize(
    ("name", "match"),
    [
        (
            "my slide/1",
            r"library id 'my slide/1' of adata\.obs\['library_id'\] cannot name .*'my_slide_1'",
        ),
        ("__hidden", r"'__hidden' of adata\.obs\['library_id'\] cannot name a SpatialData element"),
        (
            "SLIDE_1",
            r"ids 'SLIDE_1' and 'slide_1' of adata\.obs\['library_id'\] differ only in case",
        ),
    ],
)
def test_library_ids_are_checked_before_spatialdata_sees_them(adata, name, match):
    with pytest.raises(ValueError, match=match):
        to_spatialdata(_renamed(adata, "slide_0", name))
    with pytest.raises(ValueError, match=r"table_key 'my table' cannot name"):
        to_spatialdata(adata, table_key="my table")


def test_new_spatialdata_images_are_multiscale_and_chunked(adata, tmp_path):
    import warnings

    big = adata[adata.obs["library_id"] == "slide_0"].copy()
    entry = big.uns["spatial"]["slide_0"]
    image = np.tile(entry["images"]["hires"], (4, 3, 1))  # 2936 x 2250 px
    big.uns["spatial"] = {"slide_0": {**entry, "images": {"hires": image}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of spatialdata's about the image
        sdata = to_spatialdata(big)
    element = sdata.images["slide_0_full_image"]
    levels = sd.get_pyramid_levels(element)
    assert [level.shape[1:] for level in levels] == [(2936, 2250), (1468, 1125), (734, 562)]
    assert max(max(c) for c in levels[0].data.chunks[1:]) == 1024
    sdata.write(tmp_path / "new.zarr")
    back = from_spatialdata(sd.read_zarr(tmp_path / "new.zarr"))
    np.testing.assert_array_equal(
        open_image(back.uns["spatial"]["slide_0"]["images"]["fullres"]).read_region(0, 0, 64, 64),
        image[:64, :64],
    )


def test_new_spatialdata_scales_a_downscaled_image(adata):
    lowres = adata[adata.obs["library_id"] == "slide_0"].copy()
    entry = adata.uns["spatial"]["slide_0"]
    lowres.uns["spatial"] = {"slide_0": {**entry, "images": {"lowres": entry["images"]["lowres"]}}}
    sdata = to_spatialdata(lowres)
    assert list(sdata.images) == ["slide_0_lowres_image"]
    back = from_spatialdata(sdata)
    # the image element is the lowres one: its pixels are the full resolution now
    np.testing.assert_allclose(back.obsm["spatial"], lowres.obsm["spatial"] * 0.8, atol=1e-6)
    diameter = back.uns["spatial"]["slide_0"]["scalefactors"]["spot_diameter_fullres"]
    assert diameter == pytest.approx(64 * 0.8)


def test_sharpest_image_is_chosen(adata):
    one = adata[adata.obs["library_id"] == "slide_0"].copy()
    one.uns["spatial"] = {"slide_0": adata.uns["spatial"]["slide_0"]}
    sdata = _to_sdata(one)
    low = one.uns["spatial"]["slide_0"]["images"]["lowres"]
    sdata.images["slide_0_lowres"] = Image2DModel.parse(
        low, dims=("y", "x", "c"), transformations={"slide_0": Scale([MPP / 0.8] * 2, ("y", "x"))}
    )
    assert from_spatialdata(sdata).uns["spatial"]["slide_0"]["metadata"]["spatialdata_image"] == (
        "slide_0_he"
    )
    out = from_spatialdata(sdata, image_key="slide_0_lowres")
    np.testing.assert_allclose(out.obsm["spatial"], one.obsm["spatial"] * 0.8, atol=1e-6)
    # two images as sharp as each other: the choice is the user's
    sdata.images["slide_0_copy"] = sdata.images["slide_0_he"]
    with pytest.raises(ValueError, match=r"equally sharp.*pass image_key"):
        from_spatialdata(sdata)
    out = from_spatialdata(sdata, image_key={"slide_0": "slide_0_copy"})
    np.testing.assert_allclose(out.obsm["spatial"], one.obsm["spatial"], atol=1e-6)


def test_errors_name_what_is_missing(adata, sdata):
    with pytest.raises(KeyError, match=r"no table 'counts'.*tables: \['table'\]"):
        from_spatialdata(sdata, table_key="counts")
    with pytest.raises(KeyError, match="no shapes element 'spots'"):
        from_spatialdata(sdata, shapes_key="spots")
    with pytest.raises(KeyError, match="no image element 'he'"):
        from_spatialdata(sdata, image_key="he")
    with pytest.raises(KeyError, match="image_key has no image for shapes 'slide_1'"):
        from_spatialdata(sdata, image_key={"slide_0": "slide_0_he"})
    with pytest.raises(ValueError, match="No coordinate system links shapes 'slide_0'"):
        from_spatialdata(sdata, image_key="slide_1_he")
    with pytest.raises(ValueError, match="hires_size"):
        from_spatialdata(sdata, hires_size=0)

    bare = sdata.tables["table"].copy()
    del bare.uns["spatialdata_attrs"]
    sdata.tables["bare"] = bare
    with pytest.raises(KeyError, match=r"Table 'bare' annotates no element.*TableModel.parse"):
        from_spatialdata(sdata, table_key="bare")

    sdata.shapes["extra"] = ShapesModel.parse(
        np.zeros((1, 2)), geometry=0, radius=np.ones(1), transformations={"slide_0": Identity()}
    )
    with pytest.raises(KeyError, match="Table 'table' does not annotate shapes 'extra'"):
        from_spatialdata(sdata, shapes_key="extra")

    lost = sdata.shapes["slide_0"].iloc[1:]
    sdata.shapes["slide_0"] = lost
    with pytest.raises(KeyError, match=r"1 table rows of region 'slide_0'.*first ids: \[100\]"):
        from_spatialdata(sdata)

    # squares are bins; other polygons are no spots
    rectangle = Polygon([(0, 0), (2, 0), (2, 1), (0, 1)])
    import geopandas as gpd

    sdata.shapes["slide_0"] = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=[rectangle] * 30, index=np.arange(30) + 100),
        transformations={"slide_0": Identity()},
    )
    with pytest.raises(ValueError, match=r"Shapes 'slide_0' are polygons, 30 of them not squares"):
        from_spatialdata(sdata)

    with pytest.raises(KeyError, match=r"adata has no \['X_uni'\]"):
        to_spatialdata(adata, keys=["X_uni"])
    stranger = adata.copy()
    stranger.obs_names = [f"other_{i}" for i in range(stranger.n_obs)]
    stranger.obs = stranger.obs.drop(columns=["spot_id"], errors="ignore")
    stranger.obsm["X_rankbygene"] = np.zeros((stranger.n_obs, 2))
    with pytest.raises(ValueError, match="60 rows of adata match no row of table 'table'"):
        to_spatialdata(stranger, _to_sdata(adata))
