"""Checks of the layout before any work: spots in full-resolution pixels, images that decode.

Coordinates in other units are accepted by every reader of patches and give patches of the wrong
places, so :func:`validate_layout` looks for them (from each image's size and the spot diameter)
and decodes one patch per image, so that a wrong layout or a corrupt file fails at setup, named.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from rankbygene._image import PATCH_IMAGE_KEYS, ImageReader, PatchFile, PILImage
from rankbygene._layout._entry import scalefactor_image
from rankbygene._layout._keys import IMAGES_KEY, SCALEFACTORS_KEY, SPATIAL_KEY
from rankbygene._layout._sources import ImageSource, spatial_coordinates
from rankbygene._layout._tissue_check import layout_thumbnail, tissue_finding
from rankbygene._logging import logger

# What setup_anndata takes for coordinates in the wrong units.
#: Spots closer to their nearest neighbour than this many spot diameters (median) would overlap:
#: their coordinates (or the diameter) are not in full-resolution pixels.
MIN_SPOT_SPACING = 0.5
#: Spacing in spot diameters that a correction of the coordinates must restore to be a likely
#: one (arrays of touching spots or bins have about 1, Visium 1.8, legacy ST 2).
PLAUSIBLE_SPOT_SPACING = (0.8, 4.0)
#: Centre-to-centre distance in spot diameters of the usual arrays (Visium 100 um / 55 um, legacy
#: ST 200 um / 100 um): the spacing a likely correction of the coordinates should restore.
TYPICAL_SPOT_SPACING = 1.8
#: Spots whose extent stays within this fraction of the full-resolution image on both axes lie
#: in its top-left corner, as coordinates in downscaled-image pixels do.
CORNER_FRACTION = 1 / 3
#: Share of spots outside the image above which spots that all fit once x and y are exchanged
#: are taken for swapped coordinates.
SWAPPED_OUTSIDE_FRACTION = 0.1
#: Share of spots outside the image above which the coordinates (or the image's scale factor)
#: are taken for another unit: patches there would be padding, not tissue.
OUTSIDE_IMAGE_FRACTION = 0.5
#: Factors coordinates are commonly off by besides the images' scale factors: pixel positions of
#: a spot table divided by 10.
COMMON_COORDINATE_FACTORS = (10.0,)


__all__ = ["validate_layout"]


def validate_layout(
    adata: AnnData,
    sources: Mapping[str, ImageSource],
    libraries: Sequence[str] | np.ndarray,
    spatial_key: str = SPATIAL_KEY,
    check_units: bool = True,
    expression: np.ndarray | sparse.spmatrix | None = None,
    is_log_normalized: bool = False,
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
    - x and y swapped: many spots outside the image, all inside once exchanged;
    - most spots (``OUTSIDE_IMAGE_FRACTION``) outside the image otherwise: coordinates scaled
      up, or a ``tissue_<image>_scalef`` too large for the image it describes;
    - spots that lie clearly better on the image's tissue once multiplied by 2, divided by 2
      or with x and y exchanged: their footprint against the tissue mask of a thumbnail, and,
      with ``expression``, the image's colours at the spots against their expression
      (:func:`~rankbygene._layout._tissue_check.tissue_finding`).

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
    expression
        ``(n_obs, n_genes)`` counts (or log-normalised values) of the spots, to compare the
        image's colours at the spots with; ``None``: the tissue mask alone.
    is_log_normalized
        ``expression`` is already log-normalised.

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
        scalefactors = (entry.get(SCALEFACTORS_KEY) if isinstance(entry, Mapping) else None) or {}
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
            units = _units_finding(xy, size, source.spot_diameter_fullres, scalefactors)
            with _naming_the_image(source):
                _decode_one_patch(reader, xy, source)
                thumbnail = layout_thumbnail(
                    entry if isinstance(entry, Mapping) else None, source, reader
                )
            rows = expression[libraries == library_id] if expression is not None else None
            tissue = tissue_finding(
                xy, source.spot_diameter_fullres, thumbnail, rows, is_log_normalized
            )
            # measured on the image, the tissue's finding names the correction more surely
            if tissue is not None:
                _report(f"{where} {tissue}", check_units)
            elif units is not None:
                _report(f"{where} {units[0]}", units[1] and check_units)
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
    _report(f"{where} {message}", certain and strict)


def _report(message: str, error: bool) -> None:
    """Raise a finding about the layout, or log it as a warning."""
    if error:
        raise ValueError(
            f"{message} Pass check_layout=False to setup_anndata to use the coordinates as "
            "they are."
        )
    logger.warning(message)


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
        if outside.mean() > OUTSIDE_IMAGE_FRACTION:
            span = max(xy[:, 0].max() / width, xy[:, 1].max() / height)
            fits = [
                f"{factor:.4g}"
                for factor, _, _ in _likely_factors(scalefactors)
                if _inside(xy / factor, width, height, margin).mean() >= 0.99
                and span / factor >= 0.5
            ]
            fit = f" They fit once divided by {' or '.join(fits)}." if fits else ""
            return (
                f"puts {int(outside.sum())} of {len(xy)} spots outside the {width:.0f} x "
                f"{height:.0f} px (width x height) full-resolution image; the spots reach "
                f"{span:.3g} times its size.{fit} Are the coordinates in another unit (multiplied "
                "by a factor), or is the image's tissue_<image>_scalef too large?",
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
        image = scalefactor_image(key)
        if image is None:
            continue
        try:
            scale = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(scale) and 0 < scale < 1:
            factors.append((1 / scale, f"{image} pixels", f"multiply by 1/{key} = {1 / scale:.4g}"))
    for common in COMMON_COORDINATE_FACTORS:
        factors.append(
            (common, f"full-resolution pixels divided by {common:g}", f"multiply by {common:g}")
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
                f"image adata.uns[{SPATIAL_KEY!r}][{source.library_id!r}][{IMAGES_KEY!r}]"
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
    # No larger than the image: only its pixels need decoding, and a scale factor far too large
    # would otherwise allocate a white canvas of terabytes (a MemoryError)
    side = min(max(1.0, source.spot_diameter_fullres * source.scale), float(max(reader.shape)))
    reader.read_region(x - side / 2, y - side / 2, side, side)


def _decode_first_patch(source: ImageSource) -> None:
    """Decode the first row of the library's file of precomputed patches."""
    with _naming_the_image(source), PatchFile(source.file) as patches:
        if patches.image_key is not None and patches.image_shape[0]:
            patches.read(0)
    if patches.image_key is None:
        raise KeyError(
            f"Patches file {source.patches_path} (library {source.library_id!r}) has no dataset "
            f"of patches (one of {list(PATCH_IMAGE_KEYS)})."
        )
