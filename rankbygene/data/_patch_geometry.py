"""Where each spot's patch lies in its image, and what becomes of patches that miss pixels.

A patch misses pixels where its box extends beyond the image, where an in-memory float image
holds NaN or infinite pixels (made white, as the glass beyond the image), or, for precomputed
patches, where the spot has no row in the file: ``out_of_bounds`` pads, drops or refuses them,
before any pixel is decoded. Patches that span too few pixels of their image, upsampled to the
encoder's input, are reported by :func:`check_resolution`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from rankbygene._image import (
    BACKGROUND,
    PATCH_BARCODE_KEYS,
    PATCH_IMAGE_KEYS,
    PatchFile,
    as_rgb_uint8,
    is_lazy_array,
    open_image,
)
from rankbygene._layout import ImageSource
from rankbygene._layout._keys import IMAGES_KEY, SPATIAL_KEY
from rankbygene._logging import logger

__all__ = ["OUT_OF_BOUNDS", "PatchGeometry", "check_resolution"]

OUT_OF_BOUNDS = ("raise", "pad", "drop")
#: Patches of spots upsampled by more than this factor are logged as blurry; tiles of a whole
#: slide, whose size is chosen, are warned about as soon as they are upsampled at all. A spot's
#: diameter is fixed by the assay, and some upsampling of it is the norm (a 55 um Visium spot
#: spans 110 px at 0.5 um/px, below a 224 px encoder input).
MAX_SPOT_UPSAMPLING = 4.0
# (image, patch pixels, input size) already reported by check_resolution in this process
_RESOLUTION_REPORTED: set[tuple[Any, ...]] = set()


class PatchGeometry:
    """The patch of each spot: its box in its library's image, or its row in a patches file.

    Reads the images' headers (and in-memory images, whose NaN or infinite pixels are made white),
    no pixel of a file.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy spatial layout: obs names and in-memory images.
    sources
        Library id to :class:`~rankbygene._layout.ImageSource`.
    libraries
        Library ids; ``library_code`` indexes them.
    library_code
        Library of each spot, as a position in ``libraries``.
    coords
        ``(n_obs, 2)`` spot centres in full-resolution pixels.
    patch_scale
        Patch side in spot diameters.

    Attributes
    ----------
    shapes
        Library id to the ``(height, width)`` of its image (or of its stored patches).
    arrays
        Library id to its in-memory image, NaN and infinite pixels white.
    boxes
        ``(n_obs, 3)`` ``x0, y0, side`` of each spot's patch in its image's pixels.
    rows
        Row of each spot in its library's patches file; -1 where absent or not precomputed.
    inside, finite
        Whether each spot's patch lies in its image (has its row), and holds no NaN pixel.
    nonfinite
        Library id to the number of NaN or infinite pixels of its image, where any.
    """

    def __init__(
        self,
        adata: AnnData,
        sources: Mapping[str, ImageSource],
        libraries: list[str],
        library_code: np.ndarray,
        coords: np.ndarray,
        patch_scale: float,
    ) -> None:
        self.n_obs = n_obs = len(library_code)
        self.sources = sources
        self.libraries = libraries
        self.library_code = library_code
        self.arrays: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.rows = np.full(n_obs, -1, dtype=np.int64)  # row in a patches file
        self.boxes = np.zeros((n_obs, 3), dtype=np.float64)  # x0, y0, side in image pixels
        self.inside = np.ones(n_obs, dtype=bool)
        self.finite = np.ones(n_obs, dtype=bool)  # no NaN or infinite pixel in the patch
        self.nonfinite: dict[str, int] = {}  # library to its image's NaN or infinite pixels
        obs_names = adata.obs_names.astype(str).to_numpy()
        for code, lib in enumerate(libraries):
            source = sources[lib]
            spots = np.flatnonzero(library_code == code)
            if source.kind == "patches":
                self.shapes[lib], rows = _match_patch_rows(source, obs_names[spots])
                self.rows[spots] = rows
                self.inside[spots] = rows >= 0
                continue
            missing = None
            if source.kind == "memory":
                array = _memory_image(adata, source)
                missing = _nonfinite_pixels(array)
                if missing is not None:
                    # NaN and inf have no colour: white, as the glass beyond the image
                    self.nonfinite[lib] = int(np.count_nonzero(missing))
                    array = as_rgb_uint8(array)
                    array[missing] = BACKGROUND
                self.arrays[lib] = array
                self.shapes[lib] = (int(array.shape[0]), int(array.shape[1]))
            else:
                with open_image(source.file) as reader:  # the header only, nothing decoded
                    self.shapes[lib] = reader.shape
            side = source.spot_diameter_fullres * patch_scale * source.scale
            centres = coords[spots] * source.scale
            self.boxes[spots, 0] = centres[:, 0] - side / 2
            self.boxes[spots, 1] = centres[:, 1] - side / 2
            self.boxes[spots, 2] = side
            self.inside[spots] = _inside(self.boxes[spots], self.shapes[lib])
            if missing is not None:
                self.finite[spots] = _pixels_in_boxes(missing, self.boxes[spots]) == 0

    def kept(self, out_of_bounds: str) -> np.ndarray:
        """Spots kept; spots whose patch leaves the image or holds NaN pixels counted first.

        ``"raise"`` names them in an error, ``"pad"`` in a warning, ``"drop"`` in the log.
        """
        outside = ~self.inside
        nonfinite = ~self.finite & self.inside
        lacking = outside | nonfinite  # spots whose patch misses some of its pixels
        if not lacking.any():
            return np.ones(self.n_obs, dtype=bool)
        precomputed = np.array([self.sources[lib].kind == "patches" for lib in self.libraries])
        no_row = outside & precomputed[self.library_code]
        beyond = outside & ~no_row
        found = []
        if beyond.any():
            away = beyond & self._entirely_outside()
            found.append(
                f"{int(beyond.sum())} spots whose patch extends beyond the image "
                f"({self._per_library(beyond)})"
                + (f", {int(away.sum())} of them entirely outside it" if away.any() else "")
            )
        if no_row.any():
            found.append(
                f"{int(no_row.sum())} spots that have no row in the patches file "
                f"({self._per_library(no_row)})"
            )
        if nonfinite.any():
            pixels = ", ".join(f"{lib!r}: {n}" for lib, n in self.nonfinite.items())
            found.append(
                f"{int(nonfinite.sum())} spots whose patch holds NaN or infinite pixels "
                f"({self._per_library(nonfinite)}; such pixels per image: {pixels})"
            )
        message = " and ".join(found)
        if outside.all():
            hint = (
                " None has a patch: are obsm coordinates in full-resolution pixels, and is the "
                "image the one they refer to?"
            )
        else:
            hint = ""
        if out_of_bounds == "pad":
            warnings.warn(
                f"{message}: their missing pixels are white (out_of_bounds='pad').{hint}",
                UserWarning,
                stacklevel=3,
            )
            return np.ones(self.n_obs, dtype=bool)
        if out_of_bounds == "drop":
            if lacking.all():
                raise ValueError(f"All {self.n_obs} spots would be dropped: {message}.{hint}")
            logger.info(f"dropped {message}")
            return ~lacking
        raise ValueError(
            f"{message}. Pass out_of_bounds='pad' to fill the missing pixels with white, or "
            f"out_of_bounds='drop' to exclude them.{hint}"
        )

    def _per_library(self, spots: np.ndarray) -> str:
        """``'lib': n of total`` for each library with some of ``spots``."""
        counts = []
        for code, lib in enumerate(self.libraries):
            of_library = self.library_code == code
            n = int(np.count_nonzero(spots & of_library))
            if n:
                counts.append(f"{lib!r}: {n} of {int(np.count_nonzero(of_library))}")
        return ", ".join(counts)

    def _entirely_outside(self) -> np.ndarray:
        """Spots whose patch box does not meet its image at all (precomputed patches: none)."""
        away = np.zeros(self.n_obs, dtype=bool)
        for code, lib in enumerate(self.libraries):
            if self.sources[lib].kind == "patches":
                continue
            spots = self.library_code == code
            x0, y0, side = self.boxes[spots].T
            height, width = self.shapes[lib]
            away[spots] = (x0 + side <= 0) | (y0 + side <= 0) | (x0 >= width) | (y0 >= height)
        return away


def check_resolution(
    sources: Mapping[str, ImageSource],
    patch_scale: float,
    input_size: int,
    action: Literal["warn", "raise"] = "warn",
) -> list[str]:
    """Report the libraries whose patches are upsampled more than their kind allows.

    A patch spans ``spot_diameter_fullres * patch_scale * scale`` pixels of its image and is
    resized to ``input_size``. Tiles of a whole slide (libraries with a ``tile_size_um``,
    written by :func:`~rankbygene.pp.tile_slide`) have the size the user chose: tiles that
    span fewer pixels than ``input_size`` are upsampled (blurry, and not the scale the
    encoder learnt), a :class:`UserWarning`. A spot's diameter is fixed by the assay and
    some upsampling is the norm: beyond ``MAX_SPOT_UPSAMPLING`` times, a logged warning.
    Each library's image is reported once per process at a given geometry: an extractor
    checks its libraries when it is built, and :func:`~rankbygene.tl.embed_slides` each
    slide before tiling it. Precomputed patches are not checked.

    Parameters
    ----------
    sources
        Library id to :class:`~rankbygene._layout.ImageSource` (an extractor's
        :attr:`sources`).
    patch_scale
        Patch side in spot (or tile) diameters.
    input_size
        Side in pixels that patches are resized to (the encoder's input).
    action
        For tiles: ``"warn"``, or ``"raise"`` a :class:`ValueError` (every time).

    Returns
    -------
    The library ids whose patches are upsampled more than allowed.

    Examples
    --------
    >>> patches = PatchExtractor(tiles, patch_size=224)  # doctest: +SKIP
    >>> PatchExtractor.check_resolution(patches.sources, 1.0, 224)  # doctest: +SKIP
    []
    """
    faults, tiles = [], []
    for lib, source in sources.items():
        if source.kind == "patches":
            continue
        pixels = source.spot_diameter_fullres * patch_scale * source.scale
        is_tile = source.tile_size_um is not None
        if pixels >= (input_size if is_tile else input_size / MAX_SPOT_UPSAMPLING):
            continue
        faults.append(lib)
        image = source.path if source.path is not None else (lib, source.image_key)
        reported = (str(image), round(pixels, 3), int(input_size))
        if action == "warn" and reported in _RESOLUTION_REPORTED:
            continue
        if is_tile:
            where = source.path or "in memory"
            tiles.append(
                f"{lib!r} ({where}): tiles of {source.tile_size_um:g} um span {pixels:.0f} px"
            )
        else:
            logger.warning(
                f"Library {lib!r}: a patch spans {pixels:.1f} pixels of its {source.kind} "
                f"image, upsampled to {input_size}: patches will be blurry (use a "
                "higher-resolution image)."
            )
        if action == "warn":
            _RESOLUTION_REPORTED.add(reported)
    if tiles:
        message = (
            f"Tiles smaller than the encoder's input of {input_size} px are upsampled "
            f"(blurry): {'; '.join(tiles)}. Tile with a larger tile_size_um, or use a model "
            "with a smaller input_size."
        )
        if action == "raise":
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return faults


def _match_patch_rows(source: ImageSource, names: np.ndarray) -> tuple[tuple[int, int], np.ndarray]:
    """Shape of the stored patches and, per spot, its row in the file (-1 when absent)."""
    path = source.file
    try:
        with PatchFile(path) as patches:
            for key, candidates in (
                (patches.image_key, PATCH_IMAGE_KEYS),
                (patches.barcode_key, PATCH_BARCODE_KEYS),
            ):
                if key is None:
                    raise KeyError(
                        f"Patches file {path} (library {source.library_id!r}) has no dataset "
                        f"{candidates[0]!r} (datasets: {patches.datasets})."
                    )
            shape = patches.image_shape
            barcodes = patches.barcodes()
    except OSError as err:
        raise ValueError(f"Could not read patches file {path}: {err}") from err
    if len(shape) != 4 or shape[-1] not in (3, 4) or shape[0] != len(barcodes):
        raise ValueError(
            f"Patches file {path}: {PATCH_IMAGE_KEYS[0]!r} must be (N, h, w, 3) with one barcode "
            f"per row; got {shape} and {len(barcodes)} barcodes."
        )
    row_of = {barcode: row for row, barcode in enumerate(barcodes)}
    rows = np.array([row_of.get(str(name), -1) for name in names], dtype=np.int64)
    return (int(shape[1]), int(shape[2])), rows


def _memory_image(adata: AnnData, source: ImageSource) -> np.ndarray:
    image = adata.uns[SPATIAL_KEY][source.library_id][IMAGES_KEY][source.image_key]
    # a lazy (dask) image, e.g. a SpatialData element, stays lazy: patches read their regions
    array = image if is_lazy_array(image) else np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"adata.uns[{SPATIAL_KEY!r}][{source.library_id!r}][{IMAGES_KEY!r}]"
            f"[{source.image_key!r}] must be "
            f"(H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}."
        )
    return array


def _inside(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Whether each box lies in the image, with the rounding that ``read_region`` applies."""
    height, width = shape
    x0 = np.floor(boxes[:, 0])
    y0 = np.floor(boxes[:, 1])
    side = np.maximum(1, np.round(boxes[:, 2]))
    return (x0 >= 0) & (y0 >= 0) & (x0 + side <= width) & (y0 + side <= height)


def _nonfinite_pixels(array: Any) -> np.ndarray | None:
    """``(H, W)`` mask of an in-memory float image's NaN or infinite pixels; ``None`` if none.

    Lazy arrays are not read whole for this; their pixels are converted as they are read.
    """
    if is_lazy_array(array) or array.dtype.kind != "f":
        return None
    missing = ~np.isfinite(array)
    if missing.ndim == 3:
        missing = missing.any(axis=-1)
    return missing if missing.any() else None


def _pixels_in_boxes(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` in each box, with the rounding that ``read_region`` applies."""
    height, width = mask.shape
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    side = np.maximum(1, np.round(boxes[:, 2])).astype(np.int64)
    x0 = np.floor(boxes[:, 0]).astype(np.int64)
    y0 = np.floor(boxes[:, 1]).astype(np.int64)
    c0, c1 = np.clip(x0, 0, width), np.clip(x0 + side, 0, width)
    r0, r1 = np.clip(y0, 0, height), np.clip(y0 + side, 0, height)
    return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
