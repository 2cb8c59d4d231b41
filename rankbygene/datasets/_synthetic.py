"""Synthetic H&E tissue with spatial transcriptomics whose expression follows the morphology.

The spots, the expression model and the AnnData; the tissue they measure (layout, cells, image)
is drawn by :func:`~rankbygene.datasets._tissue_render.render_tissue`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from rankbygene._layout import spatial_entry, thumbnails
from rankbygene._layout._keys import (
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
from rankbygene._logging import logger
from rankbygene.datasets._tissue_render import CELL_TYPES, REGION_TYPES, render_tissue

__all__ = [
    "REFERENCE_SPOT_AREA",
    "ambient_expression",
    "driver_amounts",
    "gene_dispersions",
    "gene_programs",
    "sample_counts",
    "synthetic",
]

# Ambient RNA per gene, as a share of the slide's mean expression.
_AMBIENT_SHARE = 0.03

# What drives expression: cell counts, or region areas (in cell equivalents per full spot) for
# the cells that are not counted as nuclei (vessels and matrix-associated cells of stroma,
# adipocytes). Relative RNA content per unit; the gene programs (``var["driver"]``) they carry.
_DRIVERS: dict[str, dict[str, Any]] = {
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


# --------------------------------------------------------------------------- spots


def _hex_grid(n_spots: int, spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Visium-like hexagonal grid: odd rows shifted by half a spacing, columns step by 2."""
    row_step = spacing * math.sqrt(3) / 2
    # Square-ish in pixels: n_cols * spacing ~ n_rows * row_step.
    n_rows = max(2, round(math.sqrt(n_spots * spacing / row_step)))
    n_cols = max(2, round(n_spots / n_rows))
    margin = 1.5 * spacing
    grid_rows, grid_cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    grid_cols = 2 * grid_cols + (grid_rows % 2)
    rows, cols = grid_rows.ravel(), grid_cols.ravel()
    xy = np.column_stack([margin + cols * spacing / 2, margin + rows * row_step])
    width = math.ceil(2 * margin + (2 * n_cols - 1) * spacing / 2)
    height = math.ceil(2 * margin + (n_rows - 1) * row_step)
    return rows.astype(np.int64), cols.astype(np.int64), xy, (height, width)


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
    >>> from rankbygene.datasets._synthetic import driver_amounts
    >>> from rankbygene.datasets._tissue_render import CELL_TYPES
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
    mu *= rng.lognormal(0.0, 0.3, (n_spots, 1))
    if theta is None:
        theta = gene_dispersions(rng, n_genes)
    lam = rng.gamma(theta[None, :], mu / theta[None, :])
    counts = rng.poisson(lam).astype(np.float64)
    dropout = rng.uniform(size=counts.shape) < 0.3 * np.exp(-mu / 5.0)
    counts[dropout] = 0.0
    return counts
