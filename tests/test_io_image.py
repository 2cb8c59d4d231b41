"""Lazy image readers: in-memory arrays, PIL (JPEG/PNG), tifffile (pyramidal TIFF/SVS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from rankbygene.io import ArrayImage, PILImage, TiffImage, open_image


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (low-frequency waves plus mild noise): downscaling it is well defined."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(3):
        fy, fx = rng.uniform(1, 3, size=2)
        wave = np.sin(2 * np.pi * fy * yy / height + c) * np.cos(2 * np.pi * fx * xx / width)
        channels.append(128 + 100 * wave)
    image = np.stack(channels, axis=-1) + rng.normal(0, 2, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _box_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3)
    return blocks.mean(axis=(1, 3))


def _write_pyramid(path: Path, levels: list[np.ndarray], **kwargs: object) -> None:
    """A tiled pyramidal TIFF: level 0 with the coarser levels as SubIFDs (as tifffile/QuPath)."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(32, 32), photometric="rgb", **kwargs)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(32, 32), photometric="rgb")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _smooth_image(200, 240)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory, image: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("tiff") / "slide.tif"
    levels = [image, _box_downscale(image, 2).round().astype(np.uint8)]
    levels.append(_box_downscale(image, 4).round().astype(np.uint8))
    _write_pyramid(path, levels, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    return path


# --- in-memory arrays -------------------------------------------------------------------------


def test_array_region_equals_pixels(image: np.ndarray) -> None:
    reader = open_image(image)
    assert isinstance(reader, ArrayImage)
    assert reader.shape == (200, 240)
    np.testing.assert_array_equal(reader.read_region(30, 40, 50, 20), image[40:60, 30:80])


def test_array_region_outside_is_white(image: np.ndarray) -> None:
    region = open_image(image).read_region(-10, 190, 30, 20)
    assert region.shape == (20, 30, 3)
    np.testing.assert_array_equal(region[:10, 10:], image[190:200, 0:20])
    assert (region[:, :10] == 255).all()  # left of the image
    assert (region[10:] == 255).all()  # below the image
    # entirely outside: all white, no error
    assert (open_image(image).read_region(1000, 1000, 8, 8) == 255).all()


def test_array_out_size_resizes(image: np.ndarray) -> None:
    reader = open_image(image)
    assert reader.read_region(0, 0, 100, 80, out_size=25).shape == (25, 25, 3)
    patch = reader.read_region(0, 0, 100, 80, out_size=(50, 40))
    assert patch.shape == (40, 50, 3)
    truth = _box_downscale(image[:80, :100], 2)
    assert np.abs(patch.astype(float) - truth).mean() < 3


def test_region_size_must_be_positive(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="positive"):
        open_image(image).read_region(0, 0, 0, 10)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 5), 7, dtype=np.uint8), 7),  # grey
        (np.full((4, 5, 1), 9, dtype=np.uint8), 9),  # grey with a channel axis
        (np.dstack([np.full((4, 5, 3), 11, np.uint8), np.zeros((4, 5), np.uint8)]), 11),  # RGBA
        (np.full((4, 5, 3), 0.5, dtype=np.float32), 128),  # float in [0, 1]
        (np.full((4, 5, 3), 200.0), 200),  # float in [0, 255]
        (np.full((4, 5, 3), 257 * 100, dtype=np.uint16), 100),  # 16 bit
    ],
)
def test_array_dtypes_and_channels(array: np.ndarray, expected: int) -> None:
    region = open_image(array).read_region(0, 0, 5, 4)
    assert region.dtype == np.uint8
    assert region.shape == (4, 5, 3)
    assert (region == expected).all()


def test_array_bad_shape() -> None:
    with pytest.raises(ValueError, match="must be"):
        open_image(np.zeros((4, 5, 2), dtype=np.uint8))


def test_open_image_passes_readers_through(image: np.ndarray) -> None:
    reader = open_image(image, mpp=0.5)
    assert open_image(reader) is reader
    assert reader.mpp == 0.5


# --- PIL ----------------------------------------------------------------------------------


def test_png_region_equals_pixels(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "he.png"
    Image.fromarray(image).save(path)
    reader = open_image(path)
    assert isinstance(reader, PILImage)
    assert reader.shape == (200, 240)
    assert reader.mpp is None
    np.testing.assert_array_equal(reader.read_region(100, 50, 64, 32), image[50:82, 100:164])
    padded = reader.read_region(220, -5, 40, 10)
    np.testing.assert_array_equal(padded[5:, :20], image[0:5, 220:240])
    assert (padded[:5] == 255).all()
    assert (padded[:, 20:] == 255).all()


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_png_grey_and_rgba(tmp_path: Path, image: np.ndarray, mode: str) -> None:
    path = tmp_path / f"he_{mode}.png"
    Image.fromarray(image).convert(mode).save(path)
    region = open_image(path).read_region(0, 0, 10, 10)
    truth = np.asarray(Image.fromarray(image).convert(mode).convert("RGB"))[:10, :10]
    assert region.shape == (10, 10, 3)
    np.testing.assert_array_equal(region, truth)


def test_jpeg_thumbnail_close_to_downscale(tmp_path: Path) -> None:
    image = _smooth_image(800, 640, seed=1)
    path = tmp_path / "he.jpg"
    Image.fromarray(image).save(path, quality=95)
    reader = open_image(path)
    thumb, scale = reader.thumbnail(200)
    assert thumb.shape == (200, 160, 3)
    assert scale == pytest.approx(0.25)
    assert reader._pixels is None  # the thumbnail did not decode the full image
    assert np.abs(thumb.astype(float) - _box_downscale(image, 4)).mean() < 4
    # a region decodes the image; the pixels match those PIL decodes
    decoded = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(reader.read_region(300, 400, 50, 60), decoded[400:460, 300:350])
    # after that, thumbnails come from the decoded pixels and still agree
    thumb2, scale2 = reader.thumbnail(200)
    assert scale2 == scale
    assert np.abs(thumb2.astype(float) - thumb).mean() < 3


def test_thumbnail_never_upscales(image: np.ndarray) -> None:
    thumb, scale = open_image(image).thumbnail(1000)
    assert scale == 1.0
    np.testing.assert_array_equal(thumb, image)


# --- tifffile -----------------------------------------------------------------------------


def test_tiff_levels_and_mpp_from_resolution_tags(pyramid: Path) -> None:
    reader = open_image(pyramid)
    assert isinstance(reader, TiffImage)
    assert reader.shape == (200, 240)
    assert reader.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    assert reader.mpp == pytest.approx(0.5)
    reader.close()


def test_tiff_region_equals_pixels(pyramid: Path, image: np.ndarray) -> None:
    with open_image(pyramid) as reader:
        np.testing.assert_array_equal(reader.read_region(33, 47, 70, 90), image[47:137, 33:103])
        padded = reader.read_region(230, 190, 20, 20)
        np.testing.assert_array_equal(padded[:10, :10], image[190:200, 230:240])
        assert (padded[10:] == 255).all()
        assert (padded[:, 10:] == 255).all()


def test_tiff_downsampled_read_uses_coarse_level(
    pyramid: Path, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = open_image(pyramid)
    assert reader.best_level(4.0) == 2
    assert reader.best_level(3.0) == 1
    assert reader.best_level(1.5) == 0
    levels_read: list[int] = []
    original = reader._read_level

    def spy(level: int, *args: int):
        levels_read.append(level)
        return original(level, *args)

    monkeypatch.setattr(reader, "_read_level", spy)
    patch = reader.read_region(40, 80, 128, 96, out_size=(32, 24))
    assert levels_read == [2]
    truth = _box_downscale(image[80:176, 40:168], 4)
    assert patch.shape == (24, 32, 3)
    assert np.abs(patch.astype(float) - truth).mean() < 2
    thumb, scale = reader.thumbnail(120)
    assert levels_read[-1] == 1  # 120 px wide needs level 1 (120 px), not level 2 (60 px)
    assert thumb.shape == (100, 120, 3)
    assert scale == pytest.approx(0.5)
    assert np.abs(thumb.astype(float) - _box_downscale(image, 2)).mean() < 2


def test_tiff_odd_sized_levels(tmp_path: Path) -> None:
    # pyramids round odd sizes down: the level is 49 rows where 99 / 2 would say 50
    image = _smooth_image(99, 100, seed=3)
    path = tmp_path / "odd.tif"
    _write_pyramid(path, [image, image[:98:2, ::2]])
    reader = open_image(path)
    assert reader._level_shape(1) == (49, 50)
    patch = reader.read_region(0, 80, 100, 19, out_size=(50, 10))
    assert patch.shape == (10, 50, 3)
    thumb, _ = reader.thumbnail(50)
    assert thumb.shape == (50, 50, 3)


def test_tiff_mpp_from_svs_description(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "slide.svs"
    description = (
        "Aperio Image Library v12.0.15\r\n"
        "240x200 [0,0 240x200] (256x256) JPEG/RGB|MPP = 0.2520|AppMag = 40"
    )
    tifffile.imwrite(path, image, photometric="rgb", description=description, metadata=None)
    reader = open_image(path)
    assert isinstance(reader, TiffImage)
    assert reader.mpp == pytest.approx(0.252)
    np.testing.assert_array_equal(reader.read_region(0, 0, 16, 16), image[:16, :16])
    assert open_image(path, mpp=0.3).mpp == 0.3  # explicit mpp wins


def test_tiff_without_resolution_has_no_mpp(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image, photometric="rgb")
    assert open_image(path).mpp is None


def test_tiff_grey(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "grey.tif"
    grey = image[..., 0]
    tifffile.imwrite(path, grey)
    region = open_image(path).read_region(5, 5, 10, 10)
    np.testing.assert_array_equal(region, np.repeat(grey[5:15, 5:15, None], 3, axis=-1))


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.jpg", "missing.tif", "missing.png"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError, match=name):
        open_image(tmp_path / name)


@pytest.mark.parametrize("name", ["x.jpg", "x.tif", "x.png"])
def test_corrupt_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match=name):
        open_image(path)


def test_truncated_jpeg_fails_on_decode(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(image).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    reader = open_image(path)  # the header is intact
    with pytest.raises(ValueError, match=r"cut\.jpg"):
        reader.thumbnail(50)
    with pytest.raises(ValueError, match=r"cut\.jpg"):
        reader.read_region(0, 0, 10, 10)


def test_unknown_backend(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "he.png"
    Image.fromarray(image).save(path)
    with pytest.raises(ValueError, match="backend"):
        open_image(path, backend="vips")  # type: ignore[arg-type]
