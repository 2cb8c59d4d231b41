"""Where a library's pixels are, and which library each spot belongs to.

One place that knows where a library's pixels are (a full-resolution file on disk, the sharpest
in-memory image and its scale factor, or an HDF5 file of precomputed patches), so that every reader
of patches agrees, and every error about the layout names the key at fault before any work starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from rankbygene._image import ImageReader, open_image
from rankbygene._layout._entry import scalefactor_key
from rankbygene._layout._keys import (
    IMAGES_KEY,
    LIBRARY_ID_KEY,
    METADATA_KEY,
    METADATA_PATCHES_PATH,
    METADATA_READ_DOWNSAMPLE,
    METADATA_SOURCE_IMAGE,
    METADATA_TILE_SIZE_UM,
    SCALEFACTOR_SPOT_DIAMETER,
    SCALEFACTORS_KEY,
    SPATIAL_KEY,
)
from rankbygene._logging import logger

__all__ = [
    "ImageSource",
    "image_sources",
    "resolve_library_key",
    "spatial_coordinates",
    "spot_libraries",
]


@dataclass(frozen=True)
class ImageSource:
    """Where one library's pixels are.

    Attributes
    ----------
    library_id
        Key in ``uns["spatial"]``.
    spot_diameter_fullres
        Spot diameter in full-resolution pixels (NaN for a library of precomputed patches whose
        metadata lacks it).
    path
        Full-resolution image file, read lazily; ``None`` when the pixels are in memory.
    image_key
        Key in ``uns["spatial"][library_id]["images"]`` of the in-memory image used.
    scale
        Image pixels per full-resolution pixel (1 for a file; ``tissue_<key>_scalef`` otherwise).
    patches_path
        HDF5 file of precomputed patches (``metadata["patches_path"]``), used when the library has
        no source image file (and no ``image_key`` is asked for); patches are matched to spots by
        ``obs_names`` against its ``barcode``.
    tile_size_um
        Tile side in microns for a library of whole-slide tiles (``metadata["tile_size_um"]``,
        written by :func:`rankbygene.pp.tile_slide`); ``None`` for spots.
    read_downsample
        Pyramid level (by its downsample) that patches are read from, for tiles of a
        LazySlide tile table (``metadata["read_downsample"]``); ``None``: the coarsest level
        that suffices.
    """

    library_id: str
    spot_diameter_fullres: float
    path: Path | None = None
    image_key: str | None = None
    scale: float = 1.0
    patches_path: Path | None = None
    tile_size_um: float | None = None
    read_downsample: float | None = None

    @property
    def kind(self) -> Literal["file", "memory", "patches"]:
        """``"file"`` (image on disk), ``"memory"`` (``uns`` image) or ``"patches"`` (HDF5)."""
        if self.path is not None:
            return "file"
        if self.image_key is not None:
            return "memory"
        return "patches"

    @property
    def file(self) -> Path:
        """The file the pixels are read from: the image, or the HDF5 file of patches."""
        file = self.path if self.path is not None else self.patches_path
        if file is None:
            raise ValueError(f"Library {self.library_id!r} has its image in memory, not in a file.")
        return file

    def open(self, adata: AnnData | None = None) -> ImageReader:
        """Open the pixels: the file, or the in-memory image of ``adata``."""
        if self.kind == "patches":
            raise ValueError(
                f"Library {self.library_id!r} has precomputed patches ({self.patches_path}), not "
                "an image: read them with rankbygene.data.PatchExtractor."
            )
        if self.path is not None:
            return open_image(self.path)
        if adata is None:
            raise ValueError(f"Library {self.library_id!r} keeps its image in memory: pass adata.")
        return open_image(adata.uns[SPATIAL_KEY][self.library_id][IMAGES_KEY][self.image_key])


def spatial_coordinates(adata: AnnData, spatial_key: str = SPATIAL_KEY) -> np.ndarray:
    """Spot centres ``(n_obs, 2)`` as float64, validated.

    Raises
    ------
    KeyError
        ``obsm[spatial_key]`` is missing.
    ValueError
        It is not ``(n_obs, 2)`` or holds NaN/inf.

    Examples
    --------
    >>> import numpy as np
    >>> from anndata import AnnData
    >>> from rankbygene._layout import spatial_coordinates
    >>> adata = AnnData(np.zeros((2, 1)), obsm={"spatial": np.array([[1, 2], [3, 4]])})
    >>> spatial_coordinates(adata).dtype
    dtype('float64')
    """
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{spatial_key!r}] is missing: spot centres (x, y) in full-resolution "
            f"pixels are needed. Available obsm keys: {list(adata.obsm.keys())}."
        )
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[1] < 2 or coords.shape[0] != adata.n_obs:
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must have shape (n_obs, 2) = ({adata.n_obs}, 2); "
            f"got {coords.shape}."
        )
    try:
        coords = coords[:, :2].astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adata.obsm[{spatial_key!r}] is not numeric: {err}") from err
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] has {int(bad.sum())} spots with NaN or infinite "
            f"coordinates (first: {list(adata.obs_names[bad][:3])})."
        )
    return coords


def spot_libraries(
    adata: AnnData, library_key: str | None = None, default: str = "0"
) -> np.ndarray:
    """The library id of each spot, as strings: the one resolver of ``library_key``.

    ``library_key=None`` is resolved by :func:`resolve_library_key`: with at most one library in
    ``uns["spatial"]`` every spot gets that library's id (``default`` when there is none, e.g.
    an AnnData of precomputed features); with several, the ``obs`` column whose values are
    their ids.

    Raises
    ------
    KeyError
        ``library_key`` is not a column of ``obs``.
    ValueError
        The column has missing values, or ``library_key=None`` and several libraries that no
        column names.

    Examples
    --------
    >>> import numpy as np
    >>> from anndata import AnnData
    >>> from rankbygene._layout import spot_libraries
    >>> adata = AnnData(np.zeros((2, 1)))
    >>> adata.obs["library_id"] = ["A1", "B1"]
    >>> spot_libraries(adata, "library_id").tolist()
    ['A1', 'B1']
    >>> adata.uns["spatial"] = {"A1": {}, "B1": {}}
    >>> spot_libraries(adata).tolist()  # found: the column whose values are the libraries
    ['A1', 'B1']
    """
    library_key = resolve_library_key(adata, library_key)
    if library_key is not None:
        if library_key not in adata.obs:
            raise KeyError(
                f"library_key {library_key!r} is not a column of adata.obs "
                f"(columns: {list(adata.obs.columns)})."
            )
        values = adata.obs[library_key]
        if values.isna().any():
            raise ValueError(
                f"adata.obs[{library_key!r}] has {int(values.isna().sum())} missing values."
            )
        return values.astype(str).to_numpy()
    libraries = list(adata.uns.get(SPATIAL_KEY, {}) or {})
    return np.full(adata.n_obs, str(libraries[0]) if libraries else str(default), dtype=object)


def resolve_library_key(
    adata: AnnData, library_key: str | None = None, setup_key: str | None = None
) -> str | None:
    """The ``obs`` column naming each spot's library: the package's one rule for ``None``.

    ``library_key`` when given. Else, for a model, ``setup_key`` (the column given at setup)
    where ``adata.obs`` has it. Else found from the data: with at most one library in
    ``uns["spatial"]``, ``None`` (all spots are one library); with several, the column whose
    values are all library ids of ``uns["spatial"]`` (squidpy names it ``library_id``), logged at
    INFO level. Every library need not appear (a split of a multi-library AnnData keeps all of
    ``uns["spatial"]``). When several columns qualify, ``library_id`` is preferred.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy spatial layout.
    library_key
        Returned as given when not ``None``.
    setup_key
        A model's setup column, taken where ``adata.obs`` has it.

    Returns
    -------
    The column name, or ``None`` when ``uns["spatial"]`` holds at most one library.
    ``library_key`` is returned unchanged when given, or when ``adata`` is no AnnData.

    Raises
    ------
    ValueError
        Several libraries and no column, or several columns other than ``library_id``, whose
        values are library ids.

    Examples
    --------
    >>> import numpy as np
    >>> from anndata import AnnData
    >>> from rankbygene._layout import resolve_library_key
    >>> adata = AnnData(np.zeros((2, 1)))
    >>> adata.uns["spatial"] = {"A1": {}, "B1": {}}
    >>> adata.obs["sample"] = ["A1", "B1"]
    >>> resolve_library_key(adata)
    'sample'
    """
    if library_key is not None or not isinstance(adata, AnnData):
        return library_key  # anything but an AnnData is for the caller's checks to report
    if setup_key is not None and setup_key in adata.obs:
        return setup_key
    spatial = adata.uns.get(SPATIAL_KEY)
    if not isinstance(spatial, Mapping) or len(spatial) <= 1:
        return None
    libraries = {str(lib) for lib in spatial}
    matches = [
        str(column)
        for column in adata.obs.columns
        if _names_libraries(adata.obs[column], libraries)
    ]
    if not matches:
        raise ValueError(
            f"adata.uns[{SPATIAL_KEY!r}] holds {len(libraries)} libraries {sorted(libraries)} "
            "and no obs column has them as values: pass library_key, the obs column naming "
            "each spot's library."
        )
    if len(matches) > 1:
        if LIBRARY_ID_KEY not in matches:
            raise ValueError(
                f"Several obs columns name the libraries of adata.uns[{SPATIAL_KEY!r}]: "
                f"{matches}; pass library_key (one of them)."
            )
        matches = [LIBRARY_ID_KEY]
    logger.info(
        "library_key not given: using adata.obs[%r], whose values are the libraries of "
        "adata.uns[%r]",
        matches[0],
        SPATIAL_KEY,
    )
    return matches[0]


def _names_libraries(values: pd.Series, libraries: set[str]) -> bool:
    """Every value is a library id (no missing values); unique values first, for speed."""
    if values.isna().any():
        return False
    unique = pd.unique(values.to_numpy())
    if len(unique) > len(libraries):
        return False
    return {str(v) for v in unique} <= libraries


def image_sources(
    adata: AnnData,
    libraries: Sequence[str],
    image_key: str | None = None,
) -> dict[str, ImageSource]:
    """Find, for each library, its pixels and spot diameter, or fail naming the missing key.

    Prefers ``metadata["source_image_path"]`` (full resolution, read lazily; a missing file is an
    error), else ``metadata["patches_path"]`` (an HDF5 file of precomputed full-resolution
    patches, HEST-1k), else the in-memory image with the largest scale factor. With
    ``image_key``, that in-memory image is used wherever the library has images.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy spatial layout.
    libraries
        Library ids (keys of ``uns["spatial"]``); duplicates are ignored.
    image_key
        Use this in-memory image (e.g. ``"hires"``) rather than the source image file.

    Returns
    -------
    Library id to :class:`ImageSource`, in the order of first appearance.

    Raises
    ------
    KeyError
        ``uns["spatial"]``, a library, its spot diameter, image or scale factor is missing.
    FileNotFoundError
        ``metadata["source_image_path"]`` or ``metadata["patches_path"]`` names a missing file.

    Examples
    --------
    >>> import numpy as np
    >>> from anndata import AnnData
    >>> from rankbygene._layout import image_sources
    >>> adata = AnnData(np.zeros((2, 1)), obsm={"spatial": np.zeros((2, 2))})
    >>> adata.uns["spatial"] = {"lib": {
    ...     "images": {"hires": np.zeros((50, 50, 3), np.uint8)},
    ...     "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 20.0}}}
    >>> image_sources(adata, ["lib"])["lib"]
    ImageSource(library_id='lib', spot_diameter_fullres=20.0, path=None, image_key='hires', \
scale=0.5, patches_path=None, tile_size_um=None)
    """
    spatial = adata.uns.get(SPATIAL_KEY)
    if not isinstance(spatial, dict) or not spatial:
        raise KeyError(
            f"adata.uns[{SPATIAL_KEY!r}] is missing: images and scale factors are needed for image "
            "patches (or use features_key with precomputed features)."
        )
    sources = {}
    for library_id in dict.fromkeys(str(lib) for lib in libraries):
        if library_id not in spatial:
            raise KeyError(
                f"Library {library_id!r} is not in adata.uns[{SPATIAL_KEY!r}] "
                f"(libraries there: {list(spatial)})."
            )
        sources[library_id] = _image_source(spatial[library_id], library_id, image_key)
    return sources


def _image_source(entry: dict[str, Any], library_id: str, image_key: str | None) -> ImageSource:
    where = f"adata.uns[{SPATIAL_KEY!r}][{library_id!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a dict with {IMAGES_KEY!r} and {SCALEFACTORS_KEY!r}.")
    scalefactors = entry.get(SCALEFACTORS_KEY) or {}
    metadata = entry.get(METADATA_KEY) or {}
    diameter = _spot_diameter(scalefactors)
    patches_path = metadata.get(METADATA_PATCHES_PATH)
    # Full-resolution precomputed patches beat upsampling a thumbnail: without a source image
    # file (or an explicit image_key), they are used.
    source = None
    if image_key is not None or metadata.get(METADATA_SOURCE_IMAGE) or not patches_path:
        source = _pixels_source(entry, where, library_id, image_key, scalefactors, metadata)
    if source is None:
        if not patches_path:
            raise KeyError(
                f"{where} has no image: neither [{IMAGES_KEY!r}], [{METADATA_KEY!r}]"
                f"[{METADATA_SOURCE_IMAGE!r}] nor [{METADATA_KEY!r}][{METADATA_PATCHES_PATH!r}]."
            )
        if not Path(patches_path).is_file():
            raise FileNotFoundError(
                f"{where}[{METADATA_KEY!r}][{METADATA_PATCHES_PATH!r}] points to a missing file: "
                f"{patches_path}"
            )
        # Precomputed patches carry their own geometry: the diameter is informative only.
        return ImageSource(
            library_id, np.nan if diameter is None else diameter, patches_path=Path(patches_path)
        )
    if diameter is None:
        raise KeyError(
            f"{where}[{SCALEFACTORS_KEY!r}][{SCALEFACTOR_SPOT_DIAMETER!r}] is missing or not "
            "positive: the patch size is derived from it."
        )
    return ImageSource(
        library_id,
        diameter,
        tile_size_um=_positive(metadata, METADATA_TILE_SIZE_UM),
        read_downsample=_positive(metadata, METADATA_READ_DOWNSAMPLE),
        **source,
    )


def _positive(metadata: Mapping[str, Any], key: str) -> float | None:
    """A positive finite number of ``metadata`` (a tile side, a read level); ``None`` else."""
    try:
        value = float(metadata[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _spot_diameter(scalefactors: dict[str, Any]) -> float | None:
    diameter: Any = scalefactors.get(SCALEFACTOR_SPOT_DIAMETER)
    try:
        diameter = float(diameter)
    except (TypeError, ValueError):
        return None
    return diameter if np.isfinite(diameter) and diameter > 0 else None


def _pixels_source(
    entry: dict[str, Any],
    where: str,
    library_id: str,
    image_key: str | None,
    scalefactors: dict[str, Any],
    metadata: dict[str, Any],
) -> dict[str, Any] | None:
    """Keyword arguments of the library's image source, or ``None`` when it has no image."""
    images = entry.get(IMAGES_KEY) or {}
    path = metadata.get(METADATA_SOURCE_IMAGE)
    if image_key is None and path:
        if not Path(path).is_file():
            hint = (
                f" Pass image_key (one of {list(images)}) to use an in-memory image instead."
                if images
                else ""
            )
            raise FileNotFoundError(
                f"{where}[{METADATA_KEY!r}][{METADATA_SOURCE_IMAGE!r}] points to a missing file: "
                f"{path}.{hint}"
            )
        return {"path": Path(path)}
    if image_key is not None and images:
        if image_key not in images:
            raise KeyError(f"{where}[{IMAGES_KEY!r}] has no {image_key!r} (keys: {list(images)}).")
        candidates = [image_key]
    else:
        candidates = list(images)
    if not candidates:
        return None
    scales = {}
    for key in candidates:
        factor: Any = scalefactors.get(scalefactor_key(key))
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            factor = float("nan")
        if not (np.isfinite(factor) and factor > 0):
            if image_key is not None:
                raise KeyError(
                    f"{where}[{SCALEFACTORS_KEY!r}][{scalefactor_key(key)!r}] is missing or not "
                    "positive."
                )
            continue
        scales[key] = factor
    if not scales:
        raise KeyError(
            f"{where}[{SCALEFACTORS_KEY!r}] has no {scalefactor_key('<image>')} for any of the "
            f"images {candidates}."
        )
    best = max(scales, key=lambda key: scales[key])
    return {"image_key": best, "scale": scales[best]}
