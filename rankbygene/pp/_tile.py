"""Whole-slide tiling: a grid of tissue tiles of a slide as an AnnData in the spatial layout.

The slide is never decoded at full resolution: tissue is found on a thumbnail read band by band
from the coarsest pyramid level that suffices, and the tiles' pixels are read later, lazily, by
:class:`~rankbygene.data.PatchExtractor` (hence by :meth:`RankByGene.get_image_representation`
and :meth:`RankByGene.predict_expression`) from ``metadata["source_image_path"]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from rankbygene._constants import TISSUE_FRACTION_KEY
from rankbygene._image import (
    ImageReader,
    TileBoxes,
    WSIDataImage,
    is_wsidata,
    open_image,
    table_boxes,
)
from rankbygene._layout import (
    read_thumbnail,
    scaled_size,
    shrink,
    spatial_entry,
    thumbnails,
    tissue_mask,
)
from rankbygene._layout._keys import (
    ARRAY_COL_KEY,
    ARRAY_ROW_KEY,
    LIBRARY_ID_KEY,
    METADATA_MPP,
    METADATA_READ_DOWNSAMPLE,
    METADATA_SATURATION_THRESHOLD,
    METADATA_SOURCE,
    METADATA_SOURCE_IMAGE,
    METADATA_STRIDE_PX,
    METADATA_TILE_SIZE_PX,
    METADATA_TILE_SIZE_UM,
    METADATA_TISSUE_THRESHOLD,
    SPATIAL_KEY,
)
from rankbygene._logging import logger

__all__ = ["tile_slide"]

_MASK_MIN_TILE_PX = 8  # mask pixels along a tile side, at least (when the mask size allows)
_MASK_MAX_SIDE = 8192  # longest side of the tissue mask
_LOWRES_MAX_SIDE = 600  # as Visium's tissue_lowres_image


def tile_slide(
    path: str | Path | Any,
    tile_size_um: float = 112.0,
    mpp: float | None = None,
    level: int | None = None,
    tissue_threshold: float = 0.5,
    stride_um: float | None = None,
    library_id: str | None = None,
    min_saturation: float = 0.05,
    mask_mpp: float = 8.0,
    thumbnail_size: int = 2000,
    backend: Literal["auto", "pil", "tifffile", "openslide"] = "auto",
    tile_key: str | None = None,
) -> AnnData:
    """Tile the tissue of a whole-slide image into an AnnData of tiles (squidpy spatial layout).

    Tissue is found as HEST-1k and CLAM do: Otsu's threshold on the saturation of a thumbnail
    (glass is grey-white, stained tissue is coloured), small specks removed and small holes
    filled. A regular grid of square tiles of ``tile_size_um`` microns covers the slide; tiles
    with at least ``tissue_threshold`` of their area on tissue are kept. Nothing is decoded at
    full resolution: the thumbnail comes from the coarsest pyramid level that suffices, band by
    band, and the tiles' pixels are read later, lazily, from the file (one tile = one "spot").

    Parameters
    ----------
    path
        The slide: a pyramidal TIFF, OME-TIFF or SVS (tifffile), an ``.ndpi``/``.mrxs``/... slide
        (OpenSlide, with the ``openslide`` extra), or a plain JPEG/PNG/TIFF with ``mpp`` given.
        Or a :class:`wsidata.WSIData` (LazySlide's slide, with the ``wsi`` extra): the thumbnail
        is read through its reader (:class:`~rankbygene.io.WSIDataImage`) and the tiles' pixels
        later from its file (``wsi.reader.file``) by the package's readers.
    tile_size_um
        Tile side in microns (112 um, i.e. 224 px at 0.5 um/px, as HEST-1k patches).
    mpp
        Microns per full-resolution pixel; overrides the file's (SVS ``MPP``, OME
        ``PhysicalSizeX``, TIFF resolution tags, OpenSlide ``mpp-x``). Needed when the file has
        none.
    level
        Pyramid level the tissue mask is computed on, at that level's full size (its whole area
        is held in memory). Default: a thumbnail of ``mask_mpp`` microns per pixel.
    tissue_threshold
        Fraction of a tile's area that must be tissue for the tile to be kept, in [0, 1].
    stride_um
        Distance between neighbouring tiles in microns (default: ``tile_size_um``, no overlap).
    library_id
        Key in ``uns["spatial"]`` and value of ``obs["library_id"]`` (default: the file name
        without its extension).
    min_saturation
        Lowest saturation threshold (0 to 1): Otsu's threshold is raised to it, so that a slide
        of bare glass (noise only) is found to have no tissue rather than half of it.
    mask_mpp
        Microns per pixel of the tissue mask (without ``level``): about a nucleus, so that
        nuclei and the paler matter between them are blurred into one tissue (CLAM segments at a
        32-fold downsample of 0.25-0.5 um/px). Raised if needed so that a tile spans at least 8
        mask pixels; the mask has at most 8192 pixels on its long side.
    thumbnail_size
        Longest side of the ``"hires"`` image kept in ``uns`` (the ``"lowres"`` one has 600).
    backend
        Reader backend of :func:`rankbygene.io.open_image` (unused for a ``WSIData``).
    tile_key
        With a ``WSIData`` only: take the tiles of its tile table ``wsi.shapes[tile_key]`` (e.g.
        ``"tiles"`` from ``lazyslide.pp.tile_tissues``, square tiles) instead of the package's
        grid; ``tile_size_um``, ``stride_um`` and ``tissue_threshold`` are then unused, every
        tile of the table is kept in its order, and ``obs`` also has the table's ``tile_id`` and
        ``tissue_id``. ``tissue_fraction`` is still the package's (Otsu on saturation). The
        tiles are then read from the pyramid level the table's tile spec reads
        (``metadata["read_downsample"]``), as ``lazyslide.tl.feature_extraction`` does, so that
        :class:`~rankbygene.model.FeatureExtractor` and ``get_image_representation`` see the
        same pixels.

    Returns
    -------
    AnnData with one observation per tile and no variables:

    - ``obsm["spatial"]``: tile centres ``(x, y)`` in full-resolution pixels.
    - ``obs``: ``library_id`` (categorical), ``array_row``, ``array_col`` (grid position) and
      ``tissue_fraction``.
    - ``uns["spatial"][library_id]``: ``images`` (``"hires"``, ``"lowres"`` thumbnails),
      ``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``,
      ``spot_diameter_fullres`` = the tile side in full-resolution pixels) and ``metadata``
      (``source_image_path``, ``mpp``, ``tile_size_um``, ``tile_size_px``, ``stride_px``,
      ``tissue_threshold``, ``saturation_threshold``).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The slide cannot be opened, has no microns per pixel and ``mpp`` is not given, a tile is
        larger than the slide or smaller than a pixel, or no tile has enough tissue.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> tiles = rbg.pp.tile_slide("slide.svs", tile_size_um=112)  # doctest: +SKIP
    >>> tiles.obsm["X_rankbygene"] = model.get_image_representation(tiles)  # doctest: +SKIP
    >>> predicted = model.predict_expression(tiles, copy=True)  # doctest: +SKIP
    >>> import squidpy as sq
    >>> sq.pl.spatial_scatter(predicted, color="ERBB2", shape="square")  # doctest: +SKIP

    A LazySlide ``WSIData``, tiled by the package or with LazySlide's tiles:

    >>> import lazyslide as zs
    >>> wsi = zs.open_wsi("slide.svs", store=None)  # doctest: +SKIP
    >>> tiles = rbg.pp.tile_slide(wsi, tile_size_um=112)  # doctest: +SKIP
    >>> zs.pp.find_tissues(wsi)  # doctest: +SKIP
    >>> zs.pp.tile_tissues(wsi, 224, mpp=0.5)  # doctest: +SKIP
    >>> tiles = rbg.pp.tile_slide(wsi, tile_key="tiles")  # doctest: +SKIP
    """
    _check_tile_args(tile_size_um, mpp, tissue_threshold, stride_um, min_saturation, thumbnail_size)
    if not (isinstance(mask_mpp, int | float) and math.isfinite(mask_mpp) and mask_mpp > 0):
        raise ValueError(f"mask_mpp must be a positive number; got {mask_mpp!r}.")
    boxes = None
    reader: ImageReader
    if is_wsidata(path):
        reader = WSIDataImage(path, mpp=mpp)
        if reader.path is None:
            raise ValueError(
                "This WSIData has no slide file (it was made from a SpatialData image): the "
                "tiles' pixels are read from a file; open the slide with wsidata.open_wsi(path)."
            )
        _check_mpp(reader, reader.path)
        boxes = None if tile_key is None else table_boxes(path, tile_key)
        path = reader.path
    elif tile_key is not None:
        raise ValueError(f"tile_key is for a wsidata.WSIData; got a {type(path).__name__}.")
    else:
        path = Path(path)
        reader = open_slide(path, mpp=mpp, backend=backend)
    try:
        return _tile(
            reader,
            path,
            tile_size_um,
            level,
            tissue_threshold,
            stride_um,
            library_id,
            min_saturation,
            mask_mpp,
            thumbnail_size,
            boxes=boxes,
        )
    finally:
        reader.close()


def open_slide(
    path: str | Path,
    mpp: float | None = None,
    backend: Literal["auto", "pil", "tifffile", "openslide"] = "auto",
) -> ImageReader:
    """Open a slide and check that its microns per pixel are known, naming the file if not.

    Examples
    --------
    >>> from rankbygene.pp._tile import open_slide
    >>> open_slide("slide.tif", mpp=0.5).mpp  # doctest: +SKIP
    0.5
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Slide not found: {path}")
    try:
        reader = open_image(path, backend=backend, mpp=mpp)
    except (ValueError, OSError) as err:
        raise ValueError(f"Could not open slide {path}: {err}") from err
    try:
        _check_mpp(reader, path)
    except ValueError:
        reader.close()
        raise
    return reader


def _check_mpp(reader: ImageReader, path: Path) -> None:
    if reader.mpp is None or not (np.isfinite(reader.mpp) and reader.mpp > 0):
        found = reader.mpp
        what = "no microns per pixel" if found is None else f"an invalid microns per pixel {found}"
        raise ValueError(
            f"Slide {path} has {what} (no MPP in its description, no resolution tags or "
            "OpenSlide mpp-x): pass mpp=, the microns per full-resolution pixel."
        )


def slide_id(path: str | Path) -> str:
    """A slide's name without its extension (``.ome.tif`` counted as one)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _tile(
    reader: ImageReader,
    path: Path,
    tile_size_um: float,
    level: int | None,
    tissue_threshold: float,
    stride_um: float | None,
    library_id: str | None,
    min_saturation: float,
    mask_mpp: float,
    thumbnail_size: int,
    boxes: TileBoxes | None = None,
) -> AnnData:
    height, width = reader.shape
    assert reader.mpp is not None  # checked by open_slide
    mpp = float(reader.mpp)
    if boxes is not None:
        tile_size_um, stride_um = boxes.side * mpp, boxes.stride * mpp
    side = int(round(tile_size_um / mpp))
    stride = side if stride_um is None else int(round(stride_um / mpp))
    if side < 1 or stride < 1:
        raise ValueError(
            f"Slide {path}: tiles of {tile_size_um} um (stride {stride_um or tile_size_um} um) "
            f"are smaller than a pixel at {mpp} um/px."
        )
    if side > min(height, width):
        raise ValueError(
            f"Slide {path}: a tile of {tile_size_um} um is {side} px at {mpp} um/px, larger than "
            f"the slide ({width} x {height} px)."
        )
    if level is not None and not 0 <= level < len(reader.level_downsamples):
        raise ValueError(
            f"Slide {path} has pyramid levels 0..{len(reader.level_downsamples) - 1}; got "
            f"level={level}."
        )
    library_id = slide_id(path) if library_id is None else str(library_id)

    mask_scale = _mask_scale(reader, side, level, mask_mpp)
    hires_scale = min(1.0, thumbnail_size / max(height, width))
    # one read for both: the sharper of the mask and the hires image, the other shrunk from it
    thumb = read_thumbnail(reader, max(mask_scale, hires_scale))
    mask_image = shrink(thumb, scaled_size((height, width), mask_scale))
    mask, threshold = tissue_mask(mask_image, min_saturation=min_saturation)
    if boxes is None and not mask.any():
        raise ValueError(
            f"No tissue found in slide {path}: no pixel of its thumbnail is more saturated than "
            f"{threshold:.3f} (Otsu's threshold, at least min_saturation={min_saturation})."
        )
    if boxes is not None:
        rows, cols, x0, y0 = boxes.rows, boxes.cols, boxes.x0, boxes.y0
        fraction = _tile_fractions(mask, x0, y0, side, (height, width))
        keep = np.ones(len(x0), dtype=bool)
        tissue_threshold = 0.0
    else:
        rows, cols, x0, y0 = _grid(height, width, side, stride)
        fraction = _tile_fractions(mask, x0, y0, side, (height, width))
        keep = fraction >= tissue_threshold
    if not keep.any():
        raise ValueError(
            f"No tile of slide {path} has tissue_threshold={tissue_threshold} of its area on "
            f"tissue (best: {fraction.max():.2f}; {mask.mean():.1%} of the slide is tissue): "
            "lower tissue_threshold or tile_size_um."
        )
    rows, cols, x0, y0, fraction = rows[keep], cols[keep], x0[keep], y0[keep], fraction[keep]
    centres = np.column_stack([x0 + side / 2, y0 + side / 2]).astype(np.float64)

    hires = shrink(thumb, scaled_size((height, width), hires_scale))
    # the scale factors squidpy uses: image pixels per full-resolution pixel, along x
    images = thumbnails(hires, hires.shape[1] / width, _LOWRES_MAX_SIDE, shape=(height, width))
    obs = pd.DataFrame(
        {
            LIBRARY_ID_KEY: pd.Categorical([library_id] * len(rows)),
            ARRAY_ROW_KEY: rows.astype(np.int64),
            ARRAY_COL_KEY: cols.astype(np.int64),
            TISSUE_FRACTION_KEY: fraction.astype(np.float32),
        },
        index=pd.Index([f"{library_id}_{r}x{c}" for r, c in zip(rows, cols, strict=True)]),
    )
    if boxes is not None:
        for column, values in boxes.columns.items():
            obs[column] = values
        obs.index = pd.Index([f"{library_id}_{i}" for i in boxes.names])
    adata = AnnData(obs=obs, obsm={SPATIAL_KEY: centres})
    metadata = {
        METADATA_SOURCE_IMAGE: str(path.resolve()),
        METADATA_MPP: mpp,
        METADATA_TILE_SIZE_UM: float(tile_size_um),
        METADATA_TILE_SIZE_PX: int(side),
        METADATA_STRIDE_PX: int(stride),
        METADATA_TISSUE_THRESHOLD: float(tissue_threshold),
        METADATA_SATURATION_THRESHOLD: float(threshold),
        METADATA_SOURCE: "rankbygene.pp.tile_slide"
        + ("" if boxes is None else f" (wsidata tiles {boxes.key!r})"),
    }
    if boxes is not None and boxes.read_downsample is not None:
        metadata[METADATA_READ_DOWNSAMPLE] = boxes.read_downsample
    adata.uns[SPATIAL_KEY] = {library_id: spatial_entry(images, side, metadata)}
    logger.info(
        f"tiled {path}: {adata.n_obs} tiles of {side} px ({tile_size_um} um at {mpp:g} um/px) "
        f"with at least {tissue_threshold:.0%} tissue; {mask.mean():.1%} of the slide is tissue"
    )
    return adata


# ---------------------------------------------------------------------------------- helpers


def _check_tile_args(
    tile_size_um: float,
    mpp: float | None,
    tissue_threshold: float,
    stride_um: float | None,
    min_saturation: float,
    thumbnail_size: int,
) -> None:
    def positive(value: Any) -> bool:
        return isinstance(value, int | float) and math.isfinite(value) and value > 0

    if not positive(tile_size_um):
        raise ValueError(f"tile_size_um must be a positive number; got {tile_size_um!r}.")
    if mpp is not None and not positive(mpp):
        raise ValueError(f"mpp must be a positive number of microns per pixel; got {mpp!r}.")
    if stride_um is not None and not positive(stride_um):
        raise ValueError(f"stride_um must be a positive number; got {stride_um!r}.")
    if not (isinstance(tissue_threshold, int | float) and 0.0 <= tissue_threshold <= 1.0):
        raise ValueError(f"tissue_threshold must be in [0, 1]; got {tissue_threshold!r}.")
    if not (isinstance(min_saturation, int | float) and 0.0 <= min_saturation < 1.0):
        raise ValueError(f"min_saturation must be in [0, 1); got {min_saturation!r}.")
    if not (isinstance(thumbnail_size, int) and thumbnail_size >= 8):
        raise ValueError(f"thumbnail_size must be an int of at least 8; got {thumbnail_size!r}.")


def _mask_scale(reader: ImageReader, side: int, level: int | None, mask_mpp: float) -> float:
    """Mask pixels per full-resolution pixel."""
    height, width = reader.shape
    if level is not None:
        return 1.0 / reader.level_downsamples[level]
    assert reader.mpp is not None  # checked by open_slide
    scale = max(float(reader.mpp) / mask_mpp, _MASK_MIN_TILE_PX / side)
    return min(1.0, scale, _MASK_MAX_SIDE / max(height, width))


def _grid(
    height: int, width: int, side: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grid rows, columns and top-left corners of the tiles that lie inside the slide."""
    xs = np.arange(0, width - side + 1, stride, dtype=np.int64)
    ys = np.arange(0, height - side + 1, stride, dtype=np.int64)
    grid_rows, grid_cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    rows, cols = grid_rows.ravel(), grid_cols.ravel()
    return rows, cols, xs[cols], ys[rows]


def _tile_fractions(
    mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, side: int, shape: tuple[int, int]
) -> np.ndarray:
    """Fraction of each tile's box that is tissue, from a summed-area table of the mask."""
    mh, mw = mask.shape
    sy, sx = mh / shape[0], mw / shape[1]
    table = np.zeros((mh + 1, mw + 1), dtype=np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def bounds(start: np.ndarray, scale: float, size: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.round(start * scale).astype(np.int64), 0, size - 1)
        hi = np.clip(np.round((start + side) * scale).astype(np.int64), lo + 1, size)
        return lo, hi

    c0, c1 = bounds(x0, sx, mw)
    r0, r1 = bounds(y0, sy, mh)
    inside = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return inside / ((r1 - r0) * (c1 - c0))
