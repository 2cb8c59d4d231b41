"""Readers of in-memory arrays, JPEG/PNG files and OpenSlide slides, and :func:`open_image`,
which picks the reader of a source (TIFF files go to :class:`~rankbygene.io.TiffImage`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from rankbygene._image._base import ImageReader, as_rgb_uint8, is_lazy_array
from rankbygene._image._errors import corrupt_file_error, is_decoder_error, reading_file
from rankbygene._image._tiff import TIFF_SUFFIXES, TiffImage

__all__ = ["ArrayImage", "OpenSlideImage", "PILImage", "open_image"]

_OPENSLIDE_SUFFIXES = {".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"}
# PIL raises a plain ValueError for some damaged headers and chunks ("Truncated IHDR chunk")
_PIL_READ_ERRORS: tuple[type[BaseException], ...] = (ValueError,)


class ArrayImage(ImageReader):
    """An in-memory image, e.g. ``uns["spatial"][lib]["images"]["hires"]``, or a lazy array.

    A lazy array (dask, zarr, xarray: anything array-like that is not a numpy array) is kept as
    is and only the regions read are computed, so that a full-resolution image, e.g. a
    SpatialData image element, is never loaded whole.

    Parameters
    ----------
    array
        ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``; uint8, uint16 or float in [0, 1].
    mpp
        Microns per pixel, if known.
    """

    def __init__(self, array: Any, mpp: float | None = None) -> None:
        self._lazy = is_lazy_array(array)
        if self._lazy:
            shape = tuple(int(s) for s in array.shape)
            if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, 3, 4)):
                raise ValueError(
                    f"image must be (H, W), (H, W, 3) or (H, W, 4); got shape {shape}."
                )
            self._array = array
        else:
            self._array = as_rgb_uint8(array)
        height, width = self._array.shape[:2]
        self.shape = (int(height), int(width))
        if min(self.shape) < 1:  # no pixel to read: thumbnails would divide by zero
            raise ValueError(f"image has no pixels: shape {tuple(array.shape)}.")
        self.mpp = mpp

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        region = self._array[y : y + height, x : x + width]
        if not self._lazy:
            return region
        if hasattr(region, "compute"):  # dask: a patch is a few chunks, no thread pool needed
            region = region.compute(scheduler="synchronous")
        return as_rgb_uint8(np.asarray(region))


class PILImage(ImageReader):
    """A JPEG/PNG/BMP file, decoded on the first region read (these formats have no random access).

    The header alone gives the size; thumbnails of JPEGs use the decoder's draft mode and never
    decode the full image.
    """

    path: Path

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.mpp = mpp
        with _open_pil(self.path) as im:
            self.shape = (im.height, im.width)
        self._pixels: np.ndarray | None = None

    def _decoded(self) -> np.ndarray:
        if self._pixels is None:
            with (
                _open_pil(self.path) as im,
                reading_file(self.path, "image file", _PIL_READ_ERRORS),
            ):
                # converting an RGB image would hold one more full copy at the peak
                self._pixels = np.asarray(im if im.mode == "RGB" else _pil_rgb(im))
        return self._pixels

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._decoded()[y : y + height, x : x + width]

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        if self._pixels is not None:
            return super().thumbnail(max_side)
        height, width = self.shape
        scale = min(1.0, max_side / max(height, width))
        size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        with _open_pil(self.path) as im, reading_file(self.path, "image file", _PIL_READ_ERRORS):
            im.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 directly
            small = _pil_rgb(im).resize(size, Image.Resampling.BILINEAR)
        return np.asarray(small), scale

    def close(self) -> None:
        self._pixels = None


def _pil_rgb(im: Image.Image) -> Image.Image:
    """``im`` in RGB; 16-bit, 32-bit and float modes scaled by :func:`as_rgb_uint8`.

    PIL's own conversion of those modes clips every value above 255 to white.
    """
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        return Image.fromarray(as_rgb_uint8(np.asarray(im)))
    return im.convert("RGB")


class OpenSlideImage(ImageReader):
    """A slide read through OpenSlide (install the ``openslide`` extra)."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        try:
            import openslide
        except ImportError as err:
            raise ImportError(
                "Reading this slide needs OpenSlide: pip install 'rankbygene[openslide]'."
            ) from err
        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as err:
            raise ValueError(f"OpenSlide could not open {self.path}: {err}") from err
        width, height = self._slide.dimensions
        self.shape = (height, width)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        found = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.mpp = mpp if mpp is not None else (float(found) if found else None)

    def _level_shape(self, level: int) -> tuple[int, int]:
        width, height = self._slide.level_dimensions[level]
        return height, width

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        down = self.level_downsamples[level]
        # OpenSlide takes the top-left corner in level-0 coordinates
        with reading_file(self.path, "slide"):
            region = self._slide.read_region((int(x * down), int(y * down)), level, (width, height))
        return np.asarray(region.convert("RGB"))

    def close(self) -> None:
        self._slide.close()


def open_image(
    source: str | Path | np.ndarray | ImageReader,
    backend: Literal["auto", "pil", "tifffile", "openslide"] = "auto",
    mpp: float | None = None,
) -> ImageReader:
    """Open a histology image for lazy region reads.

    Parameters
    ----------
    source
        A file path, an in-memory or lazy (dask, zarr) array, or a reader (returned as is).
    backend
        ``"auto"`` picks tifffile for TIFF/SVS, OpenSlide for other slide formats (when installed)
        and PIL for JPEG/PNG.
    mpp
        Microns per pixel at full resolution, overriding what the file says.

    Returns
    -------
    An :class:`ImageReader`.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.io import open_image
    >>> reader = open_image(np.zeros((100, 200, 3), dtype=np.uint8))
    >>> reader.read_region(190, 0, 20, 10).shape  # half of it off the image, filled white
    (10, 20, 3)
    """
    if isinstance(source, ImageReader):
        return source
    if isinstance(source, np.ndarray) or is_lazy_array(source):
        return ArrayImage(source, mpp=mpp)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    suffix = (
        "".join(path.suffixes[-2:]).lower()
        if path.name.lower().endswith((".ome.tif", ".ome.tiff"))
        else path.suffix.lower()
    )
    if backend == "auto":
        if suffix in TIFF_SUFFIXES:
            backend = "tifffile"
        elif suffix in _OPENSLIDE_SUFFIXES:
            backend = "openslide"
        else:
            backend = "pil"
    if backend == "tifffile":
        return TiffImage(path, mpp=mpp)
    if backend == "openslide":
        return OpenSlideImage(path, mpp=mpp)
    if backend == "pil":
        return PILImage(path, mpp=mpp)
    raise ValueError(f"Unknown backend {backend!r}; use 'auto', 'pil', 'tifffile' or 'openslide'.")


def _open_pil(path: Path) -> Image.Image:
    # Histology images exceed PIL's decompression-bomb limit by design; the files are the user's.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Exception as err:
        if not is_decoder_error(err, _PIL_READ_ERRORS):  # e.g. a missing file: its own error
            raise
        raise corrupt_file_error(path, err, "image file") from err
    finally:
        Image.MAX_IMAGE_PIXELS = previous
