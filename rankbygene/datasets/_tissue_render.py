"""The synthetic tissue: region layout, cell composition and H&E image of one slide.

The morphology model that :func:`rankbygene.datasets.synthetic` measures spots on and
:func:`rankbygene.datasets.synthetic_visium_hd` measures bins on; the expression those
measurements carry is modelled in :mod:`rankbygene.datasets._synthetic`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["CELL_TYPES", "REGION_TYPES", "SyntheticTissue", "render_tissue"]

#: Region (tissue compartment) types, in the order used for ``n_regions`` < 5.
REGION_TYPES: tuple[str, ...] = ("tumor", "stroma", "immune", "adipose", "necrosis")

# Stain vectors in optical-density space (typical Macenko H&E reference vectors).
_OD_HEMATOXYLIN = np.array([0.5626, 0.7201, 0.4062])
_OD_EOSIN = np.array([0.2159, 0.8012, 0.5581])
_BACKGROUND_RGB = np.array([241.0, 240.0, 242.0])

# Background stain concentrations (eosin, haematoxylin) of each region's extracellular
# matter / cytoplasm.
_BACKGROUND_STAIN = {
    "tumor": (0.40, 0.20),
    "stroma": (0.55, 0.03),
    "immune": (0.22, 0.12),
    "adipose": (0.02, 0.0),
    "necrosis": (0.38, 0.07),
}

# Nucleus populations, scattered on a jittered hexagonal lattice (nuclei do not pile up):
# lattice spacing (px); probability that a lattice site holds a nucleus, per region, as
# ``(base, gain)``: ``base + gain * field`` with ``field`` one of the smooth composition fields
# below (0 to 1); semi-major axis range (px), minor/major aspect range and haematoxylin
# concentration range. About 1 um per pixel: tumour nuclei ~10-17 um, lymphocytes ~6-7 um.
# Kinds are placed in this order; a later nucleus whose centre falls on an earlier one is dropped.
_NUCLEI = {
    "tumor": {
        "spacing": 17.0,
        "field": "grade",
        # Higher grade, higher cellularity.
        "keep": {"tumor": (0.5, 0.45)},
        "a": (4.5, 6.5),
        "aspect": (0.65, 1.0),
        "stain": (0.7, 1.1),
    },
    "fibroblast": {
        "spacing": 24.0,
        "field": "fibroblast",
        # Cellular (young, reactive) versus sclerotic, hypocellular stroma.
        "keep": {"stroma": (0.15, 0.8), "adipose": (0.06, 0.0), "tumor": (0.04, 0.0)},
        "a": (6.0, 9.0),
        "aspect": (0.22, 0.35),
        "stain": (1.3, 1.8),
    },
    "lymphocyte": {
        "spacing": 7.5,
        "field": "infiltration",
        # Dense aggregates in immune regions; patchy infiltrates elsewhere.
        "keep": {
            "immune": (0.85, 0.0),
            "stroma": (0.0, 0.55),
            "tumor": (0.0, 0.4),
            "adipose": (0.003, 0.05),
            "necrosis": (0.0, 0.1),
        },
        "a": (2.7, 3.5),
        "aspect": (0.85, 1.0),
        "stain": (2.2, 2.8),
    },
    "debris": {
        "spacing": 9.0,
        "field": None,
        "keep": {"necrosis": (0.7, 0.0)},
        "a": (0.8, 2.2),
        "aspect": (0.5, 1.0),
        "stain": (0.8, 1.5),
    },
    "ghost": {
        "spacing": 26.0,
        "field": None,
        "keep": {"necrosis": (0.8, 0.0)},
        "a": (4.0, 7.0),
        "aspect": (0.6, 1.0),
        "stain": (0.25, 0.45),
    },
}

# Cycling (high-grade) tumour cells: a share of the tumour nuclei that grows with the grade field;
# large, hyperchromatic, pleomorphic nuclei.
_CYCLING = {"share": (0.05, 0.6), "a": (7.0, 10.0), "aspect": (0.5, 1.0), "stain": (1.1, 1.6)}

#: Nucleus kinds counted under each spot (columns of ``obsm["cell_counts"]``); ``"tumor"`` counts
#: the non-cycling tumour cells only.
CELL_TYPES: tuple[str, ...] = (
    "tumor",
    "tumor_cycling",
    "lymphocyte",
    "fibroblast",
    "debris",
    "ghost",
)


# --------------------------------------------------------------------------- layout


def _smooth_noise(rng, shape, sigma, n=None):
    """Standardised Gaussian-smoothed white noise (``n`` stacked fields when given).

    Wide kernels are applied on a grid coarsened to ~2 px per sigma and upsampled bilinearly:
    the field is smooth at that scale anyway, and this keeps the cost independent of sigma.
    """
    step = max(1, int(sigma // 2))
    small = (math.ceil(shape[0] / step), math.ceil(shape[1] / step))
    fields = rng.standard_normal((1 if n is None else n, *small), dtype=np.float32)
    fields = ndimage.gaussian_filter(fields, (0, sigma / step, sigma / step), truncate=3.0)
    if step > 1:
        fields = np.stack([_upsample(f, shape) for f in fields])
    fields -= fields.mean(axis=(1, 2), keepdims=True)
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-8
    return fields[0] if n is None else fields


def _upsample(field, shape):
    """Bilinear resize of a coarse 2-D float field to ``shape`` (fast, through Pillow)."""
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32))
    return np.array(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _region_labels(rng, shape, n_regions, spacing, coarse):
    """Region index per coarse pixel: argmax of smoothed noise fields, areas nudged to shares."""
    small = (math.ceil(shape[0] / coarse), math.ceil(shape[1] / coarse))
    fields = _smooth_noise(rng, small, 1.3 * spacing / coarse, n=n_regions)
    target = rng.dirichlet(np.full(n_regions, 6.0))
    offset = np.zeros(n_regions, dtype=np.float32)
    sub = fields[:, ::2, ::2]
    for _ in range(20):
        lab = np.argmax(sub + offset[:, None, None], axis=0)
        area = np.bincount(lab.ravel(), minlength=n_regions) / lab.size
        offset += 0.4 * (np.log(target) - np.log(area + 1e-3)).astype(np.float32)
    return np.argmax(fields + offset[:, None, None], axis=0).astype(np.uint8)


# --------------------------------------------------------------------------- image


class SyntheticTissue(NamedTuple):
    """One synthetic slide's tissue, as :func:`render_tissue` returns it."""

    #: ``(H, W, 3)`` uint8 H&E-like image, about 1 um per pixel.
    image: np.ndarray
    #: ``(H, W)`` uint8 region index of each pixel, into the ``regions`` it was made with.
    labels: np.ndarray
    #: Nucleus centres ``(n, 2)`` (x, y, in pixels) of each kind of :data:`CELL_TYPES`, in tissue
    #: and under the glass alike (there they are not drawn).
    nuclei: dict[str, np.ndarray]
    #: ``(H, W)`` float32: 1 in the tissue, 0 on glass, a few pixels of ramp between.
    tissue: np.ndarray


def render_tissue(
    rng: np.random.Generator,
    shape: tuple[int, int],
    regions: Sequence[str],
    xy: np.ndarray,
    spot_diameter: float,
    length_scale: float,
) -> SyntheticTissue:
    """Region layout, cell composition and H&E image of one slide.

    Steps 1-3 of :func:`~rankbygene.datasets.synthetic`: the morphology model that it and
    :func:`~rankbygene.datasets.synthetic_visium_hd` measure spots or bins on.

    Parameters
    ----------
    rng
        Random generator; the slide is a deterministic function of its state and the arguments.
    shape
        ``(height, width)`` of the image in pixels (about 1 um each).
    regions
        Region types present, a prefix of :data:`REGION_TYPES`.
    xy
        Centres ``(x, y)`` of the spots or bins to be measured: the tissue covers their bounding
        box plus ``spot_diameter / 2 + 0.45 * length_scale`` and an irregular border; beyond
        that is glass.
    spot_diameter
        Spot (or bin) size in pixels.
    length_scale
        Spot spacing the layout is scaled to, in pixels: regions are about 1.3 length scales
        across, cell composition varies over 0.6 to 0.9.

    Returns
    -------
    The image, the region label of each pixel, the nucleus centres of each cell type and the
    tissue map.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.datasets._tissue_render import CELL_TYPES, REGION_TYPES, render_tissue
    >>> xy = np.array([[50.0, 50.0], [250.0, 250.0]])
    >>> tissue = render_tissue(np.random.default_rng(0), (300, 300), REGION_TYPES[:3], xy, 16, 100)
    >>> tissue.image.shape, sorted(tissue.nuclei) == sorted(CELL_TYPES)
    ((300, 300, 3), True)
    """
    regions = list(regions)
    coarse = 4
    coarse_labels = _region_labels(rng, shape, len(regions), length_scale, coarse)
    labels = np.repeat(np.repeat(coarse_labels, coarse, axis=0), coarse, axis=1)
    labels = labels[: shape[0], : shape[1]]
    image, nuclei, tissue = _render(
        rng, coarse_labels, labels, regions, xy, spot_diameter, length_scale, coarse
    )
    return SyntheticTissue(image, labels, nuclei, tissue)


def _lattice_points(rng, shape, spacing):
    """Jittered hexagonal lattice sites (x, y) over an image of ``shape``."""
    height, width = shape
    row_step = spacing * math.sqrt(3) / 2
    ys = np.arange(row_step / 2, height, row_step)
    xs = np.arange(spacing / 2, width, spacing)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing / 2
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    pts += rng.uniform(-0.3 * spacing, 0.3 * spacing, pts.shape)
    pts[:, 0] = np.clip(pts[:, 0], 0, width - 1)
    pts[:, 1] = np.clip(pts[:, 1], 0, height - 1)
    return pts


def _composition_fields(rng, small, spacing, coarse):
    """Smooth fields (0 to 1, coarse grid) that set the cell composition inside regions.

    Length scales of about half to one spot spacing, so composition changes from spot to spot
    but coherently, as infiltrates, grade and stromal cellularity do in tissue.
    """
    z = {
        "infiltration": _smooth_noise(rng, small, 0.6 * spacing / coarse),
        "grade": _smooth_noise(rng, small, 0.9 * spacing / coarse),
        "fibroblast": _smooth_noise(rng, small, 0.7 * spacing / coarse),
    }
    # Infiltration is skewed: mostly sparse, with dense hot spots.
    return {
        "infiltration": _expit(2.0 * z["infiltration"] - 1.3),
        "grade": _expit(1.8 * z["grade"]),
        "fibroblast": _expit(1.8 * z["fibroblast"]),
    }


def _expit(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _keep_probability(spec, region, field, regions):
    """Probability that each lattice site holds a nucleus, from its region and field value."""
    base = np.array([spec["keep"].get(r, (0.0, 0.0))[0] for r in regions])
    gain = np.array([spec["keep"].get(r, (0.0, 0.0))[1] for r in regions])
    keep = base[region]
    if field is not None:
        keep = keep + gain[region] * field
    return keep


def _nuclei_stamps(rng, shape, centres, a_range, aspect_range, stain_range, theta=None, scale=None):
    """Flat pixel indices and haematoxylin weights of soft elliptical nuclei.

    ``scale`` (per nucleus) multiplies the size drawn from ``a_range``.
    """
    n = len(centres)
    height, width = shape
    a = rng.uniform(*a_range, n)
    if scale is not None:
        a = a * scale
    a = a.astype(np.float32)[:, None, None]
    b = a * rng.uniform(*aspect_range, n).astype(np.float32)[:, None, None]
    if theta is None:
        theta = rng.uniform(0, np.pi, n)
    stain = rng.uniform(*stain_range, n).astype(np.float32)[:, None, None]
    half = math.ceil(float(a.max(initial=0.0))) + 1
    off = np.arange(-half, half + 1)
    iy = np.rint(centres[:, 1]).astype(np.int64)
    ix = np.rint(centres[:, 0]).astype(np.int64)
    ddy = (off[None, :, None] - (centres[:, 1] - iy)[:, None, None]).astype(np.float32)
    ddx = (off[None, None, :] - (centres[:, 0] - ix)[:, None, None]).astype(np.float32)
    cos = np.cos(theta).astype(np.float32)[:, None, None]
    sin = np.sin(theta).astype(np.float32)[:, None, None]
    rad2 = ((ddx * cos + ddy * sin) / a) ** 2 + ((ddy * cos - ddx * sin) / b) ** 2
    # Soft edge about a pixel wide ((1 - r^2) / 2 ~ 1 - r near the edge), darker rim (membrane),
    # and coarse chromatin.
    weight = np.clip((1.0 - rad2) * (0.5 * b) + 0.5, 0.0, 1.0)
    chromatin = rng.uniform(0.7, 1.1, weight.shape).astype(np.float32)
    weight *= (0.8 + 0.25 * rad2) * chromatin * stain
    py = iy[:, None, None] + off[None, :, None]
    px = ix[:, None, None] + off[None, None, :]
    ok = (weight > 0) & (py >= 0) & (py < height) & (px >= 0) & (px < width)
    return (py * width + px)[ok], weight[ok]


def _adipose_membranes(rng, shape, cell_size, coarse=2):
    """Thin boundaries of a jittered-grid Voronoi tessellation (large polygonal cells)."""
    small = (math.ceil(shape[0] / coarse), math.ceil(shape[1] / coarse))
    step = cell_size / coarse
    gy, gx = np.meshgrid(
        np.arange(step / 2, small[0], step), np.arange(step / 2, small[1], step), indexing="ij"
    )
    seeds = np.column_stack([gy.ravel(), gx.ravel()])
    seeds += rng.uniform(-0.4 * step, 0.4 * step, seeds.shape)
    seeds = np.clip(np.rint(seeds), 0, np.array(small) - 1).astype(np.int64)
    not_seed = np.ones(small, dtype=bool)
    not_seed[seeds[:, 0], seeds[:, 1]] = False
    ids = np.zeros(small, dtype=np.int64)
    ids[seeds[:, 0], seeds[:, 1]] = np.arange(1, len(seeds) + 1)
    idx = ndimage.distance_transform_edt(not_seed, return_distances=False, return_indices=True)
    cell = ids[idx[0], idx[1]]
    border = np.zeros(small, dtype=bool)
    border[:-1] |= cell[:-1] != cell[1:]
    border[:, :-1] |= cell[:, :-1] != cell[:, 1:]
    border = np.repeat(np.repeat(border, coarse, axis=0), coarse, axis=1)
    return border[: shape[0], : shape[1]]


def _render(rng, coarse_labels, labels, regions, xy, spot_diameter, spacing, coarse):
    """H&E-like RGB image (uint8) for a region label map, the nucleus centres of each kind and the
    tissue map (1 in tissue, 0 on glass)."""
    height, width = shape = labels.shape
    small = coarse_labels.shape
    f32 = np.float32

    # Background stain concentrations per region, blended over a few pixels at region borders,
    # with slow spatial variation in staining strength.
    lut_e = np.array([_BACKGROUND_STAIN[r][0] for r in regions], dtype=f32)
    lut_h = np.array([_BACKGROUND_STAIN[r][1] for r in regions], dtype=f32)
    mottle = 1.0 + 0.10 * _smooth_noise(rng, small, 3.0)
    bg_e = ndimage.gaussian_filter(lut_e[coarse_labels], 0.8) * mottle
    bg_h = ndimage.gaussian_filter(lut_h[coarse_labels], 0.8)

    # Glass outside an irregular tissue border around the spot grid (coarse, then upsampled).
    pad = 0.5 * spot_diameter + 0.45 * spacing
    cy = (np.arange(small[0], dtype=f32)[:, None] + 0.5) * coarse
    cx = (np.arange(small[1], dtype=f32)[None, :] + 0.5) * coarse
    lo, hi = xy.min(axis=0) - pad, xy.max(axis=0) + pad
    outside = np.maximum(
        np.maximum(np.maximum(lo[0] - cx, cx - hi[0]), 0),
        np.maximum(np.maximum(lo[1] - cy, cy - hi[1]), 0),
    )
    border = 0.5 * spacing * (0.5 + 0.5 * np.tanh(_smooth_noise(rng, small, 15.0)))
    tissue = np.clip(1.0 - (outside - border) / 4.0, 0.0, 1.0).astype(f32)

    conc_e = _upsample(bg_e, shape)
    conc_h = _upsample(bg_h, shape)
    tissue = _upsample(tissue, shape)

    if "stroma" in regions:
        # Wavy collagen fibres: stripes along a warped coordinate, broken up by noise.
        k = regions.index("stroma")
        angle = rng.uniform(0, np.pi)
        warp = _upsample(
            _smooth_noise(rng, small, 60.0 / coarse) * 25.0 + _smooth_noise(rng, small, 2.0) * 3.0,
            shape,
        )
        t = (
            np.arange(width, dtype=f32)[None, :] * f32(np.cos(angle))
            + np.arange(height, dtype=f32)[:, None] * f32(np.sin(angle))
            + warp
        )
        # Thin pale clefts between eosinophilic collagen bundles.
        stripes = 0.5 + 0.5 * np.sin(t * f32(2 * np.pi / rng.uniform(8.0, 12.0)))
        stripes *= stripes
        stripes *= stripes
        breaks = np.clip(_upsample(_smooth_noise(rng, small, 1.5), shape) + 0.3, 0, 1)
        conc_e *= np.where(labels == k, 1.15 - 0.75 * stripes * breaks, f32(1.0))
        stroma_angle = angle
    else:
        stroma_angle = None

    if "adipose" in regions:
        k = regions.index("adipose")
        membranes = _adipose_membranes(rng, shape, cell_size=rng.uniform(55, 75))
        conc_e += np.where(membranes & (labels == k), f32(0.8), f32(0.0))

    if "necrosis" in regions:
        k = regions.index("necrosis")
        blotch = _upsample(_smooth_noise(rng, small, 2.5), shape)
        conc_e *= np.where(labels == k, 0.8 + 0.3 * blotch, f32(1.0))

    # Nuclei, kind after kind; the centres are kept to count the cells under each spot.
    fields = _composition_fields(rng, small, spacing, coarse)
    centres = {}
    flats, weights = [], []
    occupied = np.zeros(height * width, dtype=bool)
    for kind, spec in _NUCLEI.items():
        if not any(sum(spec["keep"].get(r, (0.0, 0.0))) > 0 for r in regions):
            # None of this kind on the slide (e.g. no necrosis).
            for name in ("tumor", "tumor_cycling") if kind == "tumor" else (kind,):
                centres[name] = np.empty((0, 2))
            continue
        pts = _lattice_points(rng, shape, spec["spacing"])
        iy, ix = pts[:, 1].astype(np.int64), pts[:, 0].astype(np.int64)
        field = None
        if spec["field"] is not None:
            field = fields[spec["field"]][iy // coarse, ix // coarse]
        kept = rng.uniform(size=len(pts)) < _keep_probability(spec, labels[iy, ix], field, regions)
        # Nuclei do not overlap: drop sites that fall on an earlier nucleus.
        kept &= ~occupied[iy * width + ix]
        pts = pts[kept]
        if kind == "tumor":
            grade = field[kept]
            lo, gain = _CYCLING["share"]
            cycling = rng.uniform(size=len(pts)) < lo + gain * grade
            centres["tumor"], centres["tumor_cycling"] = pts[~cycling], pts[cycling]
            # Nuclei of non-cycling cells also enlarge with grade (pleomorphism).
            stamps = [
                _nuclei_stamps(
                    rng,
                    shape,
                    pts[~cycling],
                    spec["a"],
                    spec["aspect"],
                    spec["stain"],
                    scale=0.9 + 0.3 * grade[~cycling],
                ),
                _nuclei_stamps(
                    rng, shape, pts[cycling], _CYCLING["a"], _CYCLING["aspect"], _CYCLING["stain"]
                ),
            ]
        else:
            centres[kind] = pts
            theta = None
            if kind == "fibroblast" and stroma_angle is not None:
                # Fibroblasts lie along the collagen fibres.
                theta = stroma_angle + rng.normal(0, 0.25, len(pts))
            stamps = [
                _nuclei_stamps(rng, shape, pts, spec["a"], spec["aspect"], spec["stain"], theta)
            ]
        for flat, weight in stamps:
            flats.append(flat)
            weights.append(weight)
            occupied[flat] = True
    nuc = np.bincount(
        np.concatenate(flats), weights=np.concatenate(weights), minlength=height * width
    )
    nuc = np.minimum(nuc.reshape(shape).astype(f32), 2.6)
    conc_h += nuc
    # Nuclei displace the eosin-stained cytoplasm.
    conc_e *= 1.0 - 0.6 * np.minimum(nuc, 1.0)
    # Slight optical blur; glass outside the tissue.
    conc_h = ndimage.gaussian_filter(conc_h * tissue, 0.7, truncate=2.0)
    conc_e = ndimage.gaussian_filter(conc_e * tissue, 0.7, truncate=2.0)

    # Per-slide stain variation (batch effect): stain vectors, strengths and illumination.
    od_h = _OD_HEMATOXYLIN * rng.normal(1.0, 0.05, 3)
    od_e = _OD_EOSIN * rng.normal(1.0, 0.05, 3)
    od_h *= rng.lognormal(0.0, 0.08) / np.linalg.norm(od_h)
    od_e *= rng.lognormal(0.0, 0.08) / np.linalg.norm(od_e)
    i0 = _BACKGROUND_RGB * rng.normal(1.0, 0.005, 3)

    rgb = np.empty((height, width, 3), dtype=np.uint8)
    for ch in range(3):
        od = conc_h * f32(od_h[ch]) + conc_e * f32(od_e[ch])
        np.exp(-od, out=od)
        od *= f32(i0[ch])
        # Uniform pixel noise (sd ~3), cheaper to draw than Gaussian noise.
        od += (rng.random(shape, dtype=f32) - 0.5) * f32(10.0)
        rgb[..., ch] = np.clip(od, 0, 255)
    return rgb, centres, tissue
