"""Synthetic H&E tissue with spatial transcriptomics whose expression follows the morphology."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from anndata import AnnData
from PIL import Image
from scipy import ndimage, sparse
from scipy.spatial import cKDTree

from rankbygene._constants import (
    ARRAY_COL_KEY,
    ARRAY_ROW_KEY,
    COUNTS_LAYER_KEY,
    IN_TISSUE_KEY,
    LIBRARY_ID_KEY,
    METADATA_SEED,
    METADATA_SOURCE,
    SCALEFACTOR_FIDUCIAL_DIAMETER,
    SPATIAL_KEY,
)
from rankbygene._layout import spatial_entry, thumbnails
from rankbygene._logging import logger

__all__ = [
    "CELL_TYPES",
    "REFERENCE_SPOT_AREA",
    "REGION_TYPES",
    "SyntheticTissue",
    "ambient_expression",
    "driver_amounts",
    "gene_dispersions",
    "gene_programs",
    "render_tissue",
    "sample_counts",
    "synthetic",
]

#: Region (tissue compartment) types, in the order used for ``n_regions`` < 5.
REGION_TYPES: tuple[str, ...] = ("tumor", "stroma", "immune", "adipose", "necrosis")

# Stain vectors in optical-density space (typical Macenko H&E reference vectors).
_OD_HEMATOXYLIN = np.array([0.5626, 0.7201, 0.4062])
_OD_EOSIN = np.array([0.2159, 0.8012, 0.5581])
_BACKGROUND_RGB = np.array([241.0, 240.0, 242.0])
# Ambient RNA per gene, as a share of the slide's mean expression.
_AMBIENT_SHARE = 0.03

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

# What drives expression: cell counts, or region areas (in cell equivalents per full spot) for
# the cells that are not counted as nuclei (vessels and matrix-associated cells of stroma,
# adipocytes). Relative RNA content per unit; the gene programs (``var["driver"]``) they carry.
_DRIVERS = {
    "tumor": {"rna": 1.0, "program": "tumor"},
    "tumor_cycling": {"rna": 1.6, "program": "tumor"},
    "lymphocyte": {"rna": 0.35, "program": "immune"},
    "fibroblast": {"rna": 0.8, "program": "stroma"},
    "stroma_area": {"rna": 1.0, "program": "stroma", "area": ("stroma", 5.0)},
    "adipose_area": {"rna": 0.5, "program": "adipose", "area": ("adipose", 3.0)},
    "debris": {"rna": 0.05, "program": "necrosis"},
}


def synthetic(
    n_slides: int = 2,
    n_spots: int = 300,
    n_genes: int = 100,
    n_regions: int = 4,
    spot_diameter: float = 64,
    spot_spacing: float = 100,
    lowres_max_side: int = 600,
    seed: int = 0,
) -> AnnData:
    """Synthetic H&E slides with Visium-like spots whose expression follows the morphology.

    A small, fast, fully offline data set in the scanpy/squidpy spatial layout, for demos, tests and
    tutorials. Each slide has an H&E-like image made of contiguous tissue regions of distinct
    morphology whose cell composition also varies inside each region, and a hexagonal grid of
    spots whose counts are the sum of the expression of the cells under the spot, so that the
    image under a spot carries information about its expression beyond the region it lies in.

    Generative model, per slide:

    1. **Layout.** One Gaussian-smoothed white-noise field per region type (length scale about
       1.3 spot spacings); each pixel takes the region of the largest field (with offsets that keep
       every region's area near a random Dirichlet share), giving contiguous blobs from a few spots
       to many spots wide.
    2. **Cell composition.** Three smooth random fields in [0, 1] (length scales 0.6 to 0.9 spot
       spacings, so composition changes between neighbouring spots but coherently): lymphocyte
       *infiltration* of tumour and stroma (mostly sparse, with dense hot spots), tumour *grade*
       (cellularity, nuclear size and the share of cycling cells, from ~5% to ~65%) and stromal
       *cellularity* (cellular versus sclerotic stroma: fibroblast density).
    3. **Image.** Stain concentration maps for haematoxylin and eosin: a per-region background
       (pink fibrous stroma with wavy collagen streaks, pale-purple tumour cytoplasm, near-white
       adipose with thin pink membranes around large polygonal cells, pale mottled necrosis) plus
       nuclei stamped as soft ellipses at the sites of a jittered lattice per nucleus kind, each
       site kept with a probability set by its region and the composition fields, and dropped
       where it would overlap an earlier nucleus: tumour nuclei (pale, vesicular, enlarging with
       grade; cycling ones large, hyperchromatic, pleomorphic), dense small round dark
       lymphocytes (aggregates in immune regions, infiltrates elsewhere), elongated fibroblasts
       along the fibres, fragmented debris and faint ghost nuclei in necrosis. The RGB image
       follows Beer-Lambert: ``I = I0 * exp(-(c_H * OD_H + c_E * OD_E))``. Each slide draws its
       own stain vectors, stain strengths and illumination (a batch effect); pixel noise and a
       slight optical blur are added. The scale is about 1 um per pixel whatever the spot size,
       so a default 64 px spot covers a few dozen nuclei.
    4. **Spots.** A hexagonal grid (Visium-like: neighbours ``spot_spacing`` px apart in six
       directions) of about ``n_spots`` spots; ``obsm["region_fractions"]`` is the fraction of each
       region type inside each spot disc (diameter ``spot_diameter``), ``obs["region"]`` the
       dominant one, and ``obsm["cell_counts"]`` the number of nuclei of each kind
       (:data:`CELL_TYPES`) whose centre lies inside the disc. All slides use the same grid, hence
       the same coordinates: tell them apart with ``obs["library_id"]``
       (e.g. ``library_key="library_id"``).
    5. **Counts.** About 60% of the genes are markers of one region's program (``"TUMOR_1"``,
       ...), each expressed by one *driver* (``var["driver"]``): tumour identity genes by all
       tumour cells, proliferation genes by cycling tumour cells only, immune genes by
       lymphocytes wherever they are, stromal genes by fibroblasts or (matrix and vessel genes)
       by the stromal area, adipose genes by the adipose area, necrosis genes by debris. The rest
       are housekeeping genes (``"HK_1"``, ...) expressed by every cell at cell-type-specific
       levels. A spot's mean is ``size_factor * (sum_d amount_d * profile_d[g] + ambient_g)``:
       the amount of each driver under the spot (cell counts, or area fraction in cell
       equivalents) times its profile (counts per cell, following the RNA content of the cell
       type: lymphocytes and debris carry little), a little ambient RNA (3% of the slide's mean)
       and a lognormal capture efficiency. Counts are negative binomial (gene-wise dispersion
       around 1/6) with extra dropout for weakly expressed genes; median total counts are a few
       thousand.

    Parameters
    ----------
    n_slides
        Number of slides (libraries), ``"slide_0"``, ``"slide_1"``, ...; each has its own layout.
    n_spots
        Approximate number of spots per slide.
    n_genes
        Number of genes.
    n_regions
        Number of region types, 1 to 5, taken in the order of :data:`REGION_TYPES`
        (tumor, stroma, immune, adipose, necrosis).
    spot_diameter
        Spot diameter in full-resolution pixels.
    spot_spacing
        Centre-to-centre distance of neighbouring spots in full-resolution pixels.
    lowres_max_side
        Longest side of the ``"lowres"`` image in pixels.
    seed
        Random seed; the output is a deterministic function of all the arguments.

    Returns
    -------
    AnnData with

    - ``X`` and ``layers["counts"]``: integer-valued counts (float32, CSR).
    - ``obs``: ``library_id``, ``array_row``, ``array_col``, ``in_tissue``, ``region``
      (categoricals for ``library_id`` and ``region``).
    - ``var["program"]``: the region a gene marks, or ``"housekeeping"``; ``var["driver"]``:
      what expresses it (a cell type, a region's area, or ``"all"`` for housekeeping genes).
    - ``obsm["spatial"]``: spot centres (x, y) in full-resolution pixels;
      ``obsm["region_fractions"]``: fraction of each region type under each spot;
      ``obsm["cell_counts"]``: nuclei of each kind under each spot (float64, integer-valued).
    - ``uns["spatial"][library_id]``: ``images`` (``"hires"`` at full resolution,
      ``"lowres"``), ``scalefactors`` and ``metadata``, as ``squidpy.read.visium`` writes them.
    - ``uns["synthetic"]``: ``regions`` (names, in the column order of ``region_fractions``),
      ``cell_types`` (the column order of ``cell_counts``; ``"tumor"`` counts the non-cycling
      tumour cells), ``drivers`` and ``profiles`` (mean counts per unit of each driver and gene,
      before ambient RNA and capture efficiency) and the arguments.

    Examples
    --------
    >>> import squidpy as sq
    >>> from rankbygene.datasets import synthetic
    >>> adata = synthetic(n_slides=2, n_spots=300, seed=0)
    >>> adata.shape
    (608, 100)
    >>> adata.obs["region"].value_counts()  # doctest: +SKIP
    >>> slide = adata[adata.obs["library_id"] == "slide_0"]
    >>> sq.pl.spatial_scatter(slide, library_id="slide_0", color="region")  # doctest: +SKIP
    """
    _check_args(n_slides, n_spots, n_genes, n_regions, spot_diameter, spot_spacing, lowres_max_side)
    regions = list(REGION_TYPES[:n_regions])
    rng = np.random.default_rng(seed)
    # Gene programs are shared across slides: only layout, stain and sampling noise differ.
    profiles, var = gene_programs(rng, n_genes, regions)

    xs, obs_frames, fractions, cells, spatial_uns = [], [], [], [], {}
    for s in range(n_slides):
        library_id = f"slide_{s}"
        slide_rng = np.random.default_rng(rng.integers(2**63))
        rows, cols, xy, shape = _hex_grid(n_spots, spot_spacing)
        image, labels, centres, _ = render_tissue(
            slide_rng, shape, regions, xy, spot_diameter, spot_spacing
        )
        frac = _spot_fractions(labels, xy, spot_diameter, n_regions)
        cell_counts = _spot_cell_counts(centres, xy, spot_diameter)
        counts = sample_counts(slide_rng, driver_amounts(cell_counts, frac, regions), profiles)

        xs.append(counts)
        fractions.append(frac)
        cells.append(cell_counts)
        obs_frames.append(
            pd.DataFrame(
                {
                    LIBRARY_ID_KEY: library_id,
                    ARRAY_ROW_KEY: rows,
                    ARRAY_COL_KEY: cols,
                    IN_TISSUE_KEY: np.ones(len(rows), dtype=np.int64),
                    "region": np.asarray(regions)[frac.argmax(axis=1)],
                    "x": xy[:, 0],
                    "y": xy[:, 1],
                },
                index=[f"{library_id}_{r}x{c}" for r, c in zip(rows, cols, strict=True)],
            )
        )
        spatial_uns[library_id] = spatial_entry(
            thumbnails(image, 1.0, lowres_max_side),  # hires: the full-resolution image
            spot_diameter,
            metadata={METADATA_SOURCE: "rankbygene.datasets.synthetic", METADATA_SEED: seed},
            # Visium fiducials are ~1.6 times the spot diameter.
            scalefactors={SCALEFACTOR_FIDUCIAL_DIAMETER: float(spot_diameter) * 1.625},
        )

    obs = pd.concat(obs_frames)
    spatial = obs[["x", "y"]].to_numpy(dtype=np.float64)
    obs = obs.drop(columns=["x", "y"])
    obs[LIBRARY_ID_KEY] = pd.Categorical(obs[LIBRARY_ID_KEY], categories=list(spatial_uns))
    obs["region"] = pd.Categorical(obs["region"], categories=regions)
    x = sparse.csr_matrix(np.vstack(xs).astype(np.float32))
    adata = AnnData(
        X=x,
        obs=obs,
        var=var,
        obsm={
            SPATIAL_KEY: spatial,
            "region_fractions": np.vstack(fractions),
            "cell_counts": np.vstack(cells),
        },
        layers={COUNTS_LAYER_KEY: x.copy()},
        uns={
            SPATIAL_KEY: spatial_uns,
            "synthetic": {
                "regions": regions,
                "cell_types": list(CELL_TYPES),
                "drivers": list(_DRIVERS),
                "profiles": profiles.astype(np.float64),
                "seed": seed,
                "n_slides": n_slides,
                "spot_diameter": float(spot_diameter),
                "spot_spacing": float(spot_spacing),
            },
        },
    )
    logger.info(
        "synthetic: %d slides, %d spots, %d genes, regions %s",
        n_slides,
        adata.n_obs,
        adata.n_vars,
        regions,
    )
    return adata


def _check_args(n_slides, n_spots, n_genes, n_regions, spot_diameter, spot_spacing, lowres):
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if n_spots < 4:
        raise ValueError(f"n_spots must be >= 4, got {n_spots}")
    if not 1 <= n_regions <= len(REGION_TYPES):
        raise ValueError(f"n_regions must be between 1 and {len(REGION_TYPES)}, got {n_regions}")
    if n_genes < n_regions + 1:
        raise ValueError(f"n_genes must be >= n_regions + 1 = {n_regions + 1}, got {n_genes}")
    if spot_diameter <= 0 or spot_spacing <= 0:
        raise ValueError(
            f"spot_diameter and spot_spacing must be positive, got {spot_diameter}, {spot_spacing}"
        )
    if lowres < 8:
        raise ValueError(f"lowres_max_side must be >= 8, got {lowres}")


# --------------------------------------------------------------------------- spots and layout


def _hex_grid(n_spots: int, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Visium-like hexagonal grid: odd rows shifted by half a spacing, columns step by 2."""
    row_step = spacing * math.sqrt(3) / 2
    # Square-ish in pixels: n_cols * spacing ~ n_rows * row_step.
    n_rows = max(2, round(math.sqrt(n_spots * spacing / row_step)))
    n_cols = max(2, round(n_spots / n_rows))
    margin = 1.5 * spacing
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    cols = 2 * cols + (rows % 2)
    rows, cols = rows.ravel(), cols.ravel()
    xy = np.column_stack([margin + cols * spacing / 2, margin + rows * row_step])
    width = math.ceil(2 * margin + (2 * n_cols - 1) * spacing / 2)
    height = math.ceil(2 * margin + (n_rows - 1) * row_step)
    return rows.astype(np.int64), cols.astype(np.int64), xy, (height, width)


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


def _spot_fractions(labels, xy, diameter, n_regions):
    """Fraction of each region label inside each spot disc."""
    r = diameter / 2
    off = np.arange(-math.ceil(r), math.ceil(r) + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    inside = dx**2 + dy**2 <= r**2
    dy, dx = dy[inside], dx[inside]
    cy = np.rint(xy[:, 1]).astype(np.int64)[:, None] + dy[None]
    cx = np.rint(xy[:, 0]).astype(np.int64)[:, None] + dx[None]
    lab = labels[np.clip(cy, 0, labels.shape[0] - 1), np.clip(cx, 0, labels.shape[1] - 1)]
    frac = np.stack([(lab == k).mean(axis=1) for k in range(n_regions)], axis=1)
    return frac.astype(np.float64)


def _spot_cell_counts(centres, xy, diameter):
    """Nuclei of each kind (:data:`CELL_TYPES`) with their centre inside each spot disc."""
    counts = np.zeros((len(xy), len(CELL_TYPES)))
    for j, kind in enumerate(CELL_TYPES):
        pts = centres.get(kind)
        if pts is not None and len(pts):
            counts[:, j] = cKDTree(pts).query_ball_point(xy, diameter / 2, return_length=True)
    return counts


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
    """Region layout, cell composition and H&E image of one slide (steps 1-3 of :func:`synthetic`).

    The morphology model that :func:`synthetic` and
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
    >>> from rankbygene.datasets._synthetic import CELL_TYPES, REGION_TYPES, render_tissue
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


# --------------------------------------------------------------------------- expression


def gene_programs(
    rng: np.random.Generator, n_genes: int, regions: Sequence[str]
) -> tuple[np.ndarray, pd.DataFrame]:
    """Driver-by-gene mean profiles (counts per unit of each driver) and the ``var`` table.

    Each marker gene belongs to one region's program and is expressed by one driver (a cell
    kind, or a region's area): tumour genes by all tumour cells (``"tumor"``) or by cycling ones
    only (``"tumor_cycling"``, proliferation), stromal genes by fibroblasts or by the stromal
    area. Housekeeping genes are expressed by every driver, at cell-type-specific levels.
    """
    n_regions = len(regions)
    n_markers = max(n_regions, round(0.6 * n_genes)) if n_regions > 1 else 0
    per_region = np.full(n_regions, n_markers // max(n_regions, 1))
    per_region[: n_markers - per_region.sum()] += 1
    names, program, driver = [], [], []
    for r, k in zip(regions, per_region, strict=True):
        names += [f"{r.upper()}_{i + 1}" for i in range(k)]
        program += [r] * k
        sources = [d for d, spec in _DRIVERS.items() if spec["program"] == r]
        # Split the program over its drivers in contiguous blocks (the first gets the remainder).
        split = np.full(len(sources), k // len(sources))
        split[0] += k - split.sum()
        driver += [d for d, m in zip(sources, split, strict=True) for _ in range(m)]
    n_hk = n_genes - len(names)
    names += [f"HK_{i + 1}" for i in range(n_hk)]
    program += ["housekeeping"] * n_hk
    driver += ["all"] * n_hk

    drivers = list(_DRIVERS)
    driver_arr = np.asarray(driver)
    # Baseline means span two orders of magnitude, so some genes are weakly expressed.
    base = rng.lognormal(np.log(8.0), 1.1, n_genes)
    profiles = base * rng.lognormal(0.0, 0.15, (len(drivers), n_genes))
    # Housekeeping levels differ somewhat between cell types.
    hk = driver_arr == "all"
    profiles[:, hk] *= rng.lognormal(0.0, 0.25, (len(drivers), hk.sum()))
    # Markers: strongly up in the cells that express them and low elsewhere.
    fold = rng.uniform(8.0, 25.0, n_genes)
    for k, d in enumerate(drivers):
        own = driver_arr == d
        if d == "tumor_cycling":
            # Cycling tumour cells keep the tumour identity genes.
            own |= driver_arr == "tumor"
        profiles[k, ~hk] *= np.where(own[~hk], 2.0 * fold[~hk], 0.5)
    # Counts per unit of each driver follow its RNA content (~300 counts per tumour cell).
    rna = np.array([_DRIVERS[d]["rna"] for d in drivers])
    profiles *= (300.0 * rna / profiles.sum(axis=1))[:, None]
    var = pd.DataFrame(
        {
            "program": pd.Categorical(program, categories=[*regions, "housekeeping"]),
            "driver": pd.Categorical(driver, categories=[*drivers, "all"]),
        },
        index=pd.Index(names),
    )
    return profiles, var


#: Area (square pixels, about square microns) of the default 64-pixel spot of :func:`synthetic`:
#: the area drivers' cell equivalents count per this area. Generators measuring other shapes give
#: :func:`driver_amounts` region areas in units of it.
REFERENCE_SPOT_AREA: float = math.pi * 32.0**2


def driver_amounts(
    cell_counts: np.ndarray, fractions: np.ndarray, regions: Sequence[str]
) -> np.ndarray:
    """Amount of each driver under each spot: cell counts, or area fraction x cell equivalents.

    ``cell_counts`` has one column per :data:`CELL_TYPES` (cells, or cell equivalents, under each
    spot), ``fractions`` one per region: its share of the spot's area in :func:`synthetic`, where a
    spot counts as one :data:`REFERENCE_SPOT_AREA`; for other shapes, the region's area under the
    shape divided by :data:`REFERENCE_SPOT_AREA`.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.datasets._synthetic import CELL_TYPES, driver_amounts
    >>> cells, fractions = np.ones((2, len(CELL_TYPES))), np.full((2, 2), 0.5)
    >>> driver_amounts(cells, fractions, ["tumor", "stroma"]).shape
    (2, 7)
    """
    regions = list(regions)
    cols = []
    for name, spec in _DRIVERS.items():
        if "area" in spec:
            region, units = spec["area"]
            amount = fractions[:, regions.index(region)] * units if region in regions else 0.0
            cols.append(np.broadcast_to(amount, len(fractions)))
        else:
            cols.append(cell_counts[:, CELL_TYPES.index(name)])
    return np.column_stack(cols).astype(np.float64)


def ambient_expression(amounts: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """Ambient RNA of each gene: a share of the mean over spots (what :func:`sample_counts` adds).

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.datasets._synthetic import ambient_expression
    >>> ambient_expression(np.ones((4, 2)), np.ones((2, 3)))
    array([0.06, 0.06, 0.06])
    """
    return _AMBIENT_SHARE * (np.asarray(amounts, dtype=np.float64).mean(axis=0) @ profiles)


def gene_dispersions(rng: np.random.Generator, n_genes: int) -> np.ndarray:
    """Gene-wise inverse dispersions ``theta`` around 6 (``var = mu + mu^2 / theta``), as Visium.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.datasets._synthetic import gene_dispersions
    >>> gene_dispersions(np.random.default_rng(0), 3).shape
    (3,)
    """
    return rng.lognormal(np.log(6.0), 0.4, n_genes)


def sample_counts(
    rng: np.random.Generator,
    amounts: np.ndarray,
    profiles: np.ndarray,
    ambient: np.ndarray | None = None,
    theta: np.ndarray | None = None,
) -> np.ndarray:
    """Negative-binomial counts around the sum over the cells under the spot, with dropout.

    Parameters
    ----------
    rng
        Random generator.
    amounts
        ``(n_spots, n_drivers)`` amount of each driver under each spot (:func:`driver_amounts`).
    profiles
        ``(n_drivers, n_genes)`` mean counts per unit of each driver (:func:`gene_programs`).
    ambient
        Ambient RNA per gene; default :func:`ambient_expression` of these spots. Pass it (and
        ``theta``) to sample a large array of spots in chunks that share one slide's values.
    theta
        Inverse dispersion per gene; default drawn by :func:`gene_dispersions`.

    Returns
    -------
    ``(n_spots, n_genes)`` float64 integer-valued counts.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.datasets._synthetic import sample_counts
    >>> sample_counts(np.random.default_rng(0), np.ones((4, 2)), np.full((2, 3), 50.0)).shape
    (4, 3)
    """
    n_spots, n_genes = amounts.shape[0], profiles.shape[1]
    mu = amounts @ profiles
    # Ambient RNA (diffused from the rest of the slide) gives near-empty spots a few counts.
    mu += _AMBIENT_SHARE * mu.mean(axis=0) if ambient is None else ambient
    # Capture efficiency varies from spot to spot.
    mu *= rng.lognormal(0.0, 0.3, n_spots)[:, None]
    if theta is None:
        theta = gene_dispersions(rng, n_genes)
    lam = rng.gamma(theta[None, :], mu / theta[None, :])
    counts = rng.poisson(lam).astype(np.float64)
    dropout = rng.uniform(size=counts.shape) < 0.3 * np.exp(-mu / 5.0)
    counts[dropout] = 0.0
    return counts
