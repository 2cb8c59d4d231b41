"""Writing an image as a tiled pyramidal TIFF, the layout whole-slide readers expect."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rankbygene._logging import logger

__all__ = ["write_pyramidal_tiff"]


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None = None,
    tile: int = 256,
    min_side: int = 512,
    compression: str | None = "zlib",
) -> Path:
    """Write an RGB image as a tiled pyramidal TIFF that whole-slide readers open with all levels.

    The levels follow each other as pages of the file, the coarser ones marked reduced-resolution
    (``NewSubfileType`` 1): OpenSlide's generic-TIFF layout, which OpenSlide (hence wsidata's and
    LazySlide's default reader), TiffSlide, tifffile and :func:`~rankbygene.io.open_image` read
    as a pyramid. (Levels in SubIFDs, as OME-TIFF keeps them, are seen by OpenSlide as one
    level.) Written to a temporary file, then renamed: a reader never sees half a slide.

    Parameters
    ----------
    path
        Output file (``.tif``).
    image
        ``(H, W, 3)`` uint8 image.
    mpp
        Microns per pixel, written as resolution tags (pixels per centimetre) and as ``MPP =``
        in the description (as Aperio SVS files); ``None`` writes neither.
    tile
        Tile side in pixels (a multiple of 16).
    min_side
        Levels halve the previous one until the long side is at most this.
    compression
        ``"zlib"`` (lossless), ``"jpeg"`` or ``None``.

    Returns
    -------
    The path written.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.io import open_image, write_pyramidal_tiff
    >>> image = np.full((1200, 1000, 3), 240, np.uint8)
    >>> path = write_pyramidal_tiff(tmp_path / "slide.tif", image, mpp=0.5)  # doctest: +SKIP
    >>> open_image(path).level_downsamples  # doctest: +SKIP
    (1.0, 2.0, 4.0)
    >>> openslide.OpenSlide(path).level_count  # doctest: +SKIP
    3
    """
    import tifffile

    path = Path(path)
    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8; got {image.shape} {image.dtype}.")
    levels = [image]
    while max(levels[-1].shape[:2]) > min_side:
        height, width = levels[-1].shape[:2]
        size = (max(1, width // 2), max(1, height // 2))
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize(size, Image.Resampling.BOX)))
    options: dict[str, Any] = {
        "tile": (tile, tile),
        "photometric": "rgb",
        "compression": compression,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tif.partial")
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
            for k, level in enumerate(levels):
                extra: dict[str, Any] = {}
                if mpp is not None:
                    pixels_per_cm = 1e4 / (mpp * image.shape[1] / level.shape[1])
                    extra = {"resolution": (pixels_per_cm, pixels_per_cm)}
                    extra["resolutionunit"] = "CENTIMETER"
                if k == 0:
                    description = "rankbygene synthetic slide"
                    if mpp is not None:
                        description += f"|MPP = {mpp}"
                    extra["description"] = description
                # one page per level: OpenSlide reads no pyramid kept in SubIFDs
                tif.write(level, subfiletype=int(k > 0), metadata=None, **options, **extra)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info(f"wrote {path} ({image.shape[1]} x {image.shape[0]} px, {len(levels)} levels)")
    return path
