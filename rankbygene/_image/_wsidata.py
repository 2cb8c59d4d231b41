"""Slides opened by ``wsidata`` (LazySlide's slide container) read as a package image reader.

A :class:`wsidata.WSIData` holds a slide reader (OpenSlide, TiffSlide, BioFormats, ...) and the
LazySlide results (tissue contours, tile tables, features) in a SpatialData object.
:class:`WSIDataImage` reads the slide through that reader, so that
:func:`rankbygene.pp.tile_slide` tiles a ``WSIData`` as it tiles a file. Install the ``wsi``
extra (``pip install 'rankbygene[wsi]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rankbygene._image._base import ImageReader, as_rgb_uint8

__all__ = ["TileBoxes", "WSIDataImage", "is_wsidata", "require_wsidata", "table_boxes"]

WSI_EXTRA_HINT = "pip install 'rankbygene[wsi]'"


def require_wsidata() -> Any:
    """Import ``wsidata``, or raise an ImportError that names the ``wsi`` extra.

    Examples
    --------
    >>> from rankbygene._image import require_wsidata
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
    >>> from rankbygene._image import is_wsidata
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
        SubIFDs (OME-TIFF, some QuPath exports) need ``reader="tiffslide"``: OpenSlide sees only
        their full-resolution level. :func:`rankbygene.io.write_pyramidal_tiff` keeps its levels
        as pages, which every reader sees.
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


class TileBoxes(NamedTuple):
    """Square tiles given by a tile table: grid positions, top-left corners, side and stride."""

    key: str
    rows: np.ndarray
    cols: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    side: int
    stride: int
    names: np.ndarray
    columns: dict[str, np.ndarray]
    read_downsample: float | None = None


def table_boxes(wsi: Any, tile_key: str) -> TileBoxes:
    """The square tiles of a WSIData's tile table ``wsi.shapes[tile_key]`` in level-0 pixels.

    Parameters
    ----------
    wsi
        A :class:`wsidata.WSIData`.
    tile_key
        Its tile table, e.g. ``"tiles"`` from ``lazyslide.pp.tile_tissues``.

    Returns
    -------
    :class:`TileBoxes`: grid rows and columns (from the tiles' corners and the stride), corners,
    side and stride (the table's ``TileSpec`` when it has one), names (``tile_id`` or position),
    the ``tile_id``/``tissue_id`` columns and the downsample of the pyramid level the spec reads
    the tiles from (``None`` without a spec).

    Examples
    --------
    >>> from rankbygene._image import table_boxes
    >>> boxes = table_boxes(wsi, "tiles")  # doctest: +SKIP
    >>> boxes.side, len(boxes.x0)  # doctest: +SKIP
    (224, 1830)
    """
    if tile_key not in wsi.shapes:
        found = ", ".join(map(repr, wsi.shapes)) or "none"
        raise KeyError(
            f"The WSIData has no tile table {tile_key!r} (shapes: {found}); run "
            "lazyslide.pp.tile_tissues(wsi, ...) first or pass tile_key=None."
        )
    table = wsi.shapes[tile_key]
    if len(table) == 0:
        raise ValueError(f"The WSIData's tile table {tile_key!r} has no tiles.")
    bounds = table.bounds[["minx", "miny", "maxx", "maxy"]].to_numpy(dtype=np.float64)
    x0, y0 = np.round(bounds[:, 0]).astype(np.int64), np.round(bounds[:, 1]).astype(np.int64)
    widths = np.round(bounds[:, 2] - bounds[:, 0]).astype(np.int64)
    heights = np.round(bounds[:, 3] - bounds[:, 1]).astype(np.int64)
    side = int(widths[0])
    if not ((widths == side).all() and (heights == side).all()) or side < 1:
        raise ValueError(
            f"The tiles of {tile_key!r} are not squares of one size (widths {widths.min()}.."
            f"{widths.max()}, heights {heights.min()}..{heights.max()} px): the package's tiles "
            "are square."
        )
    spec = wsi.tile_spec(tile_key)
    stride = side if spec is None else int(round(spec.base_stride_width))
    stride = max(stride, 1)
    rows = (y0 - y0.min()) // stride
    cols = (x0 - x0.min()) // stride
    columns = {c: table[c].to_numpy() for c in ("tile_id", "tissue_id") if c in table.columns}
    names = columns.get("tile_id", np.arange(len(table)))
    read_downsample = None
    if spec is not None:  # LazySlide's feature extraction reads the tiles at this level
        read_downsample = float(wsi.properties.level_downsample[int(spec.ops_level)])
    return TileBoxes(
        tile_key, rows, cols, x0, y0, side, stride, np.asarray(names), columns, read_downsample
    )
