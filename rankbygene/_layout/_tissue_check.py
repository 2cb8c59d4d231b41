"""Whether the spots lie where the image's tissue is, as given or once rescaled or transposed.

Coordinates scaled by 2 or 1/2, or with x and y exchanged, can still lie inside the image, where
the checks on the image's size cannot see them. The image itself can: the spots' footprint must
cover the tissue of a thumbnail (its tissue mask, as for tiling), and, where there is
expression, the colours of the image at the spots must follow their expression. Both are
measured for the coordinates as given and for each correction; a correction that fits clearly
better is the finding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage, sparse
from scipy.spatial import cKDTree

from rankbygene._image import ImageReader, as_rgb_uint8, is_lazy_array
from rankbygene._layout._entry import image_scales, scaled_size, shrink
from rankbygene._layout._keys import IMAGES_KEY
from rankbygene._layout._sources import ImageSource
from rankbygene._layout._tissue import read_thumbnail, tissue_mask

# The layout check against the image (validate_layout): spots lie where the tissue is.
#: Long side in pixels of the thumbnail whose tissue mask and colours the spots are compared with.
LAYOUT_THUMBNAIL_SIDE = 512
#: Overlap (Dice) of the spots' footprint with the tissue mask, and leave-one-out R^2 of the
#: image's colours at the spots from expression: what coordinates corrected by a factor or a
#: swap must reach (either), and the gains over the coordinates as given that decide alone (in
#: these units, partial gains of both add up). Measured on the HER2+ sections (B4, C2-C4), 60
#: synthetic Visium slides and 53 Visium HD fields: for valid coordinates, no correction gained
#: more than 0.01 overlap; where one gained agreement (0.31 at most: HER2+ C4 with every gene,
#: 0.21 against -0.10), its overlap was 0.13 worse. Corrections of real errors gained 0.14 (swap,
#: C2 and C4) to 0.9 overlap, or 0.4-0.9 agreement on the synthetic slides.
MIN_TISSUE_OVERLAP = 0.5
TISSUE_OVERLAP_GAIN = 0.1
MIN_IMAGE_AGREEMENT = 0.4
IMAGE_AGREEMENT_GAIN = 0.3
#: A correction whose overlap is worse than that of the coordinates as given by more than this
#: is no finding, whatever its agreement.
TISSUE_OVERLAP_SLACK = 0.05
#: Share of the spots that must lie on the image for their agreement with it to count.
MIN_AGREEMENT_INSIDE = 0.9
#: Spots needed for the agreement, and spots sampled for it at most.
MIN_AGREEMENT_SPOTS = 30
MAX_AGREEMENT_SPOTS = 2000


__all__ = ["Correction", "LayoutThumbnail", "corrections", "layout_thumbnail", "tissue_finding"]


@dataclass(frozen=True)
class Correction:
    """A change of the coordinates that may put the spots where the tissue is.

    Attributes
    ----------
    name
        What the coordinates look like, for the message.
    fix
        How to correct them, for the message.
    apply
        The corrected ``(n, 2)`` coordinates.
    """

    name: str
    fix: str
    apply: Callable[[np.ndarray], np.ndarray]


def corrections() -> dict[str, Correction]:
    """The coordinates as given (``"as given"``) and the corrections tried."""
    return {
        "as given": Correction("as given", "", lambda xy: xy),
        "swap": Correction(
            "(y, x), not (x, y)",
            "swap the columns: adata.obsm[key] = adata.obsm[key][:, [1, 0]]",
            lambda xy: xy[:, ::-1],
        ),
        "x2": Correction(
            "full-resolution pixels x 0.5 (pixels of an image at half the resolution)",
            "multiply them by 2",
            lambda xy: xy * 2.0,
        ),
        "x0.5": Correction(
            "full-resolution pixels x 2",
            "divide them by 2",
            lambda xy: xy / 2.0,
        ),
    }


@dataclass(frozen=True)
class LayoutThumbnail:
    """A library's image, small, with its tissue mask.

    Attributes
    ----------
    rgb
        ``(h, w, 3)`` uint8 thumbnail.
    scale
        Thumbnail pixels per full-resolution pixel.
    tissue
        Boolean ``(h, w)`` tissue mask, holes filled (fat and lumens inside the tissue count).
    sums
        ``(h + 1, w + 1, 4)`` summed-area table of R, G, B and the tissue mask, for means over
        boxes.
    """

    rgb: np.ndarray
    scale: float
    tissue: np.ndarray
    sums: np.ndarray


def layout_thumbnail(
    entry: Mapping[str, Any] | None, source: ImageSource, reader: ImageReader
) -> LayoutThumbnail:
    """The thumbnail of a library's image that the layout check uses, and its tissue mask.

    An in-memory image of the library's ``uns["spatial"]`` entry (``hires``, ``lowres``) is
    used when one is large enough, as it costs no decoding; else the thumbnail is read from
    ``reader`` (the library's image), band by band.

    Parameters
    ----------
    entry
        The library's ``uns["spatial"]`` entry.
    source
        Where the library's pixels are.
    reader
        The library's image, opened.
    """
    side = LAYOUT_THUMBNAIL_SIDE
    rgb: np.ndarray | None = None
    scale = 0.0
    images = (entry or {}).get(IMAGES_KEY) or {}
    sized = []
    for key, image_scale in image_scales(entry or {}).items():
        image = images[key]
        if is_lazy_array(image) or not hasattr(image, "shape") or len(image.shape) < 2:
            continue
        sized.append((max(image.shape[:2]), key, image_scale))
    large = sorted(item for item in sized if item[0] >= side)
    if large:
        _, key, image_scale = large[0]
        image = as_rgb_uint8(np.asarray(images[key]))
        factor = side / max(image.shape[:2])
        rgb = shrink(image, scaled_size(image.shape[:2], factor))
        scale = image_scale * rgb.shape[1] / image.shape[1]
    if rgb is None:
        height, width = reader.shape
        factor = min(1.0, side / max(height, width))
        rgb = read_thumbnail(reader, factor)
        scale = source.scale * rgb.shape[1] / width
    mask, _ = tissue_mask(rgb)
    tissue = ndimage.binary_fill_holes(mask)
    channels = np.concatenate([rgb, tissue[..., None]], axis=-1).astype(np.float64)
    sums = np.zeros((rgb.shape[0] + 1, rgb.shape[1] + 1, 4))
    sums[1:, 1:] = channels.cumsum(axis=0).cumsum(axis=1)
    return LayoutThumbnail(rgb, float(scale), tissue, sums)


@dataclass(frozen=True)
class _Fit:
    overlap: float  # Dice of the spots' footprint and the tissue mask
    agreement: float  # leave-one-out R^2 of the image's colours at the spots from expression


def tissue_finding(
    xy: np.ndarray,
    diameter: float,
    thumbnail: LayoutThumbnail,
    expression: np.ndarray | sparse.spmatrix | None = None,
    is_log_normalized: bool = False,
) -> str | None:
    """What correction of the coordinates puts the spots clearly better on the tissue.

    Two measures, for the coordinates as given and for each correction of :func:`corrections`:

    - overlap: the Dice coefficient of the spots' footprint (each spot widened to 0.75 of the
      spots' spacing) and the thumbnail's tissue mask;
    - agreement (with ``expression``): how well expression (its first principal components)
      predicts the colours and the tissue fraction of the thumbnail at the spots (leave-one-out
      R^2 of a ridge regression), where ``MIN_AGREEMENT_INSIDE`` of the spots lie on the image.

    A correction is the finding when it fits well (its overlap reaches ``MIN_TISSUE_OVERLAP``
    or its agreement ``MIN_IMAGE_AGREEMENT``), its overlap is no worse than that of the
    coordinates as given (by more than ``TISSUE_OVERLAP_SLACK``), and its gains over them, in
    units of ``TISSUE_OVERLAP_GAIN`` and ``IMAGE_AGREEMENT_GAIN``, add up to at least 1: either
    gain alone, or both in part. The agreement of the coordinates as given counts as 0 when
    negative. Tissue masks of almost nothing or almost everything, and expression without
    signal, decide nothing.

    Parameters
    ----------
    xy
        Spot centres, full-resolution pixels.
    diameter
        Spot diameter, full-resolution pixels.
    thumbnail
        The library's :class:`LayoutThumbnail`.
    expression
        ``(n_spots, n_genes)`` counts (or log-normalised values), rows as ``xy``.
    is_log_normalized
        ``expression`` is already log-normalised.

    Returns
    -------
    The message (what the coordinates look like, the measures, the fix), or ``None``.
    """
    tissue_share = float(thumbnail.tissue.mean())
    mask_informative = 0.01 < tissue_share < 0.99
    components = _expression_components(expression, is_log_normalized, len(xy))
    fits = {}
    for key, correction in corrections().items():
        corrected = correction.apply(xy)
        overlap = _overlap(corrected, thumbnail) if mask_informative else float("nan")
        agreement = (
            _agreement(corrected, diameter, thumbnail, *components)
            if components is not None
            else float("nan")
        )
        fits[key] = _Fit(overlap, agreement)
    given = fits.pop("as given")
    # chance gives a negative R^2 as often as a positive one: the gain is over what is explained
    given_agreement = max(_or(given.agreement, 0.0), 0.0)
    found = []
    for key, fit in fits.items():
        # each measure's gain in units of the gain that alone decides; they add up
        tissue = _or(fit.overlap - given.overlap, 0.0) / TISSUE_OVERLAP_GAIN
        image = max(_or(fit.agreement - given_agreement, 0.0), 0.0) / IMAGE_AGREEMENT_GAIN
        fits_well = fit.overlap >= MIN_TISSUE_OVERLAP or fit.agreement >= MIN_IMAGE_AGREEMENT
        contradicted = tissue < -TISSUE_OVERLAP_SLACK / TISSUE_OVERLAP_GAIN
        score = max(tissue, 0.0) + image
        if score >= 1 and fits_well and not contradicted:
            found.append((score, key, fit))
    if not found:
        return None
    _, key, fit = max(found, key=lambda item: item[0])
    correction = corrections()[key]
    measures = []
    if np.isfinite(fit.overlap):
        measures.append(
            f"their footprint overlaps the tissue of the image by {fit.overlap:.2f} (Dice) "
            f"against {given.overlap:.2f} as given"
        )
    if np.isfinite(fit.agreement):
        measures.append(
            f"their expression predicts the image's colours there with R^2 {fit.agreement:.2f} "
            f"against {_or(given.agreement, 0.0):.2f} as given"
        )
    return (
        f"looks like {correction.name}: once corrected, {'; '.join(measures)}. To correct "
        f"the coordinates, {correction.fix}."
    )


def _or(value: float, default: float) -> float:
    return value if np.isfinite(value) else default


def _overlap(xy: np.ndarray, thumbnail: LayoutThumbnail) -> float:
    """Dice of the spots' footprint and the tissue mask, on a grid of about a third of a radius.

    Spots off the image count against: their footprint is drawn on the grid up to a radius
    beyond the image, and counted as whole discs further away (where it meets no tissue).
    """
    points = xy * thumbnail.scale
    radius = 0.75 * _spacing(points)
    if not np.isfinite(radius) or radius <= 0:
        return float("nan")
    cell = max(1, int(radius // 3))
    tissue = thumbnail.tissue
    height, width = tissue.shape
    rows, cols = -(-height // cell), -(-width // cell)
    padded = np.zeros((rows * cell, cols * cell), dtype=np.float32)
    padded[:height, :width] = tissue
    coarse = padded.reshape(rows, cell, cols, cell).mean(axis=(1, 3)) >= 0.5
    r = radius / cell
    pad = int(np.ceil(r)) + 1
    cells = np.floor(points / cell).astype(np.int64) + pad
    near = (
        (cells >= 0).all(axis=1) & (cells[:, 0] < cols + 2 * pad) & (cells[:, 1] < rows + 2 * pad)
    )
    canvas = np.ones((rows + 2 * pad, cols + 2 * pad), dtype=bool)
    canvas[cells[near, 1], cells[near, 0]] = False
    footprint = ndimage.distance_transform_edt(canvas) <= r if near.any() else ~canvas
    on_tissue = np.zeros_like(footprint)
    on_tissue[pad : pad + rows, pad : pad + cols] = coarse
    both = np.count_nonzero(footprint & on_tissue)
    area = np.count_nonzero(footprint) + np.count_nonzero(~near) * np.pi * r**2
    return 2.0 * both / (area + np.count_nonzero(on_tissue))


def _spacing(points: np.ndarray) -> float:
    """Median distance from a spot to its nearest other spot."""
    if len(points) < 2:
        return float("nan")
    distances, _ = cKDTree(points).query(points, k=2)
    return float(np.median(distances[:, 1]))


def _expression_components(
    expression: np.ndarray | sparse.spmatrix | None, is_log_normalized: bool, n_spots: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The spots sampled for the agreement and their expression's principal components."""
    if expression is None or n_spots < MIN_AGREEMENT_SPOTS or expression.shape[1] < 2:
        return None
    import scanpy as sc

    rows = np.arange(n_spots)
    if n_spots > MAX_AGREEMENT_SPOTS:
        rows = np.sort(np.random.default_rng(0).choice(n_spots, MAX_AGREEMENT_SPOTS, False))
    values: Any = expression[rows]  # dense or sparse
    values = (values.toarray() if sparse.issparse(values) else np.asarray(values)).astype(
        np.float64
    )
    if not is_log_normalized:
        totals = values.sum(axis=1, keepdims=True)
        values = sc.pp.log1p(values / np.where(totals > 0, totals, 1.0) * 1e4)
    varying = values.std(axis=0) > 0
    n_components = min(20, len(rows) - 1, int(varying.sum()) - 1)
    if n_components < 1:
        return None
    components = sc.pp.pca(values[:, varying], n_comps=n_components, random_state=0)
    return rows, components


def _agreement(
    xy: np.ndarray,
    diameter: float,
    thumbnail: LayoutThumbnail,
    rows: np.ndarray,
    components: np.ndarray,
) -> float:
    """Leave-one-out R^2 of the thumbnail's colours and tissue at the spots from expression."""
    from sklearn.linear_model import RidgeCV

    points = xy[rows] * thumbnail.scale
    height, width = thumbnail.tissue.shape
    inside = (points >= 0).all(axis=1) & (points[:, 0] < width) & (points[:, 1] < height)
    if inside.mean() < MIN_AGREEMENT_INSIDE:
        # the colours of glass around the image, constant, would be predicted from whatever
        # in expression tells the few spots inside apart
        return float("nan")
    features = _spot_means(thumbnail, points, diameter * thumbnail.scale)
    spread = features.std(axis=0)
    features = features[:, spread > 1e-6]
    if not features.shape[1]:
        return float("nan")
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    # ridge's leave-one-out errors come in closed form, for every penalty at once
    ridge = RidgeCV(alphas=np.logspace(-2, 3, 11), store_cv_results=True).fit(components, features)
    errors = ridge.cv_results_.sum(axis=(0, 1))
    return float(1.0 - errors.min() / (features**2).sum())


def _spot_means(thumbnail: LayoutThumbnail, points: np.ndarray, side: float) -> np.ndarray:
    """Mean R, G, B and tissue share of the thumbnail in each spot's square (glass off it)."""
    height, width = thumbnail.tissue.shape
    half = max(side / 2, 0.5)
    x0 = np.clip(np.floor(points[:, 0] - half), 0, width).astype(np.int64)
    x1 = np.clip(np.ceil(points[:, 0] + half), 0, width).astype(np.int64)
    y0 = np.clip(np.floor(points[:, 1] - half), 0, height).astype(np.int64)
    y1 = np.clip(np.ceil(points[:, 1] + half), 0, height).astype(np.int64)
    area = ((x1 - x0) * (y1 - y0))[:, None]
    table = thumbnail.sums
    total = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    glass = np.array([255.0, 255.0, 255.0, 0.0])
    return np.where(area > 0, total / np.maximum(area, 1), glass)
