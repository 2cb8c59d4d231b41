"""WSIData/LazySlide interoperation: tile_slide on a WSIData, the encoder as a feature extractor."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import rankbygene as rbg
from rankbygene.io import WSIDataImage, open_image, write_pyramidal_tiff


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A corner of a synthetic section as a pyramidal TIFF (levels in SubIFDs), 1 um/px."""
    section = rbg.datasets.synthetic(n_slides=1, n_spots=20, n_genes=6, seed=0)
    image = np.ascontiguousarray(section.uns["spatial"]["slide_0"]["images"]["hires"][:400, :400])
    return write_pyramidal_tiff(tmp_path_factory.mktemp("wsi") / "case0.tif", image, mpp=1.0)


def open_wsi(path):
    wsidata = pytest.importorskip("wsidata")
    pytest.importorskip("tiffslide")
    # OpenSlide (wsidata's first choice) does not see pyramid levels in SubIFDs
    return wsidata.open_wsi(path, store=None, reader="tiffslide")


def test_reader_reads_the_same_pixels_as_the_package(slide):
    wsi = open_wsi(slide)
    ours, theirs = open_image(slide), WSIDataImage(wsi)
    assert theirs.shape == ours.shape
    assert theirs.mpp == ours.mpp == 1.0
    assert theirs.path == slide
    for box in [(100, 50, 64, 48), (380, 370, 64, 64)]:  # inside, and over the corner
        np.testing.assert_array_equal(theirs.read_region(*box), ours.read_region(*box))
    # thumbnails come from the same level; wsidata takes a level's downsample from its size
    # (650 / 325 x 647 / 323 for a 650 x 647 slide), the package 2.0: a pixel row may differ
    thumb, _ = theirs.thumbnail(200)
    assert np.abs(thumb.astype(int) - ours.thumbnail(200)[0]).mean() < 10


def test_tile_slide_on_a_wsidata_is_tile_slide_on_its_file(slide):
    wsi = open_wsi(slide)
    on_path = rbg.pp.tile_slide(slide, tile_size_um=32)
    on_wsi = rbg.pp.tile_slide(wsi, tile_size_um=32)
    assert on_wsi.n_obs == on_path.n_obs > 40
    assert (on_wsi.obs_names == on_path.obs_names).all()
    np.testing.assert_array_equal(on_wsi.obsm["spatial"], on_path.obsm["spatial"])
    np.testing.assert_array_equal(on_wsi.obs["tissue_fraction"], on_path.obs["tissue_fraction"])
    entry, expected = on_wsi.uns["spatial"]["case0"], on_path.uns["spatial"]["case0"]
    assert entry["metadata"] == expected["metadata"]
    assert entry["scalefactors"] == expected["scalefactors"]


def test_tile_slide_takes_lazyslide_tiles(slide):
    zs = pytest.importorskip("lazyslide")
    wsi = open_wsi(slide)
    with pytest.raises(KeyError, match="tile_tissues"):
        rbg.pp.tile_slide(wsi, tile_key="tiles")
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, 40, stride_px=30, background_fraction=0.5)
    tiles = rbg.pp.tile_slide(wsi, tile_key="tiles")
    table = wsi.shapes["tiles"]
    assert tiles.n_obs == len(table)
    bounds = table.bounds.to_numpy()
    np.testing.assert_array_equal(tiles.obsm["spatial"], (bounds[:, :2] + bounds[:, 2:]) / 2)
    np.testing.assert_array_equal(tiles.obs["tile_id"], table["tile_id"])
    meta = tiles.uns["spatial"]["case0"]["metadata"]
    assert (meta["tile_size_px"], meta["stride_px"], meta["tile_size_um"]) == (40, 30, 40.0)
    assert tiles.uns["spatial"]["case0"]["scalefactors"]["spot_diameter_fullres"] == 40
    assert tiles.obs["tissue_fraction"].between(0, 1).all()
    with pytest.raises(ValueError, match="WSIData"):
        rbg.pp.tile_slide(slide, tile_key="tiles")


def test_encoder_as_lazyslide_feature_extractor(slide, tiny_model):
    zs = pytest.importorskip("lazyslide")
    wsi = open_wsi(slide)
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, 32, background_fraction=0.5)  # the model's input size: level 0
    extractor = rbg.model.FeatureExtractor(tiny_model)
    features = zs.tl.feature_extraction(
        wsi, extractor, return_features=True, pbar=False, batch_size=128
    )
    assert "rankbygene_tiles" in wsi.tables
    np.testing.assert_array_equal(wsi.tables["rankbygene_tiles"].X, features)
    expected = tiny_model.get_image_representation(
        rbg.pp.tile_slide(wsi, tile_key="tiles"), progress=False, num_workers=0, batch_size=128
    )
    assert features.shape == expected.shape == (len(wsi.shapes["tiles"]), 8)
    np.testing.assert_allclose(features, expected, atol=1e-5)
    # as a plain callable on uint8 (B, H, W, 3) batches, normalised inside
    tile = wsi.read_region(0, 0, 32, 32)
    batch = np.stack([tile, tile])
    import torch

    plain = extractor(torch.from_numpy(batch)).numpy()
    normalised = extractor.encode_image(extractor.get_transform()(tile)[None]).numpy()
    np.testing.assert_allclose(plain[0], normalised[0], atol=1e-5)
    backbone = rbg.model.FeatureExtractor(tiny_model, kind="backbone", name="rbg_backbone")
    zs.tl.feature_extraction(wsi, backbone, pbar=False, batch_size=128)
    assert wsi.tables["rbg_backbone_tiles"].n_vars == tiny_model.module.n_features


def test_missing_wsidata_names_the_extra(monkeypatch):
    from rankbygene._image import require_wsidata

    monkeypatch.setitem(sys.modules, "wsidata", None)
    with pytest.raises(ImportError, match=r"rankbygene\[wsi\]"):
        require_wsidata()
    with pytest.raises(ImportError, match=r"rankbygene\[wsi\]"):
        WSIDataImage(object())


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 1536 px slide in three levels (1, 2, 4) at 0.5 um/px: tiles span several levels."""
    section = rbg.datasets.synthetic(n_slides=1, n_spots=60, n_genes=6, seed=0)
    image = section.uns["spatial"]["slide_0"]["images"]["hires"]
    image = np.ascontiguousarray(np.tile(image, (2, 2, 1))[:1536, :1536])
    return write_pyramidal_tiff(tmp_path_factory.mktemp("wsi") / "case1.tif", image, mpp=0.5)


@pytest.mark.parametrize("reader", ["openslide", "tiffslide"])
@pytest.mark.parametrize(
    "tiling",
    [{"tile_px": 128}, {"tile_px": 64, "mpp": 1.0}],
    ids=["level0-tiles-4x-the-input", "level1-tiles-2x-the-input"],
)
def test_feature_extractor_equals_get_image_representation_on_larger_tiles(
    pyramid, tiny_model, reader, tiling
):
    # the encoder's input (32 px) is smaller than the tiles: the package's own reads would take
    # a coarser level than LazySlide's tile spec; the tiles of the table are read at the spec's
    zs = pytest.importorskip("lazyslide")
    wsidata = pytest.importorskip("wsidata")
    pytest.importorskip(reader)
    wsi = wsidata.open_wsi(pyramid, store=None, reader=reader)
    assert len(wsi.properties.level_downsample) == 3
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, background_fraction=0.5, **tiling)
    features = zs.tl.feature_extraction(
        wsi, rbg.model.FeatureExtractor(tiny_model), return_features=True, pbar=False
    )
    tiles = rbg.pp.tile_slide(wsi, tile_key="tiles")
    spec = wsi.tile_spec("tiles")
    meta = tiles.uns["spatial"]["case1"]["metadata"]
    assert meta["read_downsample"] == wsi.properties.level_downsample[spec.ops_level]
    expected = tiny_model.get_image_representation(tiles, num_workers=0, progress=False)
    assert features.shape == expected.shape
    assert len(features) > 20
    np.testing.assert_allclose(features, expected, atol=1e-3)
