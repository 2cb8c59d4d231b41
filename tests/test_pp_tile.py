"""Whole-slide tiling: tiles at the right place and scale, background left out, bad slides."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

import rankbygene as rbg
from rankbygene.data import PatchExtractor
from rankbygene.io import TiffImage, open_image, write_pyramidal_tiff

MPP = 0.5
TISSUE_BOX = (300, 200, 1000, 850)  # x0, y0, x1, y1 of the tissue on the glass


def _glass(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([241, 240, 242], dtype=np.int16)
    noise = rng.integers(-4, 5, (height, width, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A synthetic H&E section pasted in a known box of a larger glass slide (pyramidal TIFF)."""
    section = rbg.datasets.synthetic(n_slides=1, n_spots=60, n_genes=6, n_regions=3, seed=3)
    tissue = section.uns["spatial"]["slide_0"]["images"]["hires"]
    x0, y0, x1, y1 = TISSUE_BOX
    # the section's own glass margin is cropped: the box is all tissue (no adipose either)
    margin = 150
    crop = tissue[margin : margin + y1 - y0, margin : margin + x1 - x0]
    image = _glass(1400, 1600)
    image[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    path = write_pyramidal_tiff(
        tmp_path_factory.mktemp("wsi") / "slide.tif", image, mpp=MPP, compression="zlib"
    )
    return path, image


def test_tiles_are_at_the_right_place_and_scale(slide):
    path, image = slide
    tiles = rbg.pp.tile_slide(path, tile_size_um=32)  # 64 px at 0.5 um/px
    side = 64
    lib = "slide"
    entry = tiles.uns["spatial"][lib]
    assert entry["scalefactors"]["spot_diameter_fullres"] == side
    assert entry["metadata"]["source_image_path"] == str(path.resolve())
    assert entry["metadata"]["mpp"] == pytest.approx(MPP)
    assert set(tiles.obs.columns) >= {"library_id", "array_row", "array_col", "tissue_fraction"}
    assert (tiles.obs["library_id"] == lib).all()
    assert (tiles.obs["tissue_fraction"] >= 0.5).all()
    centres = tiles.obsm["spatial"]
    # a regular grid from the origin, in full-resolution pixels
    np.testing.assert_array_equal(centres[:, 0], tiles.obs["array_col"] * side + side / 2)
    np.testing.assert_array_equal(centres[:, 1], tiles.obs["array_row"] * side + side / 2)
    # the pixels the package reads for a tile are the source's pixels under it
    patches = PatchExtractor(tiles, patch_size=side)
    for i in np.linspace(0, tiles.n_obs - 1, 7).astype(int):
        x0, y0 = (centres[i] - side / 2).astype(int)
        np.testing.assert_array_equal(patches[i], image[y0 : y0 + side, x0 : x0 + side])
    # a thumbnail that squidpy can draw the tiles on
    hires = entry["images"]["hires"]
    scale = entry["scalefactors"]["tissue_hires_scalef"]
    assert hires.shape[1] == pytest.approx(image.shape[1] * scale, abs=1)
    assert entry["images"]["lowres"].shape[1] <= 600


def test_openslide_backend_reads_the_same_slide(slide):
    pytest.importorskip("openslide", reason="OpenSlide not installed (the openslide extra)")
    path, image = slide
    reader = open_image(path, backend="openslide")
    try:
        assert type(reader).__name__ == "OpenSlideImage"
        assert reader.mpp == pytest.approx(MPP)
        assert reader.shape == image.shape[:2]
        np.testing.assert_array_equal(reader.read_region(310, 220, 64, 48), image[220:268, 310:374])
    finally:
        reader.close()
    by_openslide = rbg.pp.tile_slide(path, tile_size_um=32, backend="openslide")
    by_tifffile = rbg.pp.tile_slide(path, tile_size_um=32, backend="tifffile")
    np.testing.assert_array_equal(by_openslide.obsm["spatial"], by_tifffile.obsm["spatial"])


def test_background_is_left_out(slide):
    path, _ = slide
    tiles = rbg.pp.tile_slide(path, tile_size_um=32, tissue_threshold=0.5)
    x0, y0, x1, y1 = TISSUE_BOX
    centres = tiles.obsm["spatial"]
    # a kept tile has at least half of its area on the tissue box: its centre is (about) inside
    slack = 64 / 4
    assert x0 - slack <= centres[:, 0].min()
    assert centres[:, 0].max() <= x1 + slack
    assert y0 - slack <= centres[:, 1].min()
    assert centres[:, 1].max() <= y1 + slack
    # and every tile inside the box is kept
    inside = ((x1 - x0) // 64) * ((y1 - y0) // 64)
    assert inside <= tiles.n_obs <= ((x1 - x0) // 64 + 2) * ((y1 - y0) // 64 + 2)
    # lower thresholds keep more tiles, a threshold of 1 keeps only fully covered ones
    loose = rbg.pp.tile_slide(path, tile_size_um=32, tissue_threshold=0.05)
    strict = rbg.pp.tile_slide(path, tile_size_um=32, tissue_threshold=1.0)
    assert strict.n_obs < tiles.n_obs < loose.n_obs
    assert (strict.obs["tissue_fraction"] == 1.0).all()


def test_mpp_sets_the_tile_side_and_stride(slide):
    path, _ = slide
    tiles = rbg.pp.tile_slide(path, tile_size_um=32, mpp=0.25)  # overrides the file: 128 px
    assert tiles.uns["spatial"]["slide"]["scalefactors"]["spot_diameter_fullres"] == 128
    overlapping = rbg.pp.tile_slide(path, tile_size_um=32, stride_um=16)
    assert overlapping.uns["spatial"]["slide"]["metadata"]["stride_px"] == 32
    assert overlapping.n_obs > 3 * rbg.pp.tile_slide(path, tile_size_um=32).n_obs


def test_thumbnail_streams_from_the_pyramid(slide, monkeypatch):
    path, _ = slide
    reads = []
    original = TiffImage._read_level

    def spy(self, level, x, y, width, height):
        reads.append((level, width * height))
        return original(self, level, x, y, width, height)

    monkeypatch.setattr(TiffImage, "_read_level", spy)
    tiles = rbg.pp.tile_slide(path, tile_size_um=32, thumbnail_size=300)
    # the mask is at 8 um/px (1/16 of full resolution): read from a coarse level, not level 0
    assert reads
    assert all(level > 0 for level, _ in reads)
    with_level = rbg.pp.tile_slide(path, tile_size_um=32, level=1)
    assert abs(with_level.n_obs - tiles.n_obs) <= 0.1 * tiles.n_obs


def test_plain_image_with_mpp(tmp_path, slide):
    _, image = slide
    png = tmp_path / "slide.png"
    Image.fromarray(image).save(png)
    tiles = rbg.pp.tile_slide(png, tile_size_um=32, mpp=MPP, library_id="plain")
    reference = rbg.pp.tile_slide(slide[0], tile_size_um=32)
    assert list(tiles.uns["spatial"]) == ["plain"]
    assert abs(tiles.n_obs - reference.n_obs) <= 0.05 * reference.n_obs


def test_model_and_squidpy_work_on_tiles(slide, tiny_model):
    import squidpy as sq

    path, _ = slide
    tiles = rbg.pp.tile_slide(path, tile_size_um=32)
    embedding = tiny_model.get_image_representation(tiles, batch_size=64)
    assert embedding.shape == (tiles.n_obs, 8)
    assert np.isfinite(embedding).all()
    predicted = tiny_model.predict_expression(tiles, copy=True)
    assert predicted.n_obs == tiles.n_obs
    assert "rankbygene_predicted" in predicted.layers
    sq.gr.spatial_neighbors(predicted, coord_type="grid", n_neighs=4)
    assert predicted.obsp["spatial_connectivities"].sum() > 2 * tiles.n_obs


def test_small_tiles_warn_before_upsampling(slide, tiny_model):
    path, _ = slide
    tiles = rbg.pp.tile_slide(path, tile_size_um=8, tissue_threshold=0.9)  # 16 px < 32 px input
    with pytest.warns(UserWarning, match="upsampled"):
        tiny_model.get_image_representation(tiles[:5].copy())
    big = rbg.pp.tile_slide(path, tile_size_um=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tiny_model.get_image_representation(big[:5].copy())


# ------------------------------------------------------------------------------ bad input


def test_missing_and_unreadable_slides(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent.tif"):
        rbg.pp.tile_slide(tmp_path / "absent.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match=r"Could not open slide .*broken.tif"):
        rbg.pp.tile_slide(broken)


def test_no_mpp_in_file_nor_given(tmp_path, slide):
    _, image = slide
    path = write_pyramidal_tiff(tmp_path / "nompp.tif", image[:600, :600], mpp=None)
    assert open_image(path).mpp is None
    with pytest.raises(ValueError, match=r"nompp.tif has no microns per pixel.*mpp="):
        rbg.pp.tile_slide(path)
    assert rbg.pp.tile_slide(path, mpp=MPP, tile_size_um=32, tissue_threshold=0.0).n_obs > 0


def test_slide_without_tissue(tmp_path):
    path = write_pyramidal_tiff(tmp_path / "blank.tif", _glass(800, 900), mpp=MPP)
    with pytest.raises(ValueError, match=r"No tissue found in slide .*blank.tif"):
        rbg.pp.tile_slide(path)


def test_bad_tile_arguments(slide):
    path, _ = slide
    with pytest.raises(ValueError, match="tile_size_um"):
        rbg.pp.tile_slide(path, tile_size_um=0)
    with pytest.raises(ValueError, match="larger than the slide"):
        rbg.pp.tile_slide(path, tile_size_um=10_000)
    with pytest.raises(ValueError, match="tissue_threshold"):
        rbg.pp.tile_slide(path, tissue_threshold=1.5)
    with pytest.raises(ValueError, match="mpp"):
        rbg.pp.tile_slide(path, mpp=-1)
    with pytest.raises(ValueError, match="pyramid levels"):
        rbg.pp.tile_slide(path, level=9)
