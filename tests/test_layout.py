from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import tifffile
from anndata import AnnData
from conftest import HER2ST, requires_her2st

from rankbygene._layout import (
    ImageSource,
    image_sources,
    resolve_library_key,
    spatial_coordinates,
    spot_libraries,
    validate_layout,
)

IMAGE = np.zeros((20, 30, 3), dtype=np.uint8)


def make_adata(n: int = 4, libraries: dict | None = None) -> AnnData:
    adata = AnnData(
        np.zeros((n, 1)),
        obs=pd.DataFrame({"library_id": ["a"] * n}, index=[f"s{i}" for i in range(n)]),
        obsm={"spatial": np.arange(2 * n, dtype=float).reshape(n, 2)},
    )
    adata.uns["spatial"] = libraries or {
        "a": {
            "images": {"hires": IMAGE, "lowres": IMAGE[::2, ::2]},
            "scalefactors": {
                "tissue_hires_scalef": 0.5,
                "tissue_lowres_scalef": 0.25,
                "spot_diameter_fullres": 12.0,
            },
        }
    }
    return adata


def test_spatial_coordinates():
    adata = make_adata()
    adata.obsm["spatial"] = np.c_[adata.obsm["spatial"], np.ones(4)].astype(np.int32)  # x, y, z
    coords = spatial_coordinates(adata)
    assert coords.dtype == np.float64
    assert coords.shape == (4, 2)
    with pytest.raises(KeyError, match=r"obsm\['xy'\] is missing.*Available obsm keys"):
        spatial_coordinates(adata, "xy")
    adata.obsm["bad"] = np.zeros((4, 1))
    with pytest.raises(ValueError, match=r"obsm\['bad'\] must have shape \(n_obs, 2\)"):
        spatial_coordinates(adata, "bad")
    adata.obsm["inf"] = np.array([[0, 0], [np.inf, 1], [2, 2], [3, 3]], dtype=float)
    with pytest.raises(ValueError, match=r"1 spots with NaN or infinite.*'s1'"):
        spatial_coordinates(adata, "inf")


def test_spot_libraries():
    adata = make_adata()
    np.testing.assert_array_equal(spot_libraries(adata), ["a"] * 4)
    np.testing.assert_array_equal(spot_libraries(adata, "library_id"), ["a"] * 4)
    with pytest.raises(KeyError, match="library_key 'batch'"):
        spot_libraries(adata, "batch")
    adata.uns["spatial"]["b"] = adata.uns["spatial"]["a"]
    # several libraries: found through the column whose values are their ids
    np.testing.assert_array_equal(spot_libraries(adata), ["a"] * 4)
    named = adata.obs.pop("library_id")
    with pytest.raises(ValueError, match=r"2 libraries.*no obs column"):
        spot_libraries(adata)
    adata.obs["library_id"] = named
    adata.obs["library_id"] = pd.Categorical(["a", None, "b", "a"])
    with pytest.raises(ValueError, match="1 missing"):
        spot_libraries(adata, "library_id")
    del adata.uns["spatial"]
    np.testing.assert_array_equal(spot_libraries(adata), ["0"] * 4)


def test_sharpest_in_memory_image():
    adata = make_adata()
    source = image_sources(adata, ["a", "a"])["a"]
    assert source == ImageSource("a", 12.0, image_key="hires", scale=0.5)
    assert source.kind == "memory"
    assert image_sources(adata, ["a"], image_key="lowres")["a"].scale == 0.25
    assert source.open(adata).shape == (20, 30)
    with pytest.raises(ValueError, match="pass adata"):
        source.open()


def test_source_file_preferred(tmp_path):
    path = tmp_path / "full.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(path)
    adata = make_adata()
    adata.uns["spatial"]["a"]["metadata"] = {"source_image_path": str(path)}
    source = image_sources(adata, ["a"])["a"]
    assert source.kind == "file"
    assert source.path == path
    assert source.scale == 1.0
    assert source.open().shape == (40, 60)
    assert image_sources(adata, ["a"], image_key="hires")["a"].kind == "memory"
    adata.uns["spatial"]["a"]["metadata"]["source_image_path"] = str(tmp_path / "gone.jpg")
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg.*image_key"):
        image_sources(adata, ["a"])


def test_precomputed_patches_source(tmp_path):
    path = tmp_path / "patches.h5"
    path.write_bytes(b"")
    entry = {"images": {}, "scalefactors": {}, "metadata": {"patches_path": str(path)}}
    adata = make_adata(libraries={"a": entry})
    source = image_sources(adata, ["a"])["a"]
    assert source.kind == "patches"
    assert source.patches_path == path
    assert math.isnan(source.spot_diameter_fullres)
    with pytest.raises(ValueError, match="precomputed patches"):
        source.open()
    entry["scalefactors"]["spot_diameter_fullres"] = 55.0
    assert image_sources(adata, ["a"])["a"].spot_diameter_fullres == 55.0
    # full-resolution patches win over a thumbnail, unless it is asked for by image_key
    entry["images"]["hires"] = IMAGE
    entry["scalefactors"]["tissue_hires_scalef"] = 0.1
    assert image_sources(adata, ["a"])["a"].kind == "patches"
    assert image_sources(adata, ["a"], image_key="hires")["a"].kind == "memory"
    # a full-resolution source image wins over the patches
    image_path = tmp_path / "full.tif"
    tifffile.imwrite(image_path, np.zeros((8, 8, 3), dtype=np.uint8))
    entry["metadata"]["source_image_path"] = str(image_path)
    assert image_sources(adata, ["a"])["a"].kind == "file"
    del entry["metadata"]["source_image_path"]
    entry["images"] = {}
    entry["metadata"]["patches_path"] = str(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match=r"patches_path.*missing\.h5"):
        image_sources(adata, ["a"])


@pytest.mark.parametrize(
    ("change", "libraries", "image_key", "match"),
    [
        (lambda e: e["scalefactors"].pop("spot_diameter_fullres"), ["a"], None, "spot_diameter"),
        (lambda e: e["scalefactors"].update(spot_diameter_fullres=0), ["a"], None, "not positive"),
        (lambda e: e.update(images={}), ["a"], None, "has no image"),
        (lambda e: e["scalefactors"].pop("tissue_hires_scalef"), ["a"], "hires", "hires_scalef"),
        (None, ["a"], "fullres", "no 'fullres'"),
        (None, ["b"], None, "'b' is not in"),
    ],
)
def test_image_source_errors(change, libraries, image_key, match):
    adata = make_adata()
    if change is not None:
        change(adata.uns["spatial"]["a"])
    with pytest.raises(KeyError, match=match):
        image_sources(adata, libraries, image_key=image_key)


def test_no_spatial_uns():
    adata = make_adata()
    del adata.uns["spatial"]
    with pytest.raises(KeyError, match=r"uns\['spatial'\] is missing"):
        image_sources(adata, ["a"])


# ------------------------------------------------- library_key found from uns["spatial"]


@pytest.fixture(scope="module")
def three_slides() -> AnnData:
    import rankbygene as rbg

    return rbg.datasets.synthetic(n_slides=3, n_spots=30, n_genes=12, seed=1)


def test_setup_takes_the_column_naming_the_libraries(three_slides, caplog):
    import rankbygene as rbg

    adata = three_slides.copy()
    with caplog.at_level(logging.INFO, logger="rankbygene"):
        rbg.RankByGene.setup_anndata(adata, layer="counts")
    assert "using adata.obs['library_id']" in caplog.text
    model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=32, n_latent=8)
    # training and embedding read the libraries from the column found at setup
    assert model.library_key == "library_id"


def test_library_column_of_another_name_and_a_split(three_slides):
    adata = three_slides.copy()
    adata.obs = adata.obs.rename(columns={"library_id": "sample"})
    assert resolve_library_key(adata) == "sample"
    # a split keeps every library in uns["spatial"]; its column names only some of them
    split = adata[adata.obs["sample"] != "slide_2"].copy()
    assert len(split.uns["spatial"]) == 3
    assert resolve_library_key(split) == "sample"
    np.testing.assert_array_equal(
        spot_libraries(split, resolve_library_key(split)), split.obs["sample"].astype(str)
    )


def test_library_id_preferred_among_several_columns(three_slides):
    adata = three_slides.copy()
    adata.obs["sample"] = adata.obs["library_id"].astype(str)
    assert resolve_library_key(adata) == "library_id"
    assert resolve_library_key(adata, "sample") == "sample"  # given: used as is


def test_ambiguous_or_missing_library_column_is_an_error(three_slides):
    adata = three_slides.copy()
    adata.obs["sample"] = adata.obs["library_id"].astype(str)
    adata.obs = adata.obs.rename(columns={"library_id": "batch"})
    with pytest.raises(ValueError, match=r"Several obs columns.*\['batch', 'sample'\]"):
        resolve_library_key(adata)
    del adata.obs["batch"], adata.obs["sample"]
    adata.obs["half"] = np.where(np.arange(adata.n_obs) % 2, "slide_0", "elsewhere")
    adata.obs["with_nan"] = pd.Series(["slide_0"] * adata.n_obs, index=adata.obs_names)
    adata.obs.iloc[0, adata.obs.columns.get_loc("with_nan")] = None
    with pytest.raises(ValueError, match="no obs column has them as values: pass library_key"):
        resolve_library_key(adata)


def test_one_library_needs_no_column():
    adata = make_adata()
    del adata.obs["library_id"]
    assert resolve_library_key(adata) is None
    np.testing.assert_array_equal(spot_libraries(adata), ["a"] * 4)


# ------------------------------------------- coordinates in other units than full-res pixels


def _visium_like(
    width: int = 1500, height: int = 1000, pitch: float = 100.0, diameter: float = 55.0
) -> AnnData:
    """Spots on a hexagonal grid ``pitch`` px apart over most of a full-resolution image kept
    in memory at scale 0.2 (``hires``) and 0.05 (``lowres``), as squidpy reads Visium."""
    rows = np.arange(200.0, height - 150, pitch * np.sqrt(3) / 2)
    xy = np.array(
        [
            (x + (i % 2) * pitch / 2, y)
            for i, y in enumerate(rows)
            for x in np.arange(200.0, width - 200, pitch)
        ]
    )
    n = len(xy)
    counts = np.random.default_rng(0).poisson(3, (n, 5)).astype(np.float32)
    adata = AnnData(counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]))
    adata.obsm["spatial"] = xy
    hires = np.full((height // 5, width // 5, 3), 200, dtype=np.uint8)
    adata.uns["spatial"] = {
        "a": {
            "images": {"hires": hires, "lowres": hires[::4, ::4]},
            "scalefactors": {
                "tissue_hires_scalef": 0.2,
                "tissue_lowres_scalef": 0.05,
                "spot_diameter_fullres": diameter,
            },
        }
    }
    return adata


def _validate(adata: AnnData, **kwargs) -> None:
    libraries = spot_libraries(adata)
    validate_layout(adata, image_sources(adata, libraries), libraries, **kwargs)


def _scale_coords(factor: float, diameter_too: bool = False):
    def change(adata: AnnData) -> None:
        adata.obsm["spatial"] = adata.obsm["spatial"] * factor
        if diameter_too:
            adata.uns["spatial"]["a"]["scalefactors"]["spot_diameter_fullres"] *= factor

    return change


def _swap(adata: AnnData) -> None:
    adata.obsm["spatial"] = adata.obsm["spatial"][:, ::-1].copy()


def _large_diameter(adata: AnnData) -> None:
    adata.uns["spatial"]["a"]["scalefactors"]["spot_diameter_fullres"] *= 5


def _hires_scalef_too_large(adata: AnnData) -> None:
    adata.uns["spatial"]["a"]["scalefactors"]["tissue_hires_scalef"] *= 5


def _array_indices(adata: AnnData) -> None:
    # Visium's array_col (two per pitch, alternate rows shifted by one) and array_row
    x, y = (adata.obsm["spatial"] - 200).T
    adata.obsm["spatial"] = np.c_[np.round(x / 50), np.round(y / (50 * np.sqrt(3)))]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_scale_coords(0.2), r"look like hires pixels: multiply by 1/tissue_hires_scalef = 5\b"),
        (_scale_coords(0.05), r"look like lowres pixels: multiply by 1/tissue_lowres_scalef = 20"),
        (_scale_coords(0.1), r"divided by 10: multiply by 10"),
        # read_st infers the diameter from the spacing: both come out 10 times too small
        (_scale_coords(0.1, True), r"top-left 8% x 8% .*divided by 10: multiply by 10"),
        (_scale_coords(0.2, True), r"top-left .*hires pixels: multiply by 1/tissue_hires_scalef"),
        (_large_diameter, r"0\.36 spot diameters apart.*spot_diameter_fullres too large"),
        (_array_indices, r"would overlap.*array indices"),
        (_swap, r"\(y, x\), not \(x, y\).*outside the 1500 x 1000 px.*\[:, \[1, 0\]\]"),
        (_scale_coords(4), r"86 of 88 spots outside the 1500 x 1000 px .*reach 3\.33 times"),
        (_scale_coords(10), r"outside the 1500 x 1000 px .*They fit once divided by 10\."),
        (_hires_scalef_too_large, r"outside the 300 x 200 px .*tissue_<image>_scalef too large"),
    ],
)
def test_wrong_units_are_named_with_the_likely_fix(change, match):
    adata = _visium_like()
    _validate(adata)  # right units: nothing to say
    change(adata)
    with pytest.raises(ValueError, match=r"obsm\['spatial'\] of library 'a'") as error:
        _validate(adata)
    assert error.match(match)
    assert error.match("check_layout=False")


def test_wrong_units_only_warn_without_check_units(caplog):
    adata = _visium_like()
    _scale_coords(0.2)(adata)
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        _validate(adata, check_units=False)
    assert "look like hires pixels" in caplog.text


def test_tissue_in_a_corner_that_no_factor_explains_warns(caplog):
    adata = _visium_like()
    xy = adata.obsm["spatial"]
    adata = adata[(xy[:, 0] <= 450) & (xy[:, 1] <= 320)].copy()
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        _validate(adata)
    assert "top-left 30% x 29%" in caplog.text
    assert "Check that they are in full-resolution pixels" in caplog.text


def test_spots_on_one_centre_are_an_error():
    adata = _visium_like()
    adata.obsm["spatial"][:] = adata.obsm["spatial"][0]
    with pytest.raises(ValueError, match=r"share their centre.*library_key"):
        _validate(adata)


def test_setup_rejects_wrong_units_unless_told(caplog):
    import rankbygene as rbg

    adata = _visium_like()
    rbg.RankByGene.setup_anndata(adata)  # full-resolution pixels: accepted
    adata = _visium_like()
    _scale_coords(0.2)(adata)
    before = set(adata.uns)
    with pytest.raises(ValueError, match=r"obsm\['spatial'\].*1/tissue_hires_scalef = 5\b"):
        rbg.RankByGene.setup_anndata(adata)
    assert set(adata.uns) == before  # nothing registered
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        rbg.RankByGene.setup_anndata(adata, check_layout=False)
    assert "hires pixels" in caplog.text
    assert rbg.RankByGene(adata, image_encoder="resnet18", input_size=32).adata is adata


def test_synthetic_passes_the_layout_checks(three_slides, caplog):
    libraries = spot_libraries(three_slides, "library_id")
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        validate_layout(three_slides, image_sources(three_slides, libraries), libraries)
    assert not caplog.records


# ----------------------------------------------- one patch per image decoded at setup


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_setup_decodes_a_patch_of_each_image(three_slides, tmp_path, suffix):
    from PIL import Image

    import rankbygene as rbg

    adata = three_slides[three_slides.obs["library_id"] == "slide_1"].copy()
    path = tmp_path / f"slide_1{suffix}"
    image = adata.uns["spatial"]["slide_1"]["images"]["hires"]  # full resolution (scale 1)
    if suffix == ".tif":
        tifffile.imwrite(path, image, tile=(64, 64), compression="zlib")
    else:
        Image.fromarray(image).save(path)
    adata.uns["spatial"]["slide_1"]["metadata"]["source_image_path"] = str(path)
    rbg.RankByGene.setup_anndata(adata.copy(), layer="counts", library_key="library_id")
    data = path.read_bytes()
    # truncated, as by an interrupted copy, before the tiles of the middle spot of a TIFF (its
    # other tiles are only decoded in training)
    path.write_bytes(data[: len(data) // 4])
    with pytest.raises(ValueError, match=rf"Library 'slide_1'.*{path.name}"):
        rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")


def test_corrupt_patches_file_is_named(tmp_path):
    path = tmp_path / "patches.h5"
    path.write_bytes(b"not an HDF5 file" * 64)
    entry = {"images": {}, "scalefactors": {}, "metadata": {"patches_path": str(path)}}
    adata = make_adata(libraries={"a": entry})
    with pytest.raises(ValueError, match=r"Library 'a'.*patches\.h5"):
        _validate(adata)
    import h5py

    with h5py.File(path, "w") as handle:
        handle.create_dataset("pixels", data=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(KeyError, match=r"patches\.h5.*no dataset of patches"):
        _validate(adata)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("img", data=np.zeros((2, 4, 4, 3), np.uint8))
    _validate(adata)


# ------------------------------------- spots against the image: scaled or transposed copies
def _corrupt(adata: AnnData, how: str) -> AnnData:
    adata = adata.copy()
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    adata.obsm["spatial"] = {"x0.5": xy / 2, "x2": xy * 2, "swap": xy[:, ::-1].copy()}[how]
    return adata


#: What the refusal must say for each corruption of valid coordinates.
FIXES = {
    "x0.5": r"looks like full-resolution pixels x 0\.5 .*multiply them by 2\.",
    "x2": r"looks like full-resolution pixels x 2: .*divide them by 2\.",
    "swap": r"looks like \(y, x\), not \(x, y\).*\[:, \[1, 0\]\]",
}


@pytest.fixture(scope="module")
def visium_like_slide() -> AnnData:
    import rankbygene as rbg

    return rbg.datasets.synthetic(n_slides=1, n_spots=150, n_genes=30, seed=0)


@pytest.mark.parametrize("how", list(FIXES))
def test_spots_on_a_scaled_or_swapped_copy_of_the_tissue_are_refused(visium_like_slide, how):
    import rankbygene as rbg

    rbg.RankByGene.setup_anndata(visium_like_slide.copy(), layer="counts")  # valid: accepted
    adata = _corrupt(visium_like_slide, how)
    with pytest.raises(ValueError, match=r"obsm\['spatial'\] of library 'slide_0' ") as error:
        rbg.RankByGene.setup_anndata(adata, layer="counts")
    assert error.match(FIXES[how])
    assert error.match(r"overlaps the tissue of the image by \d\.\d\d \(Dice\)")


def test_scaled_copy_only_warns_without_check_layout(visium_like_slide, caplog):
    import rankbygene as rbg

    adata = _corrupt(visium_like_slide, "x0.5")
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        rbg.RankByGene.setup_anndata(adata, layer="counts", check_layout=False)
    assert "multiply them by 2" in caplog.text


@pytest.fixture(scope="module")
def visium_hd():
    import rankbygene as rbg

    return rbg.datasets.synthetic_visium_hd(size_um=480, bin_sizes_um=(8, 16), n_genes=40)


def test_visium_hd_bins_scaled_or_swapped_are_refused(visium_hd):
    import rankbygene as rbg

    bins = rbg.io.from_spatialdata(visium_hd, table_key="square_016um")
    spots = rbg.pp.aggregate_bins(rbg.io.from_spatialdata(visium_hd, table_key="square_008um"), 32)
    for adata in (bins, spots):
        rbg.RankByGene.setup_anndata(adata.copy(), library_key="library_id")
        for how, fix in FIXES.items():
            with pytest.raises(ValueError, match=fix):
                rbg.RankByGene.setup_anndata(_corrupt(adata, how), library_key="library_id")


def test_visium_hd_transformation_off_by_half_is_refused(visium_hd):
    """Bins touch, so their spacing cannot tell: the image does."""
    import spatialdata as sd
    from spatialdata.transformations import Scale, Sequence, get_transformation

    import rankbygene as rbg

    sdata = sd.deepcopy(visium_hd)
    shapes = next(name for name in sdata.shapes if "016um" in name)
    for system, transformation in get_transformation(sdata[shapes], get_all=True).items():
        halved = Sequence([transformation, Scale([0.5, 0.5], axes=("x", "y"))])
        sd.transformations.set_transformation(sdata[shapes], halved, to_coordinate_system=system)
    bins = rbg.io.from_spatialdata(sdata, table_key="square_016um")
    with pytest.raises(ValueError, match=FIXES["x0.5"]):
        rbg.RankByGene.setup_anndata(bins, library_key="library_id")


@pytest.mark.slow
@requires_her2st
def test_her2st_sections_pass_and_scaled_or_swapped_c2_is_refused():
    import rankbygene as rbg

    sections = sorted(path.name.split(".")[0] for path in (HER2ST / "ST-cnts").glob("*.tsv.gz"))
    assert "C2" in sections
    for section in sections:
        adata = rbg.datasets.her2st(section, path=HER2ST, progress=False)
        libraries = spot_libraries(adata)
        sources = image_sources(adata, libraries)
        # every gene, as read
        validate_layout(adata, sources, libraries, expression=adata.layers["counts"])
        rbg.pp.select_genes(adata, n_top=250, subset=True)  # the tutorial's panel
        rbg.RankByGene.setup_anndata(adata, layer="counts")
        if section == "C2":
            for how, fix in FIXES.items():
                with pytest.raises(ValueError, match=fix):
                    rbg.RankByGene.setup_anndata(_corrupt(adata, how), layer="counts")
