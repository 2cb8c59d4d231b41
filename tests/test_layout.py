from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
import tifffile
from anndata import AnnData

from rankbygene._layout import (
    ImageSource,
    image_sources,
    resolve_library_key,
    spatial_coordinates,
    spot_libraries,
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
    with pytest.raises(ValueError, match="2 libraries"):
        spot_libraries(adata)
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
