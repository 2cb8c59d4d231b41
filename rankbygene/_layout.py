"""Read and validate the scanpy/squidpy spatial layout of an AnnData.

One place that knows where a library's pixels are (a full-resolution file on disk, the sharpest
in-memory image and its scale factor, or an HDF5 file of precomputed patches), so that every reader
of patches agrees, and every error about the layout names the key at fault before any work starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial import cKDTree

from rankbygene._constants import (
    COMMON_COORDINATE_FACTORS,
    CORNER_FRACTION,
    LIBRARY_ID_KEY,
    METADATA_SOURCE_IMAGE,
    MIN_SPOT_SPACING,
    PLAUSIBLE_SPOT_SPACING,
    SCALEFACTOR_SPOT_DIAMETER,
    SPATIAL_KEY,
    SWAPPED_OUTSIDE_FRACTION,
    TYPICAL_SPOT_SPACING,
)
from rankbygene._logging import logger
from rankbygene.io._image import ImageReader, PILImage, as_rgb_uint8, open_image

__all__ = [
    "METADATA_PATCHES_PATH",
    "ImageSource",
    "image_sources",
    "resolve_library_key",
    "spatial_coordinates",
    "spot_libraries",
    "validate_layout",
]

#: ``uns["spatial"][library]["metadata"]`` key of an HDF5 file of precomputed patches (HEST-1k
#: layout: datasets ``img`` ``(N, h, w, 3)`` and ``barcode`` ``(N,)`` or ``(N, 1)``).
METADATA_PATCHES_PATH = "patches_path"


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
    """

    library_id: str
    spot_diameter_fullres: float
    path: Path | None = None
    image_key: str | None = None
    scale: float = 1.0
    patches_path: Path | None = None

    @property
    def kind(self) -> Literal["file", "memory", "patches"]:
        """``"file"`` (image on disk), ``"memory"`` (``uns`` image) or ``"patches"`` (HDF5)."""
        if self.path is not None:
            return "file"
        if self.image_key is not None:
            return "memory"
        return "patches"

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
        return open_image(adata.uns[SPATIAL_KEY][self.library_id]["images"][self.image_key])


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


def spot_libraries(adata: AnnData, library_key: str | None = None) -> np.ndarray:
    """The library id of each spot, as strings.

    Without ``library_key``, ``uns["spatial"]`` must hold exactly one library (or none: then every
    spot gets library ``"0"``, for AnnData without images such as precomputed features).

    Examples
    --------
    >>> import numpy as np
    >>> from anndata import AnnData
    >>> from rankbygene._layout import spot_libraries
    >>> adata = AnnData(np.zeros((2, 1)))
    >>> adata.obs["library_id"] = ["A1", "B1"]
    >>> spot_libraries(adata, "library_id").tolist()
    ['A1', 'B1']
    """
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
    libraries = list(adata.uns.get(SPATIAL_KEY, {}).keys())
    if len(libraries) > 1:
        raise ValueError(
            f"adata.uns[{SPATIAL_KEY!r}] holds {len(libraries)} libraries {libraries}: pass "
            "library_key, the obs column naming each spot's library."
        )
    return np.full(adata.n_obs, str(libraries[0]) if libraries else "0", dtype=object)


def resolve_library_key(adata: AnnData, library_key: str | None = None) -> str | None:
    """The ``obs`` column naming each spot's library: ``library_key``, else found by its values.

    With ``library_key=None`` and several libraries in ``uns["spatial"]``, the column whose
    values are all library ids of ``uns["spatial"]`` is taken (squidpy names it
    ``library_id``), and the choice is logged at INFO level. Every library need not appear
    (a split of a multi-library AnnData keeps all of ``uns["spatial"]``). When several columns
    qualify, ``library_id`` is preferred.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy spatial layout.
    library_key
        Returned as given when not ``None``.

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
scale=0.5, patches_path=None)
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
    where = f"adata.uns['spatial'][{library_id!r}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a dict with 'images' and 'scalefactors'.")
    scalefactors = entry.get("scalefactors") or {}
    metadata = entry.get("metadata") or {}
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
                f"{where} has no image: neither ['images'], ['metadata']"
                f"[{METADATA_SOURCE_IMAGE!r}] nor ['metadata'][{METADATA_PATCHES_PATH!r}]."
            )
        if not Path(patches_path).is_file():
            raise FileNotFoundError(
                f"{where}['metadata'][{METADATA_PATCHES_PATH!r}] points to a missing file: "
                f"{patches_path}"
            )
        # Precomputed patches carry their own geometry: the diameter is informative only.
        return ImageSource(
            library_id, np.nan if diameter is None else diameter, patches_path=Path(patches_path)
        )
    if diameter is None:
        raise KeyError(
            f"{where}['scalefactors'][{SCALEFACTOR_SPOT_DIAMETER!r}] is missing or not positive: "
            "the patch size is derived from it."
        )
    return ImageSource(library_id, diameter, **source)


def _spot_diameter(scalefactors: dict[str, Any]) -> float | None:
    diameter = scalefactors.get(SCALEFACTOR_SPOT_DIAMETER)
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
    images = entry.get("images") or {}
    path = metadata.get(METADATA_SOURCE_IMAGE)
    if image_key is None and path:
        if not Path(path).is_file():
            hint = (
                f" Pass image_key (one of {list(images)}) to use an in-memory image instead."
                if images
                else ""
            )
            raise FileNotFoundError(
                f"{where}['metadata'][{METADATA_SOURCE_IMAGE!r}] points to a missing file: "
                f"{path}.{hint}"
            )
        return {"path": Path(path)}
    if image_key is not None and images:
        if image_key not in images:
            raise KeyError(f"{where}['images'] has no {image_key!r} (keys: {list(images)}).")
        candidates = [image_key]
    else:
        candidates = list(images)
    if not candidates:
        return None
    scales = {}
    for key in candidates:
        factor = scalefactors.get(f"tissue_{key}_scalef")
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            factor = float("nan")
        if not (np.isfinite(factor) and factor > 0):
            if image_key is not None:
                raise KeyError(
                    f"{where}['scalefactors']['tissue_{key}_scalef'] is missing or not positive."
                )
            continue
        scales[key] = factor
    if not scales:
        raise KeyError(
            f"{where}['scalefactors'] has no tissue_<image>_scalef for any of the images "
            f"{candidates}."
        )
    best = max(scales, key=scales.get)
    return {"image_key": best, "scale": scales[best]}


# ------------------------------------------------------------------ checks before any work


def validate_layout(
    adata: AnnData,
    sources: Mapping[str, ImageSource],
    libraries: Sequence[str] | np.ndarray,
    spatial_key: str = SPATIAL_KEY,
    check_units: bool = True,
) -> None:
    """Check, per library, that the spots are in full-resolution pixels and the image decodes.

    Coordinates in other units are accepted by every reader of patches and give patches of the
    wrong places, so they are looked for here, from the image's size (its header only) and the
    spot diameter:

    - spots that would overlap: the median distance to the nearest spot is below
      ``MIN_SPOT_SPACING`` spot diameters (coordinates in downscaled-image pixels, divided by 10,
      or array indices; or a ``spot_diameter_fullres`` too large);
    - all spots in the top-left corner of the image (``CORNER_FRACTION`` of it on both axes),
      where coordinates and diameter are both in downscaled units; an error when one of the
      library's ``tissue_<image>_scalef`` (or a factor of 10) rescales them to fill the image,
      a warning otherwise;
    - x and y swapped: many spots outside the image, all inside once exchanged.

    Errors name the likely factor. Then one patch per image (at the spot nearest the spots'
    median) is decoded, and the first row of a file of precomputed patches, so that a corrupt
    or unreadable file fails here, named, rather than during training.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy spatial layout.
    sources
        The libraries' pixels, from :func:`image_sources`.
    libraries
        Library id of each spot (:func:`spot_libraries`).
    spatial_key
        ``obsm`` key of the spot centres.
    check_units
        ``False`` logs the findings about units as warnings instead of raising (for unusual
        but valid layouts); images are decoded either way.

    Raises
    ------
    ValueError
        Coordinates in other units than full-resolution pixels (with ``check_units``), or an
        image or patches file that cannot be decoded (named, with its library).
    KeyError
        A patches file without a dataset of patches.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> from rankbygene._layout import image_sources, spot_libraries, validate_layout
    >>> adata = rbg.datasets.synthetic(n_slides=1, n_spots=30)
    >>> libraries = spot_libraries(adata)
    >>> validate_layout(adata, image_sources(adata, libraries), libraries)  # fine: no error
    >>> adata.obsm["spatial"] = adata.obsm["spatial"] / 10
    >>> validate_layout(adata, image_sources(adata, libraries), libraries)
    Traceback (most recent call last):
    ...
    ValueError: adata.obsm['spatial'] of library 'slide_0' has its spots 0.16 spot ...
    """
    coords = spatial_coordinates(adata, spatial_key)
    libraries = np.asarray(libraries).astype(str)
    spatial = adata.uns.get(SPATIAL_KEY) or {}
    for library_id, source in sources.items():
        xy = coords[libraries == library_id]
        if not len(xy):
            continue
        entry = spatial.get(library_id)
        scalefactors = (entry.get("scalefactors") if isinstance(entry, Mapping) else None) or {}
        where = f"adata.obsm[{spatial_key!r}] of library {library_id!r}"
        if source.kind == "patches":
            _check_units(xy, None, source.spot_diameter_fullres, scalefactors, where, check_units)
            _decode_first_patch(source)
            continue
        with _naming_the_image(source):
            reader = source.open(adata)
        try:
            height, width = reader.shape
            size = (width / source.scale, height / source.scale)
            _check_units(xy, size, source.spot_diameter_fullres, scalefactors, where, check_units)
            with _naming_the_image(source):
                _decode_one_patch(reader, xy, source)
        finally:
            reader.close()


def _check_units(
    xy: np.ndarray,
    size: tuple[float, float] | None,
    diameter: float,
    scalefactors: Mapping[str, Any],
    where: str,
    strict: bool,
) -> None:
    """Raise (or, unless ``strict``, log) what says the spots are not in full-resolution pixels."""
    finding = _units_finding(xy, size, diameter, scalefactors)
    if finding is None:
        return
    message, certain = finding
    if certain and strict:
        raise ValueError(
            f"{where} {message} Pass check_layout=False to setup_anndata to use the "
            "coordinates as they are."
        )
    logger.warning(f"{where} {message}")


def _units_finding(
    xy: np.ndarray,
    size: tuple[float, float] | None,
    diameter: float,
    scalefactors: Mapping[str, Any],
) -> tuple[str, bool] | None:
    """What is wrong with the spots' units, and whether it is sure enough for an error."""
    spacing = _median_spacing(xy)
    ratio = spacing / diameter if np.isfinite(diameter) else float("nan")
    if size is not None:
        width, height = size
        margin = max(diameter / 2 if np.isfinite(diameter) else 0.0, 0.02 * max(width, height))
        outside = ~_inside(xy, width, height, margin)
        if (
            outside.mean() > SWAPPED_OUTSIDE_FRACTION
            and _inside(xy[:, ::-1], width, height, margin).all()
        ):
            return (
                f"looks like (y, x), not (x, y): {int(outside.sum())} of {len(xy)} spots lie "
                f"outside the {width:.0f} x {height:.0f} px (width x height) full-resolution "
                "image, and all of them inside once x and y are exchanged. Swap the columns: "
                "adata.obsm[key] = adata.obsm[key][:, [1, 0]].",
                True,
            )
    if ratio == 0:
        return (
            "has spots that share their centre with another spot (at least half of them): "
            "are spots of several slides in one library? Pass library_key.",
            True,
        )
    overlap = bool(ratio < MIN_SPOT_SPACING)
    x1, y1 = xy.max(axis=0)
    corner = size is not None and x1 <= CORNER_FRACTION * width and y1 <= CORNER_FRACTION * height
    if not (overlap or corner):
        return None
    likely = []  # (how far from a typical layout, what the coordinates look like, the fix)
    for factor, looks, fix in _likely_factors(scalefactors):
        if size is not None and _inside(xy * factor, width, height, margin).mean() < 0.99:
            continue
        if overlap:
            low, high = PLAUSIBLE_SPOT_SPACING
            if not low <= factor * ratio <= high:
                continue
            distance = abs(np.log(factor * ratio / TYPICAL_SPOT_SPACING))
        else:
            fill = max(factor * x1 / width, factor * y1 / height)
            if fill < 0.5:
                continue
            distance = 1.0 - fill
        likely.append((distance, looks, fix))
    guesses = [f"{looks}: {fix}" for _, looks, fix in sorted(likely, key=lambda g: g[0])]
    if overlap:
        found = (
            f"has its spots {ratio:.2g} spot diameters apart (median distance to the nearest "
            f"spot {spacing:.3g} px; spot_diameter_fullres {diameter:.3g} px): they would "
            "overlap, so the coordinates are not in full-resolution pixels."
        )
        if guesses:
            return f"{found} They look like {'; or like '.join(guesses)}.", True
        return (
            f"{found} Are they in another image's pixels, or array indices? Or is "
            "spot_diameter_fullres too large?",
            True,
        )
    found = (
        f"puts every spot within the top-left {x1 / width:.0%} x {y1 / height:.0%} of the "
        f"{width:.0f} x {height:.0f} px full-resolution image."
    )
    if guesses:
        also = (
            " (spot_diameter_fullres, consistent with the spots' spacing, likely needs it too)"
            if np.isfinite(ratio)
            else ""
        )
        return f"{found} They look like {'; or like '.join(guesses)}{also}.", True
    return f"{found} Check that they are in full-resolution pixels.", False


def _likely_factors(scalefactors: Mapping[str, Any]) -> list[tuple[float, str, str]]:
    """(factor to multiply the coordinates by, what they then were, the fix), one per factor."""
    factors: list[tuple[float, str, str]] = []
    for key, value in scalefactors.items():
        if not (str(key).startswith("tissue_") and str(key).endswith("_scalef")):
            continue
        try:
            scale = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(scale) and 0 < scale < 1:
            image = str(key)[len("tissue_") : -len("_scalef")]
            factors.append((1 / scale, f"{image} pixels", f"multiply by 1/{key} = {1 / scale:.4g}"))
    for factor in COMMON_COORDINATE_FACTORS:
        factors.append(
            (factor, f"full-resolution pixels divided by {factor:g}", f"multiply by {factor:g}")
        )
    distinct: list[tuple[float, str, str]] = []
    for factor in factors:  # an image's factor first: it names where the coordinates came from
        if all(abs(factor[0] / kept[0] - 1) > 0.01 for kept in distinct):
            distinct.append(factor)
    return distinct


def _median_spacing(xy: np.ndarray, n_max: int = 10_000) -> float:
    """Median distance from a spot to its nearest neighbour (at most ``n_max`` spots asked)."""
    if len(xy) < 2:
        return float("nan")
    query = xy
    if len(xy) > n_max:  # a sample gives the median as well, in a fraction of the time
        query = xy[np.random.default_rng(0).choice(len(xy), n_max, replace=False)]
    distances, _ = cKDTree(xy).query(query, k=2)
    return float(np.median(distances[:, 1]))


def _inside(xy: np.ndarray, width: float, height: float, margin: float) -> np.ndarray:
    return (
        (xy[:, 0] >= -margin)
        & (xy[:, 0] <= width + margin)
        & (xy[:, 1] >= -margin)
        & (xy[:, 1] <= height + margin)
    )


@contextmanager
def _naming_the_image(source: ImageSource) -> Iterator[None]:
    """Re-raise a decoder's error as a ValueError naming the library and its image."""
    try:
        yield
    except (FileNotFoundError, PermissionError, ImportError, MemoryError):
        raise  # their own messages name what is missing
    except Exception as err:
        if source.path is not None:
            what = f"image file {source.path}"
        elif source.image_key is not None:
            what = (
                f"image adata.uns[{SPATIAL_KEY!r}][{source.library_id!r}]['images']"
                f"[{source.image_key!r}]"
            )
        else:
            what = f"patches file {source.patches_path}"
        path = source.path or source.patches_path
        if path is not None and str(path) in str(err):  # the reader's error names the file
            raise ValueError(f"Library {source.library_id!r}: {err}") from err
        raise ValueError(
            f"Library {source.library_id!r}: could not decode its {what}: {err}"
        ) from err


def _decode_one_patch(reader: ImageReader, xy: np.ndarray, source: ImageSource) -> None:
    """Decode the patch of the spot nearest the spots' median, in the reader's pixels."""
    if isinstance(reader, PILImage):
        # Without random access any patch decodes the whole file; a thumbnail does too, without
        # holding the full image (and a JPEG's several times faster, at 1/8 scale).
        reader.thumbnail(256)
        return
    nearest = np.argmin(((xy - np.median(xy, axis=0)) ** 2).sum(axis=1))
    x, y = xy[nearest] * source.scale
    side = max(1.0, source.spot_diameter_fullres * source.scale)
    reader.read_region(x - side / 2, y - side / 2, side, side)


def _decode_first_patch(source: ImageSource) -> None:
    """Decode the first row of the library's file of precomputed patches."""
    import h5py

    # the reader of these files owns the names of their datasets; it imports this module
    from rankbygene.data._patches import _PATCH_IMAGE_KEYS

    with _naming_the_image(source), h5py.File(source.patches_path, "r") as handle:
        key = next((k for k in _PATCH_IMAGE_KEYS if k in handle), None)
        if key is not None and len(handle[key]):
            as_rgb_uint8(np.asarray(handle[key][0]), name=f"{source.patches_path}[{key!r}][0]")
    if key is None:
        raise KeyError(
            f"Patches file {source.patches_path} (library {source.library_id!r}) has no dataset "
            f"of patches (one of {list(_PATCH_IMAGE_KEYS)})."
        )
