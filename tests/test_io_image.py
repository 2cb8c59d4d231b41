"""Lazy image readers: in-memory arrays, PIL (JPEG/PNG), tifffile (pyramidal TIFF/SVS)."""

from __future__ import annotations

import io
import os
import signal
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from rankbygene._image import as_rgb_uint8
from rankbygene.io import ArrayImage, PILImage, TiffImage, open_image, write_pyramidal_tiff


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


RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.dstack([RAMP.astype(np.uint16) * 257] * 3), RAMP),  # 16-bit RGB
        (RAMP.astype(np.uint16) * 257, RAMP),  # 16-bit grey
        ((RAMP.astype(np.uint16) * 257).astype(">u2"), RAMP),  # big-endian, as PIL's I;16B
        (RAMP.astype(np.int32) * 257, RAMP),  # 16-bit grey as PIL's mode I holds it
        (RAMP / 255.0, RAMP),  # float in [0, 1]
        (RAMP.astype(np.float32) * 257, RAMP),  # float holding 16-bit values
        (RAMP, RAMP),  # grey uint8
        (np.dstack([RAMP] * 3 + [np.zeros_like(RAMP)]), RAMP),  # RGBA: alpha dropped
        (np.dstack([RAMP.astype(np.uint16) * 257] * 4), RAMP),  # 16-bit RGBA
        (RAMP.astype(np.int64), RAMP),  # integers of 8-bit values
        (np.full((16, 16), 1000, np.uint16), np.full((16, 16), 4, np.uint8)),  # dark stays dark
        (RAMP > 127, np.where(RAMP > 127, 255, 0)),  # a mask
        (np.where(RAMP > 0, RAMP / 255.0, np.nan), RAMP),  # NaN: black
    ],
)
def test_as_rgb_uint8_scales_by_the_range_not_clipping(array, expected) -> None:
    rgb = as_rgb_uint8(array)
    assert rgb.dtype == np.uint8
    assert rgb.shape == (16, 16, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def _write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (grey, RGB or RGBA), written by hand: PIL cannot write 16-bit colour."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + tag + data + crc

    rows = pixels.reshape(height, width * channels).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row
    size = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    header = size + bytes([16, colour_type, 0, 0, 0])  # 16 bits, no interlace
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("kind", "suffix"),
    [
        ("grey16", ".png"),
        ("rgb16", ".png"),
        ("rgba16", ".png"),
        ("grey16", ".tif"),
        ("rgb16", ".tif"),
        ("float", ".tif"),
        ("grey8", ".png"),
    ],
)
def test_16_bit_grey_and_float_files_are_scaled_not_clipped(
    tmp_path: Path, image: np.ndarray, kind: str, suffix: str
) -> None:
    truth = image[:60, :80]
    if kind.startswith("grey"):
        truth = np.repeat(truth[..., :1], 3, axis=-1)
    wide = truth.astype(np.uint16) * 257
    pixels = {
        "grey16": wide[..., 0],
        "rgb16": wide,
        "rgba16": np.dstack([wide, np.full(wide.shape[:2], 65535, np.uint16)]),
        "float": truth / np.float32(255),
        "grey8": truth[..., 0],
    }[kind]
    path = tmp_path / f"{kind}{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, pixels)
    elif kind in ("grey16", "grey8"):
        Image.fromarray(pixels).save(path)  # PIL writes 16-bit grey (mode I;16)
    else:
        _write_png16(path, pixels)
    reader = open_image(path)
    thumb, scale = reader.thumbnail(40)  # first: a PIL file has its own path before a decode
    assert scale == pytest.approx(0.5)
    assert np.abs(thumb.astype(float) - _box_downscale(truth, 2)).mean() < 3
    np.testing.assert_array_equal(reader.read_region(0, 0, 80, 60), truth)


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


def test_truncated_png_is_named(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "cut.png"
    Image.fromarray(image).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reader = open_image(path)
    for read in (lambda: reader.thumbnail(50), lambda: reader.read_region(0, 0, 10, 10)):
        with pytest.raises(ValueError, match=r"cut\.png: it looks truncated or corrupt") as info:
            read()
        assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("tiled", [True, False])
def test_truncated_pyramidal_tiff_is_named(tmp_path: Path, image: np.ndarray, tiled: bool) -> None:
    # the header and tags survive (written first), the pixel data is cut: the decoder fails
    # (a bare imagecodecs DeflateError before) only when pixels are read
    path = tmp_path / "cut.tif"
    layout = {"tile": (32, 32)} if tiled else {"rowsperstrip": 16}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, photometric="rgb", compression="zlib", **layout)
        small = image[::2, ::2].copy()
        tif.write(small, subfiletype=1, photometric="rgb", compression="zlib", **layout)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reader = open_image(path)
    assert reader.shape == image.shape[:2]
    with pytest.raises(ValueError, match=r"cut\.tif: it looks truncated or corrupt"):
        reader.read_region(0, 0, image.shape[1], image.shape[0])
    with pytest.raises(ValueError, match=r"cut\.tif: it looks truncated or corrupt"):
        open_image(path).thumbnail(50)


def test_missing_file_during_read_is_not_called_corrupt(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "gone.png"
    Image.fromarray(image).save(path)
    reader = open_image(path)
    path.unlink()  # e.g. a network share that went away
    with pytest.raises(FileNotFoundError):
        reader.read_region(0, 0, 10, 10)


def test_unknown_backend(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "he.png"
    Image.fromarray(image).save(path)
    with pytest.raises(ValueError, match="backend"):
        open_image(path, backend="vips")  # type: ignore[arg-type]


# --- tifffile: the chunk reader -----------------------------------------------------------
# TiffImage decodes only the tiles or strips a region overlaps and caches them; every read must
# give the pixels tifffile's zarr store gives (the reader it replaced), and the source's pixels
# where the compression is lossless.


def _zarr_only(reader: TiffImage) -> TiffImage:
    """The same file read through tifffile's zarr store only (the reader before the cache)."""
    reader._grids = [None] * len(reader._grids)
    return reader


def _random_boxes(height: int, width: int, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Random boxes, some across or beyond the edges, plus corners, edges and the whole image."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        x, y = int(rng.integers(-40, width + 10)), int(rng.integers(-40, height + 10))
        w, h = (int(v) for v in rng.integers(1, 120, size=2))
        boxes.append((x, y, w, h))
    boxes += [
        (0, 0, 1, 1),
        (width - 1, height - 1, 1, 1),
        (width - 5, height - 7, 30, 30),  # bottom-right corner, mostly outside
        (-10, -12, 25, 20),  # top-left corner, mostly outside
        (0, height - 3, width, 9),  # the last rows, the last strip
        (width + 5, 0, 10, 10),  # entirely outside
        (0, 0, width, height),
    ]
    return boxes


def _assert_reads_like_zarr(path: Path, source: np.ndarray | None, seed: int = 0) -> TiffImage:
    """Random regions equal the zarr store's (and ``source``'s, if lossless) at full resolution."""
    reader = TiffImage(path)
    old = _zarr_only(TiffImage(path))
    truth = None if source is None else open_image(source)
    height, width = reader.shape
    for x, y, w, h in _random_boxes(height, width, 40, seed):
        region = reader.read_region(x, y, w, h)
        np.testing.assert_array_equal(region, old.read_region(x, y, w, h), err_msg=f"{x, y, w, h}")
        if truth is not None:
            np.testing.assert_array_equal(region, truth.read_region(x, y, w, h))
    assert reader.cache_info().misses > 0  # the chunk reader read them ...
    assert all(grid is not None for grid in reader._grids)  # ... and never fell back
    old.close()
    return reader


def _rgba(image: np.ndarray) -> np.ndarray:
    alpha = np.arange(image.shape[0] * image.shape[1], dtype=np.uint8).reshape(image.shape[:2])
    return np.dstack([image, alpha])


# name: (channels, tifffile.imwrite options, lossless)
_LAYOUTS = {
    "tiled jpeg (YCbCr 4:2:0, as SVS)": ("rgb", {"tile": (32, 48), "compression": "jpeg"}, False),
    "tiled jpeg 4:4:4": (
        "rgb",
        {"tile": (32, 32), "compression": "jpeg", "subsampling": (1, 1)},
        False,
    ),
    "tiled deflate": ("rgb", {"tile": (32, 48), "compression": "zlib"}, True),
    "tiled deflate + predictor": (
        "rgb",
        {"tile": (16, 32), "compression": "zlib", "predictor": True},
        True,
    ),
    "tiled lzw": ("rgb", {"tile": (32, 32), "compression": "lzw"}, True),
    "tiled uncompressed": ("rgb", {"tile": (16, 16)}, True),
    "strips uncompressed": ("rgb", {"rowsperstrip": 7}, True),
    "strips deflate": ("rgb", {"rowsperstrip": 13, "compression": "zlib"}, True),
    "strips jpeg": ("rgb", {"rowsperstrip": 16, "compression": "jpeg"}, False),
    "one strip": ("rgb", {"rowsperstrip": 10_000, "compression": "zlib"}, True),
    "rgba tiled deflate": ("rgba", {"tile": (32, 32), "compression": "zlib"}, True),
    "rgba strips uncompressed": ("rgba", {"rowsperstrip": 9}, True),
    "grey tiled jpeg": ("grey", {"tile": (32, 32), "compression": "jpeg"}, False),
    "grey tiled deflate": ("grey", {"tile": (32, 32), "compression": "zlib"}, True),
    "grey strips lzw": ("grey", {"rowsperstrip": 11, "compression": "lzw"}, True),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_tiff_chunk_reader_equals_zarr_store(tmp_path: Path, layout: str) -> None:
    channels, options, lossless = _LAYOUTS[layout]
    # odd sizes: the last row and column of tiles, and the last strip, are partial
    image = _smooth_image(203, 245, seed=7)
    if channels == "rgba":
        image = _rgba(image)
    elif channels == "grey":
        image = image[..., 1]
    photometric = "minisblack" if channels == "grey" else "rgb"
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, photometric=photometric, metadata=None, **options)
    reader = _assert_reads_like_zarr(path, image if lossless else None)
    if not lossless:  # still the image, not just the same wrong pixels
        region = reader.read_region(0, 0, 245, 203).astype(float)
        assert np.abs(region - as_rgb_uint8(image)).mean() < 4
    reader.close()


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_tiff_chunk_reader_pyramid_levels(tmp_path: Path, compression: str) -> None:
    image = _smooth_image(700, 900, seed=8)
    path = write_pyramidal_tiff(
        tmp_path / "slide.tif", image, mpp=0.5, tile=64, min_side=200, compression=compression
    )
    reader = _assert_reads_like_zarr(path, image if compression == "zlib" else None)
    old = _zarr_only(TiffImage(path))
    assert len(reader.level_downsamples) == 4
    assert reader._level_shape(3) == old._level_shape(3) == (87, 112)
    rng = np.random.default_rng(1)
    # every level directly, boxes inside it (as read_region asks)
    for level in range(4):
        height, width = reader._level_shape(level)
        for _ in range(15):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            w, h = int(rng.integers(1, width - x + 1)), int(rng.integers(1, height - y + 1))
            np.testing.assert_array_equal(
                reader._read_level(level, x, y, w, h), old._read_level(level, x, y, w, h)
            )
    # downsampled reads pick the same level and resize the same pixels
    for _ in range(20):
        x, y = int(rng.integers(-100, 900)), int(rng.integers(-100, 700))
        side = int(rng.integers(16, 800))
        out = int(rng.integers(8, 64))
        np.testing.assert_array_equal(
            reader.read_region(x, y, side, side, out_size=out),
            old.read_region(x, y, side, side, out_size=out),
        )
    np.testing.assert_array_equal(reader.thumbnail(150)[0], old.thumbnail(150)[0])
    assert all(grid is not None for grid in reader._grids)


def _split_jpeg_tables(stream: bytes) -> tuple[bytes, bytes]:
    """A JPEG stream as (tables, abbreviated stream): its DQT and DHT segments moved out."""
    pos, tables, rest = 2, [], []
    while True:
        marker = stream[pos : pos + 2]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        (tables if marker in (b"\xff\xdb", b"\xff\xc4") else rest).append(
            stream[pos : pos + 2 + length]
        )
        pos += 2 + length
        if marker == b"\xff\xda":  # start of scan: entropy-coded data to the end
            rest.append(stream[pos:])
            break
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest)


def test_tiff_chunk_reader_svs_jpeg_tables(tmp_path: Path) -> None:
    # Aperio SVS: the quantisation and Huffman tables are in the page's JPEGTables tag, each tile
    # an abbreviated JPEG stream without them
    image = _smooth_image(200, 240, seed=9)
    tile = 64
    segments, tables = [], set()
    for y in range(0, 200, tile):
        for x in range(0, 240, tile):
            block = np.zeros((tile, tile, 3), dtype=np.uint8)
            part = image[y : y + tile, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            buffer = io.BytesIO()
            Image.fromarray(block).save(buffer, "JPEG", quality=90, subsampling=0)
            table, segment = _split_jpeg_tables(buffer.getvalue())
            tables.add(table)
            segments.append(segment)
    assert len(tables) == 1
    path = tmp_path / "slide.svs"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            iter(segments),
            shape=(200, 240, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            compression="jpeg",
            photometric="ycbcr",
            subsampling=(1, 1),
            jpegtables=tables.pop(),
            description="Aperio Image Library v12.0.15\r\n240x200 (64x64) JPEG/RGB|MPP = 0.25",
            metadata=None,
        )
    reader = _assert_reads_like_zarr(path, None)
    assert reader._tif.pages[0].jpegtables is not None
    assert reader.mpp == pytest.approx(0.25)
    assert np.abs(reader.read_region(0, 0, 240, 200).astype(float) - image).mean() < 3


@pytest.mark.parametrize("kind", ["planar separate", "uint16"])
def test_tiff_unusual_pages_read_through_zarr(tmp_path: Path, kind: str) -> None:
    source = _smooth_image(60, 70, seed=2)
    path = tmp_path / "odd.tif"
    if kind == "planar separate":  # colour planes one after the other: (S, Y, X) in the file
        planes = np.moveaxis(source, -1, 0)
        tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate", tile=(16, 16))
    else:
        source = source.astype(np.uint16) * 257
        tifffile.imwrite(path, source, photometric="rgb", tile=(16, 16))
    reader = TiffImage(path)
    assert reader._grids == [None]  # left to tifffile's zarr store
    truth = open_image(source)
    for x, y, w, h in _random_boxes(60, 70, 10, seed=3):
        np.testing.assert_array_equal(reader.read_region(x, y, w, h), truth.read_region(x, y, w, h))
    assert reader.cache_info().misses == 0


def test_tiff_chunk_reader_failure_falls_back_to_zarr(
    tmp_path: Path, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, photometric="rgb", tile=(32, 32), compression="zlib")
    reader = TiffImage(path)
    grid = reader._grids[0]

    def broken(data: bytes | None, index: int) -> np.ndarray:
        raise RuntimeError("decoder says no")

    monkeypatch.setattr(grid, "decode", broken)
    np.testing.assert_array_equal(reader.read_region(10, 20, 50, 40), image[20:60, 10:60])
    assert reader._grids[0] is None  # the store read it: that level stays with the store
    np.testing.assert_array_equal(reader.read_region(100, 0, 30, 30), image[0:30, 100:130])


def test_tiff_corrupt_chunk_raises_and_keeps_the_chunk_reader(tmp_path: Path) -> None:
    image = _smooth_image(64, 64, seed=4)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image, photometric="rgb", tile=(32, 32), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\x00" * 16  # the first tile is no longer a zlib stream
    path.write_bytes(bytes(data))
    reader = TiffImage(path)
    with pytest.raises(ValueError, match=r"slide\.tif: it looks truncated or corrupt") as info:
        reader.read_region(0, 0, 10, 10)
    assert info.value.__cause__ is not None  # the decoder's own error, chained
    assert reader._grids[0] is not None  # the file is at fault, not the chunk reader
    np.testing.assert_array_equal(reader.read_region(40, 40, 20, 20), image[40:60, 40:60])


# --- tifffile: the decoded-chunk cache ------------------------------------------------------


@pytest.fixture
def tiled(tmp_path: Path, image: np.ndarray) -> Path:
    """200 x 240 RGB in 32 px deflate tiles: 7 rows of 8, 3,072 bytes each decoded."""
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, image, photometric="rgb", tile=(32, 32), compression="zlib")
    return path


def test_tiff_cache_hits_on_repeated_reads(tiled: Path, image: np.ndarray) -> None:
    reader = TiffImage(tiled)
    assert reader.cache_info() == (0, 0, 0, 64 * 2**20, 0)
    np.testing.assert_array_equal(reader.read_region(10, 20, 40, 30), image[20:50, 10:50])
    assert reader.cache_info()[:3] == (0, 4, 4 * 3072)  # tiles (0, 0), (0, 1), (1, 0), (1, 1)
    np.testing.assert_array_equal(reader.read_region(10, 20, 40, 30), image[20:50, 10:50])
    assert reader.cache_info()[:2] == (4, 4)  # decoded once
    # the next tile along shares its left tiles with the last one
    np.testing.assert_array_equal(reader.read_region(50, 20, 40, 30), image[20:50, 50:90])
    assert reader.cache_info()[:2] == (6, 6)
    reader.close()
    assert reader.cache_info().n_chunks == 0


def test_tiff_cache_is_bounded(tiled: Path, image: np.ndarray) -> None:
    reader = TiffImage(tiled, cache_bytes=10 * 3072 + 100)  # room for ten tiles
    truth = open_image(image)
    rng = np.random.default_rng(5)
    for _ in range(200):
        x, y = int(rng.integers(-20, 240)), int(rng.integers(-20, 200))
        w, h = (int(v) for v in rng.integers(1, 33, size=2))  # at most 2 x 2 tiles
        np.testing.assert_array_equal(reader.read_region(x, y, w, h), truth.read_region(x, y, w, h))
        info = reader.cache_info()
        assert info.nbytes <= info.max_bytes
        assert info.n_chunks <= 10
    info = reader.cache_info()
    assert info.misses > 56  # tiles were evicted and decoded again ...
    assert info.hits > 0  # ... and neighbours still found theirs
    assert info.n_chunks == 10  # full, never over


def test_tiff_large_reads_do_not_flush_the_cache(tiled: Path, image: np.ndarray) -> None:
    reader = TiffImage(tiled, cache_bytes=10 * 3072)
    reader.read_region(0, 0, 40, 40)
    assert reader.cache_info().n_chunks == 4
    # 56 tiles, more than half the cache: decoded, pasted, not kept
    np.testing.assert_array_equal(reader.read_region(0, 0, 240, 200), image)
    info = reader.cache_info()
    assert info.n_chunks == 4
    assert info.hits == 4  # what was cached was used
    reader.read_region(0, 0, 40, 40)
    assert reader.cache_info().hits == 8


def test_tiff_cache_disabled(tiled: Path, image: np.ndarray) -> None:
    reader = TiffImage(tiled, cache_bytes=0)
    for _ in range(2):
        np.testing.assert_array_equal(reader.read_region(10, 20, 40, 30), image[20:50, 10:50])
    assert reader.cache_info()[:3] == (0, 8, 0)


def test_tiff_cached_chunks_are_not_shared_with_callers(tiled: Path, image: np.ndarray) -> None:
    reader = TiffImage(tiled)
    reader.read_region(0, 0, 32, 32)[:] = 0  # exactly one cached tile, scribbled over
    np.testing.assert_array_equal(reader._read_level(0, 0, 0, 32, 32), image[:32, :32])
    np.testing.assert_array_equal(reader.read_region(0, 0, 32, 32), image[:32, :32])


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64MB"])
def test_tiff_cache_bytes_must_be_a_size(tiled: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="cache_bytes"):
        TiffImage(tiled, cache_bytes=bad)  # type: ignore[arg-type]


def test_tiff_reader_shared_between_threads(tiled: Path, image: np.ndarray) -> None:
    reader = TiffImage(tiled, cache_bytes=12 * 3072)  # small: threads evict each other's tiles
    truth = open_image(image)

    def read(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        for _ in range(100):
            x, y = int(rng.integers(-10, 230)), int(rng.integers(-10, 190))
            w, h = (int(v) for v in rng.integers(1, 40, size=2))
            if not np.array_equal(reader.read_region(x, y, w, h), truth.read_region(x, y, w, h)):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, range(4)))
    assert reader.cache_info().nbytes <= 12 * 3072


def test_tiff_chunks_decoded_on_threads(tiled: Path, image: np.ndarray) -> None:
    # as tifffile's store does on machines with 6 cores or more; 2 here would not use threads
    reader = TiffImage(tiled)
    reader._grids[0].maxworkers = 3
    truth = open_image(image)
    for x, y, w, h in _random_boxes(200, 240, 30, seed=6):
        np.testing.assert_array_equal(reader.read_region(x, y, w, h), truth.read_region(x, y, w, h))
    assert reader._executor is not None
    reader.close()
    assert reader._executor is None


def test_tiff_reader_inherited_by_a_forked_process(tiled: Path, image: np.ndarray) -> None:
    reader = TiffImage(tiled)
    reader._grids[0].maxworkers = 3
    reader.read_region(0, 0, 100, 100)  # threads started, chunks cached
    pid = os.fork()
    if pid == 0:  # child: the parent's threads are gone; reading must neither hang nor fail
        signal.alarm(30)
        ok = np.array_equal(reader.read_region(0, 0, 240, 200), image)  # hits and misses
        ok = ok and reader._executor is not None and reader._pid == os.getpid()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(reader.read_region(100, 100, 140, 100), image[100:, 100:])


def test_pyramidal_tiff_opens_in_openslide_with_every_level(tmp_path):
    openslide = pytest.importorskip("openslide")
    image = np.random.default_rng(0).integers(0, 256, (1100, 1300, 3), dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "slide.tif", image, mpp=0.25, tile=128)
    ours = open_image(path)
    slide = openslide.OpenSlide(str(path))
    assert slide.level_count == len(ours.level_downsamples) == 3
    np.testing.assert_allclose(slide.level_downsamples, ours.level_downsamples, rtol=1e-3)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    for level, down in enumerate(ours.level_downsamples):
        region = np.asarray(slide.read_region((200, 100), level, (64, 48)))[..., :3]
        x, y, w, h = 200, 100, 64 * down, 48 * down
        np.testing.assert_array_equal(region, ours.read_region(x, y, w, h, downsample=down))
