"""Slides opened by ``wsidata`` (LazySlide's slide container) read as a package image reader.

A :class:`wsidata.WSIData` holds a slide reader (OpenSlide, TiffSlide, BioFormats, ...) and the
LazySlide results (tissue contours, tile tables, features) in a SpatialData object.
:class:`WSIDataImage` reads the slide through that reader, so that
:func:`rankbygene.pp.tile_slide` tiles a ``WSIData`` as it tiles a file. Install the ``wsi``
extra (``pip install 'rankbygene[wsi]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rankbygene.io._image import ImageReader, as_rgb_uint8

__all__ = ["WSIDataImage", "is_wsidata", "require_wsidata"]

WSI_EXTRA_HINT = "pip install 'rankbygene[wsi]'"


def require_wsidata() -> Any:
    """Import ``wsidata``, or raise an ImportError that names the ``wsi`` extra.

    Examples
    --------
    >>> from rankbygene.io._wsidata import require_wsidata
    >>> wsidata = require_wsidata()  # doctest: +SKIP
    """
    try:
        import wsidata
    except ImportError as err:
        raise ImportError(
            f"Reading a WSIData needs wsidata and lazyslide: {WSI_EXTRA_HINT}."
        ) from err
    return wsidata


def is_wsidata(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`wsidata.WSIData` (False, without importing it, if not loaded).

    Examples
    --------
    >>> from rankbygene.io._wsidata import is_wsidata
    >>> is_wsidata("slide.svs")
    False
    """
    import sys

    module = sys.modules.get("wsidata")
    return module is not None and isinstance(obj, module.WSIData)


class WSIDataImage(ImageReader):
    """A :class:`wsidata.WSIData` read by region through its own slide reader.

    Parameters
    ----------
    wsi
        The slide, e.g. ``wsidata.open_wsi("slide.svs")``. Slides whose pyramid levels are in
        SubIFDs (as :func:`rankbygene.io.write_pyramidal_tiff` writes them) need
        ``reader="tiffslide"``: OpenSlide sees only their full-resolution level.
    mpp
        Microns per full-resolution pixel, overriding the slide's.

    Attributes
    ----------
    path
        The slide file (``None`` for a WSIData made from an in-memory SpatialData image).

    Examples
    --------
    >>> import wsidata  # doctest: +SKIP
    >>> from rankbygene.io import WSIDataImage
    >>> wsi = wsidata.open_wsi("slide.tif", reader="tiffslide", store=None)  # doctest: +SKIP
    >>> WSIDataImage(wsi).read_region(0, 0, 224, 224).shape  # doctest: +SKIP
    (224, 224, 3)
    """

    def __init__(self, wsi: Any, mpp: float | None = None) -> None:
        require_wsidata()
        if not is_wsidata(wsi):
            raise TypeError(f"Expected a wsidata.WSIData; got {type(wsi).__name__}.")
        self.wsi = wsi
        props = wsi.properties
        self.shape = (int(props.shape[0]), int(props.shape[1]))
        self.level_downsamples = tuple(float(d) for d in props.level_downsample)
        self._level_shapes = tuple((int(h), int(w)) for h, w in props.level_shape)
        found = props.mpp
        self.mpp = float(mpp) if mpp is not None else (float(found) if found else None)
        file = getattr(wsi.reader, "file", None)
        self.path = Path(file) if file is not None and Path(str(file)).is_file() else None

    def _level_shape(self, level: int) -> tuple[int, int]:
        return self._level_shapes[level]

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        down = self.level_downsamples[level]
        # wsidata takes the top-left corner in level-0 pixels and the size in level pixels
        region = self.wsi.reader.get_region(
            int(round(x * down)), int(round(y * down)), width, height, level=level
        )
        return as_rgb_uint8(np.asarray(region))

    def close(self) -> None:
        """Leave the WSIData open: it belongs to the caller."""
