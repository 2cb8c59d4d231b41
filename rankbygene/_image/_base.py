"""The interface of every image reader, and the pixel conversions all readers share.

Every reader answers the same two questions, ``read_region`` (a patch in full-resolution
coordinates, optionally resized) and ``thumbnail``, so the patch pipeline and whole-slide tiling
never need to know where pixels come from, and never decode a whole slide when a pyramid exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["BACKGROUND", "ImageReader", "as_rgb_uint8", "is_lazy_array", "resize"]

BACKGROUND = 255  # white glass: what lies outside a slide's pixels


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``image`` as an ``(H, W, 3)`` uint8 array, its values scaled to 0-255.

    Parameters
    ----------
    image
        ``(H, W)`` or ``(H, W, 1)`` grey (repeated to RGB), ``(H, W, 3)`` RGB or ``(H, W, 4)``
        RGBA (alpha dropped). uint8 is kept as is; uint16 (16-bit PNG/TIFF) is scaled by its
        range 0-65535; bool to 0/255. Floats and other integers are scaled by the first of 1
        (floats only: scanpy/squidpy keep images as float in [0, 1]), 255, 65535 or the image's
        own maximum that holds their values. NaN, infinite and negative values become 0.
    name
        What the image is, for the error message.

    Returns
    -------
    The RGB image; ``image`` itself, or a view of it, when it already is uint8.

    Raises
    ------
    ValueError
        The shape or dtype is none of the above.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene._image import as_rgb_uint8
    >>> as_rgb_uint8(np.full((1, 1), 65535, dtype=np.uint16)).tolist()
    [[[255, 255, 255]]]
    >>> as_rgb_uint8(np.full((1, 1, 3), 0.5)).tolist()
    [[[128, 128, 128]]]
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        # grey: scaled once, then repeated
        return np.repeat(_scaled_to_uint8(image, name)[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(
            f"{name} must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {image.shape}."
        )
    return _scaled_to_uint8(image[..., :3], name)


def _scaled_to_uint8(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` scaled from their range (see :func:`as_rgb_uint8`) to uint8."""
    kind, itemsize = values.dtype.kind, values.dtype.itemsize
    if kind == "u" and itemsize == 1:
        return values
    if kind == "b":
        return values.astype(np.uint8) * np.uint8(255)
    if kind == "u" and itemsize == 2:
        # exact rounding of x * 255 / 65535, in integers (any byte order)
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if kind not in "uif":
        raise ValueError(f"{name} must hold integers or floats; got dtype {values.dtype}.")
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(values.max(initial=0.0))
    # The range is the dtype's when the values fit it; taking the image's own maximum only
    # beyond 16 bits keeps dark images dark rather than stretching them to white.
    limits = (1.0, 255.0, 65535.0) if kind == "f" else (255.0, 65535.0)
    scale = next((limit for limit in limits if top <= limit), top)
    return np.clip(values * np.float32(255.0 / scale) + np.float32(0.5), 0, 255).astype(np.uint8)


def resize(region: np.ndarray, out_size: int | tuple[int, int] | None) -> np.ndarray:
    """``region`` resized bilinearly to ``out_size`` (``int`` or ``(width, height)``).

    Returned as it is when ``out_size`` is ``None`` or its own size.
    """
    if out_size is None:
        return region
    width, height = (out_size, out_size) if isinstance(out_size, int) else out_size
    if region.shape[1] == width and region.shape[0] == height:
        return region
    # PIL scales its filter support with the ratio, so downscaling is anti-aliased.
    return np.asarray(Image.fromarray(region).resize((width, height), Image.Resampling.BILINEAR))


class ImageReader(ABC):
    """A histology image read lazily by region.

    Coordinates are always level-0 (full-resolution) pixels, ``x`` along columns and ``y`` along
    rows, as in ``obsm["spatial"]``.

    Attributes
    ----------
    path
        The file, or ``None`` for an in-memory image.
    shape
        ``(height, width)`` at full resolution.
    level_downsamples
        Downsampling factor of each pyramid level (``(1.0,)`` without a pyramid).
    mpp
        Microns per pixel at full resolution when the file says so, else ``None``.
    """

    path: Path | None = None
    shape: tuple[int, int]
    level_downsamples: tuple[float, ...] = (1.0,)
    mpp: float | None = None

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of ``level`` in its own coordinates; the box lies inside the level."""

    def _level_shape(self, level: int) -> tuple[int, int]:
        down = self.level_downsamples[level]
        return int(round(self.shape[0] / down)), int(round(self.shape[1] / down))

    def best_level(self, downsample: float) -> int:
        """The coarsest level that still has at least the resolution asked for."""
        candidates = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(candidates, key=lambda i: self.level_downsamples[i]) if candidates else 0

    def read_region(
        self,
        x: float,
        y: float,
        width: float,
        height: float,
        out_size: int | tuple[int, int] | None = None,
        downsample: float | None = None,
    ) -> np.ndarray:
        """Read the box with top-left ``(x, y)`` and size ``width x height`` (level-0 pixels).

        Parts outside the image are white. With ``out_size`` (``int`` or ``(width, height)``),
        the patch is read from the coarsest pyramid level that suffices and resized; with
        ``downsample``, from the coarsest level at most that downsampled instead (the level
        another reader, such as a LazySlide tile spec, reads), then resized.

        Returns
        -------
        ``(height, width, 3)`` uint8 array (or the ``out_size`` shape).
        """
        if not np.isfinite([x, y, width, height]).all():
            # int() of NaN or inf would fail with an error that names no argument
            raise ValueError(f"Region must be finite; got x={x}, y={y}, {width} x {height}.")
        if width <= 0 or height <= 0:
            raise ValueError(f"Region size must be positive; got {width} x {height}.")
        if downsample is not None:
            level = self.best_level(downsample)
        elif out_size is None:
            level = 0
        else:
            out_w = out_size if isinstance(out_size, int) else out_size[0]
            level = self.best_level(width / out_w)
        down = self.level_downsamples[level]
        lx0, ly0 = int(np.floor(x / down)), int(np.floor(y / down))
        lw = max(1, int(round(width / down)))
        lh = max(1, int(round(height / down)))
        level_h, level_w = self._level_shape(level)
        canvas = np.full((lh, lw, 3), BACKGROUND, dtype=np.uint8)
        cx0, cy0 = max(lx0, 0), max(ly0, 0)
        cx1, cy1 = min(lx0 + lw, level_w), min(ly0 + lh, level_h)
        if cx1 > cx0 and cy1 > cy0:
            pixels = as_rgb_uint8(self._read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0))
            # a reader may return fewer pixels at a level's edge; the rest stays white
            ph, pw = pixels.shape[:2]
            canvas[cy0 - ly0 : cy0 - ly0 + ph, cx0 - lx0 : cx0 - lx0 + pw] = pixels
        return resize(canvas, out_size)

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        """A downscaled copy of the whole image and its scale (thumbnail pixels per level-0 pixel).

        Read from the coarsest pyramid level that is at least ``max_side`` pixels on its long side.
        """
        height, width = self.shape
        scale = min(1.0, max_side / max(height, width))
        out = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        return self.read_region(0, 0, width, height, out_size=out), scale

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        source = self.path if self.path is not None else "in memory"
        levels = len(self.level_downsamples)
        return f"{type(self).__name__}({source}, shape={self.shape}, levels={levels})"


def is_lazy_array(obj: Any) -> bool:
    """Whether ``obj`` is an array read on demand (dask, zarr, xarray), not a numpy array.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene._image import is_lazy_array
    >>> is_lazy_array(np.zeros((2, 2)))
    False
    """
    return not isinstance(obj, np.ndarray) and all(
        hasattr(obj, name) for name in ("shape", "dtype", "ndim", "__getitem__", "__array__")
    )
