"""Synthetic Visium-HD-like data: square bins on a grid over a synthetic H&E image, as SpatialData.

The tissue, its cells and the genes they express come from the morphology model of
:func:`rankbygene.datasets.synthetic` (through its public steps); only the measurement differs:
square bins instead of round spots, and an image at a chosen resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from PIL import Image
from scipy import ndimage, sparse

from rankbygene._layout import scaled_size, shrink, spatial_entry, thumbnails
from rankbygene._layout._keys import (
    ARRAY_COL_KEY,
    ARRAY_ROW_KEY,
    IN_TISSUE_KEY,
    LIBRARY_ID_KEY,
    METADATA_SEED,
    METADATA_SOURCE,
    SCALEFACTOR_BIN_SIZE_UM,
    SCALEFACTOR_MPP,
    SPATIAL_KEY,
)
from rankbygene._logging import logger
from rankbygene.datasets._synthetic import (
    REFERENCE_SPOT_AREA,
    ambient_expression,
    driver_amounts,
    gene_dispersions,
    gene_programs,
    sample_counts,
)
from rankbygene.datasets._tissue_render import CELL_TYPES, REGION_TYPES, render_tissue

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["VISIUM_HD_BIN_SIZES_UM", "bin_table_key", "synthetic_visium_hd"]

#: Bin sizes (um) that Space Ranger writes for Visium HD.
VISIUM_HD_BIN_SIZES_UM: tuple[int, ...] = (2, 8, 16)

# A cell's RNA lies around its nucleus: a Gaussian of this sd (um) spreads each cell over the
# bins it overlaps (a 2 um bin sees a share of a cell, a 16 um bin whole cells).
_CELL_SPREAD_UM = 3.0
# Image beyond the bin grid on each side (um), so that edge bins have context for their patch.
_MARGIN_UM = 32
# Fine bins sampled at a time: bounds the dense (bins x genes) arrays of the count model.
_CHUNK_BINS = 20_000
# A bin is in the tissue (kept, as in Space Ranger's filtered matrix) when tissue covers at
# least this share of it.
_IN_TISSUE = 0.5
# Longest side (pixels) of the downscaled images, as Space Ranger's hires and lowres PNGs.
_HIRES_MAX_SIDE, _LOWRES_MAX_SIDE = 2000, 600


def bin_table_key(bin_size_um: int) -> str:
    """Name of the table (and suffix of the shapes element) of one bin size: ``square_008um``.

    The names Space Ranger and spatialdata-io's Visium HD reader use.

    Examples
    --------
    >>> from rankbygene.datasets._visium_hd import bin_table_key
    >>> bin_table_key(8)
    'square_008um'
    """
    return f"square_{int(bin_size_um):03d}um"


def synthetic_visium_hd(
    size_um: float | tuple[float, float] = 800.0,
    bin_sizes_um: int | Sequence[int] = (8, 16),
    microns_per_pixel: float = 0.5,
    n_genes: int = 100,
    n_regions: int = 4,
    length_scale_um: float = 100.0,
    dataset_id: str = "synthetic_hd",
    bins_as_squares: bool = True,
    seed: int = 0,
    as_anndata: bool = False,
) -> SpatialData | AnnData:
    """Synthetic Visium-HD-like section: square bins over an H&E image, as spatialdata-io reads it.

    A small, offline stand-in for a Visium HD run, for tests and tutorials. One section of
    synthetic tissue (the morphology model of :func:`~rankbygene.datasets.synthetic`: contiguous
    regions, cell composition varying inside them, an H&E image rendered from the cells) is
    measured by a grid of square bins instead of round spots:

    1. **Tissue.** Rendered at about 1 um per pixel over the bin grid plus a margin of 32 um;
       its irregular edge runs inside the grid, so bins on glass exist and are dropped, as in
       Space Ranger's filtered matrix. The image is then resized to ``microns_per_pixel``.
    2. **Bins.** Each cell's RNA is spread over a Gaussian of sd 3 um around its nucleus, and
       regions' matrix and vessels by their area; a bin's expected expression integrates both
       over its square (cell equivalents and region areas go through the same drivers and gene
       profiles as the spots of :func:`~rankbygene.datasets.synthetic`).
    3. **Counts.** Sampled once on the finest grid (negative binomial with capture efficiency,
       ambient RNA and dropout, as for spots), and summed into the coarser bins, so that a 16 um
       bin holds exactly the counts of its four 8 um bins, as Space Ranger's bins do. A bin is in
       the tissue when tissue covers half of it.

    Memory and time, measured for 96,442 bins of 8 um and 100 genes (a 2.5 mm field at 0.5 um
    per pixel): 15 s and a peak of 0.38 GB (tracemalloc), most of it the image and its rendering,
    which grow with the field's area; so about 4 GB per million 8 um bins. The table holds 0.34
    KB per bin (17 non-zero counts, 0.14 KB; ``obs`` 0.19 KB; ``obsm`` 0.1 KB). What training and
    predicting on bins needs is measured in :func:`rankbygene.pp.aggregate_bins`.

    Parameters
    ----------
    size_um
        Side of the field of bins in um (a square), or ``(width, height)``; rounded up to a
        multiple of the largest bin size. A Visium HD capture area is 6500 um.
    bin_sizes_um
        Bin sizes in um (Visium HD: 2, 8, 16); each a multiple of the smallest.
    microns_per_pixel
        Resolution of the full-resolution image (0.25 to 0.5 um per pixel for 40x and 20x scans).
    n_genes
        Number of genes.
    n_regions
        Number of region types, 1 to 5 (tumor, stroma, immune, adipose, necrosis).
    length_scale_um
        Scale of the tissue layout: regions are about 1.3 of it across and cell composition
        varies over about 0.6 to 0.9 of it (100 um: the scale of :func:`synthetic`).
    dataset_id
        Prefix of the element names and the coordinate system of the full-resolution pixels.
    bins_as_squares
        Bins as square polygons (spatialdata-io's default) or as circles of diameter the bin side.
    seed
        Random seed; the output is a deterministic function of all the arguments.
    as_anndata
        Return one bin size's table in the package's AnnData layout (the scanpy/squidpy
        ``uns["spatial"]`` with the image in memory), instead of the SpatialData object; needs a
        single ``bin_sizes_um``.

    Returns
    -------
    A :class:`spatialdata.SpatialData`, named as spatialdata-io's ``visium_hd`` reader names a run:

    - images ``"<dataset_id>_full_image"`` (multiscale, ``(c, y, x)`` uint8, identity to the
      coordinate system ``dataset_id``), ``"<dataset_id>_hires_image"`` and
      ``"<dataset_id>_lowres_image"`` (downscaled, scaled back into ``dataset_id``);
    - shapes ``"<dataset_id>_square_008um"`` per bin size: squares (or circles), in full-resolution
      pixels, indexed by ``location_id``;
    - tables ``"square_008um"`` per bin size annotating them (``region_key="region"``,
      ``instance_key="location_id"``): ``X`` counts (float32 CSR), ``obs`` with ``in_tissue``,
      ``array_row``, ``array_col``, ``location_id``, ``region`` and the truth ``tissue_region``
      (dominant region type), ``obs_names`` as Space Ranger's barcodes
      (``s_008um_00012_00034-1``), ``obsm["spatial"]`` the bin centres (x, y) in full-resolution
      pixels, ``obsm["region_fractions"]`` (share of the bin covered by each region type),
      ``obsm["cell_equivalents"]`` (cells of each :data:`CELL_TYPES` kind whose RNA the bin
      holds), ``var["program"]``/``var["driver"]`` as in :func:`synthetic` and
      ``uns["synthetic"]`` (bin size, microns per pixel, regions, profiles, seed).

    With ``as_anndata=True``, that table as an AnnData whose library (``obs["library_id"]``,
    the key of ``uns["spatial"]``) is ``dataset_id``, the section, with the full-resolution
    image as ``"hires"`` (scale factor 1), a ``"lowres"`` copy, and ``scalefactors``
    ``spot_diameter_fullres`` (the bin side in pixels), ``bin_size_um`` and
    ``microns_per_pixel``: what :func:`rankbygene.io.from_spatialdata` gives, without spatialdata.

    Raises
    ------
    ValueError
        A size, resolution or count is out of range, bin sizes are not multiples of the smallest,
        or ``as_anndata`` is asked for several bin sizes.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> sdata = rbg.datasets.synthetic_visium_hd(size_um=400, bin_sizes_um=(8, 16))
    >>> sorted(sdata.tables)
    ['square_008um', 'square_016um']
    >>> adata = rbg.io.from_spatialdata(sdata, table_key="square_008um")
    >>> adata.uns["spatial"]["synthetic_hd"]["scalefactors"]["bin_size_um"]
    8.0
    >>> spots = rbg.pp.aggregate_bins(adata, size_um=32)  # 4 x 4 bins per pseudo-spot
    """
    sizes = _check_args(
        size_um, bin_sizes_um, microns_per_pixel, n_genes, n_regions, length_scale_um, dataset_id
    )
    if as_anndata and len(sizes) > 1:
        raise ValueError(
            f"as_anndata=True returns one table: pass a single bin size (got {list(sizes)})."
        )
    width_um, height_um = np.broadcast_to(np.asarray(size_um, dtype=float), (2,)).tolist()
    fine, largest = sizes[0], sizes[-1]
    # the grid is whole bins of the largest size, so that every coarse bin has all its fine bins
    n_cols = math.ceil(float(width_um) / largest) * (largest // fine)
    n_rows = math.ceil(float(height_um) / largest) * (largest // fine)
    grid_w, grid_h = n_cols * fine, n_rows * fine
    shape = (grid_h + 2 * _MARGIN_UM, grid_w + 2 * _MARGIN_UM)
    regions = list(REGION_TYPES[:n_regions])

    rng = np.random.default_rng(seed)
    profiles, var = gene_programs(rng, n_genes, regions)
    slide_rng = np.random.default_rng(rng.integers(2**63))
    # The tissue reaches 0.45 to 0.95 length scales beyond the box it is given: inset the box so
    # that the edge runs inside the grid (bins on glass), unless the grid is too small for it.
    inset = np.minimum(0.95 * length_scale_um, np.array([grid_w, grid_h]) / 4)
    box = np.array([_MARGIN_UM + inset, _MARGIN_UM + np.array([grid_w, grid_h]) - inset])
    tissue = render_tissue(slide_rng, shape, regions, box, fine, length_scale_um)

    fine_truth = _fine_bin_truth(tissue, regions, fine, n_rows, n_cols)
    counts = _fine_bin_counts(slide_rng, fine_truth, regions, profiles)
    image = _resized(tissue.image, microns_per_pixel)

    tables = {}
    for size in sizes:
        tables[size] = _bin_table(
            counts, fine_truth, var, regions, fine, size, n_rows, n_cols, microns_per_pixel
        )
        tables[size].uns["synthetic"] = {
            "regions": regions,
            "cell_types": list(CELL_TYPES),
            "profiles": profiles.astype(np.float64),
            "bin_size_um": float(size),
            "microns_per_pixel": float(microns_per_pixel),
            "seed": seed,
        }
    logger.info(
        "synthetic_visium_hd: %d x %d um, %s, image %d x %d pixels at %.2f um/pixel",
        grid_w,
        grid_h,
        ", ".join(f"{tables[s].n_obs} bins of {s} um" for s in sizes),
        image.shape[1],
        image.shape[0],
        microns_per_pixel,
    )
    if as_anndata:
        return _as_anndata(tables[sizes[0]], image, dataset_id, sizes[0], microns_per_pixel, seed)
    return _as_spatialdata(tables, image, dataset_id, microns_per_pixel, bins_as_squares)


def _check_args(
    size_um: Any,
    bin_sizes_um: Any,
    mpp: float,
    n_genes: int,
    n_regions: int,
    length_scale_um: float,
    dataset_id: str,
) -> list[int]:
    sides: list[Any] = [size_um] if np.isscalar(size_um) else list(size_um)
    if len(sides) not in (1, 2) or not all(float(s) > 0 for s in sides):
        raise ValueError(f"size_um must be a positive side or (width, height); got {size_um!r}.")
    raw: list[Any] = [bin_sizes_um] if np.isscalar(bin_sizes_um) else list(bin_sizes_um)
    if not raw or any(float(s) != int(s) or int(s) < 1 for s in raw):
        raise ValueError(f"bin_sizes_um must be positive whole microns; got {bin_sizes_um!r}.")
    sizes = sorted({int(s) for s in raw})
    if any(s % sizes[0] for s in sizes):
        raise ValueError(
            f"Every bin size must be a multiple of the smallest ({sizes[0]} um); got {sizes}."
        )
    if not mpp > 0:
        raise ValueError(f"microns_per_pixel must be positive; got {mpp!r}.")
    if not 1 <= n_regions <= len(REGION_TYPES):
        raise ValueError(f"n_regions must be between 1 and {len(REGION_TYPES)}; got {n_regions}.")
    if n_genes < n_regions + 1:
        raise ValueError(f"n_genes must be >= n_regions + 1 = {n_regions + 1}; got {n_genes}.")
    if not length_scale_um > 0:
        raise ValueError(f"length_scale_um must be positive; got {length_scale_um!r}.")
    if not dataset_id or not all(ch.isalnum() or ch in "_-." for ch in dataset_id):
        raise ValueError(
            f"dataset_id must be a valid element name (letters, digits, _ - .); got {dataset_id!r}."
        )
    return sizes


def _block_sum(values: np.ndarray, size: int) -> np.ndarray:
    """Sum over ``size x size`` blocks of the first two axes (their lengths are multiples)."""
    rows, cols = values.shape[0] // size, values.shape[1] // size
    return values.reshape(rows, size, cols, size, *values.shape[2:]).sum(axis=(1, 3))


def _fine_bin_truth(
    tissue: Any, regions: list[str], fine: int, n_rows: int, n_cols: int
) -> dict[str, np.ndarray]:
    """Per fine bin (row-major): tissue cover, region areas (um^2) and cell equivalents."""
    window = (
        slice(_MARGIN_UM, _MARGIN_UM + n_rows * fine),
        slice(_MARGIN_UM, _MARGIN_UM + n_cols * fine),
    )
    cover = tissue.tissue.astype(np.float64)
    inside = cover[window]
    areas = np.stack(
        [_block_sum((tissue.labels[window] == k) * inside, fine) for k in range(len(regions))],
        axis=-1,
    )
    cells = np.zeros((n_rows, n_cols, len(CELL_TYPES)))
    height, width = cover.shape
    for j, kind in enumerate(CELL_TYPES):
        xy = tissue.nuclei.get(kind)
        if xy is None or not len(xy):
            continue
        ix = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, width - 1)
        iy = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, height - 1)
        density = np.bincount(iy * width + ix, minlength=height * width).reshape(cover.shape)
        density = ndimage.gaussian_filter(density.astype(np.float64), _CELL_SPREAD_UM)
        # nuclei under the glass are not drawn: their cells hold no RNA either
        cells[..., j] = _block_sum((density * cover)[window], fine)
    return {
        "cover": _block_sum(inside, fine).reshape(-1) / fine**2,
        "areas": areas.reshape(-1, len(regions)),
        "cells": cells.reshape(-1, len(CELL_TYPES)),
    }


def _fine_bin_counts(
    rng: np.random.Generator,
    truth: dict[str, np.ndarray],
    regions: list[str],
    profiles: np.ndarray,
) -> sparse.csr_matrix:
    """Counts of every fine bin (glass too, as a raw matrix), sampled in chunks."""
    amounts = driver_amounts(truth["cells"], truth["areas"] / REFERENCE_SPOT_AREA, regions)
    in_tissue = truth["cover"] >= _IN_TISSUE
    # one slide's ambient RNA and dispersions, shared by all chunks
    ambient = ambient_expression(amounts[in_tissue] if in_tissue.any() else amounts, profiles)
    theta = gene_dispersions(rng, profiles.shape[1])
    chunks = []
    for start in range(0, len(amounts), _CHUNK_BINS):
        part = sample_counts(rng, amounts[start : start + _CHUNK_BINS], profiles, ambient, theta)
        chunks.append(sparse.csr_matrix(part.astype(np.float32)))
    return sparse.csr_matrix(sparse.vstack(chunks, format="csr"))


def _grouping(n_rows: int, n_cols: int, factor: int) -> sparse.csr_matrix:
    """``(coarse bins, fine bins)`` 0/1 matrix: which fine bins (row-major) each coarse bin sums."""
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    coarse = (rows // factor) * (n_cols // factor) + cols // factor
    n_coarse = (n_rows // factor) * (n_cols // factor)
    ones = np.ones(len(coarse), dtype=np.float32)
    return sparse.csr_matrix(
        (ones, (coarse, np.arange(len(coarse)))), shape=(n_coarse, len(coarse))
    )


def _bin_table(
    counts: sparse.csr_matrix,
    truth: dict[str, np.ndarray],
    var: pd.DataFrame,
    regions: list[str],
    fine: int,
    size: int,
    n_rows: int,
    n_cols: int,
    mpp: float,
) -> AnnData:
    """The in-tissue bins of one size, as spatialdata-io's table (before ``TableModel.parse``)."""
    factor = size // fine
    group = _grouping(n_rows, n_cols, factor)
    cover = group @ truth["cover"] / factor**2
    keep = np.flatnonzero(cover >= _IN_TISSUE)
    x = sparse.csr_matrix(group[keep] @ counts, dtype=np.float32)
    areas = np.asarray(group[keep] @ truth["areas"])
    cells = np.asarray(group[keep] @ truth["cells"])
    rows, cols = np.divmod(keep, n_cols // factor)
    label = f"{size:03d}um"
    obs = pd.DataFrame(
        {
            IN_TISSUE_KEY: np.ones(len(keep), dtype=np.int64),
            ARRAY_ROW_KEY: rows.astype(np.int64),
            ARRAY_COL_KEY: cols.astype(np.int64),
            "location_id": np.arange(len(keep), dtype=np.int64),
            "tissue_region": pd.Categorical(
                np.asarray(regions)[areas.argmax(axis=1)], categories=regions
            ),
        },
        index=pd.Index([f"s_{label}_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]),
    )
    centres = np.column_stack(
        [_MARGIN_UM + (cols + 0.5) * size, _MARGIN_UM + (rows + 0.5) * size]
    ).astype(np.float64)
    var = var.copy()
    var.insert(0, "gene_ids", var.index.to_numpy())
    var.insert(1, "feature_types", "Gene Expression")
    var.insert(2, "genome", "synthetic")
    return AnnData(
        X=x,
        obs=obs,
        var=var,
        obsm={
            SPATIAL_KEY: centres / mpp,
            "region_fractions": areas / size**2,
            "cell_equivalents": cells,
        },
    )


def _resized(image: np.ndarray, mpp: float) -> np.ndarray:
    """The ~1 um per pixel rendering resized to ``mpp`` um per pixel."""
    height, width = image.shape[:2]
    size = (max(1, round(width / mpp)), max(1, round(height / mpp)))
    if size == (width, height):
        return image
    # area averaging when shrinking; bicubic when enlarging
    method = Image.Resampling.BOX if mpp > 1 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize(size, method))


def _downscaled(image: np.ndarray, max_side: int, at_most: float) -> tuple[np.ndarray, float]:
    """``image`` shrunk to ``max_side`` (and at most ``at_most`` of its size), with its scale."""
    scale = min(at_most, max_side / max(image.shape[:2]))
    small = shrink(image, scaled_size(image.shape[:2], scale))
    return small, float(small.shape[1] / image.shape[1])


def _as_anndata(
    table: AnnData, image: np.ndarray, dataset_id: str, size: int, mpp: float, seed: int
) -> AnnData:
    library = dataset_id  # the section, as from_spatialdata names it at every bin size
    adata = table
    adata.obs["region"] = pd.Categorical([f"{dataset_id}_{bin_table_key(size)}"] * adata.n_obs)
    adata.obs[LIBRARY_ID_KEY] = pd.Categorical([library] * adata.n_obs)
    adata.uns[SPATIAL_KEY] = {
        library: spatial_entry(
            thumbnails(image, 1.0, _LOWRES_MAX_SIDE),
            spot_diameter=size / mpp,
            metadata={
                METADATA_SOURCE: "rankbygene.datasets.synthetic_visium_hd",
                METADATA_SEED: seed,
            },
            scalefactors={SCALEFACTOR_BIN_SIZE_UM: float(size), SCALEFACTOR_MPP: float(mpp)},
        )
    }
    return adata


def _as_spatialdata(
    tables: dict[int, AnnData],
    image: np.ndarray,
    dataset_id: str,
    mpp: float,
    bins_as_squares: bool,
) -> SpatialData:
    try:
        import shapely
        from geopandas import GeoDataFrame
        from spatialdata import SpatialData
        from spatialdata.models import Image2DModel, ShapesModel, TableModel
        from spatialdata.transformations import Identity, Scale
    except ImportError as err:
        raise ImportError(
            "synthetic_visium_hd returns a SpatialData object: pip install spatialdata (or pass "
            "as_anndata=True)."
        ) from err

    hires, hires_scale = _downscaled(image, _HIRES_MAX_SIDE, 0.5)
    lowres, lowres_scale = _downscaled(image, _LOWRES_MAX_SIDE, 0.5)
    full_system = dataset_id
    systems = {
        "hires": (f"{dataset_id}_downscaled_hires", hires_scale),
        "lowres": (f"{dataset_id}_downscaled_lowres", lowres_scale),
    }
    # pyramid levels halve the image down to about 256 pixels, at most four of them
    n_levels = min(4, max(0, int(math.log2(max(image.shape[:2]) / 256))))
    images = {
        f"{dataset_id}_full_image": Image2DModel.parse(
            image,
            dims=("y", "x", "c"),
            scale_factors=[2] * n_levels or None,
            chunks=(3, 1024, 1024),
            transformations={full_system: Identity()},
        )
    }
    for name, small in (("hires", hires), ("lowres", lowres)):
        system, scale = systems[name]
        images[f"{dataset_id}_{name}_image"] = Image2DModel.parse(
            small,
            dims=("y", "x", "c"),
            transformations={
                system: Identity(),
                full_system: Scale([1 / scale, 1 / scale], axes=("x", "y")),
            },
        )
    to_systems = {full_system: Identity()} | {
        system: Scale([scale, scale], axes=("x", "y")) for system, scale in systems.values()
    }
    shapes, out_tables = {}, {}
    for size, table in tables.items():
        key = bin_table_key(size)
        name = f"{dataset_id}_{key}"
        xy = table.obsm[SPATIAL_KEY]
        half = size / mpp / 2
        index = table.obs["location_id"].to_numpy()
        if bins_as_squares:
            squares = shapely.box(
                xy[:, 0] - half, xy[:, 1] - half, xy[:, 0] + half, xy[:, 1] + half
            )
            shapes[name] = ShapesModel.parse(
                GeoDataFrame(geometry=squares, index=index), transformations=to_systems
            )
        else:
            shapes[name] = ShapesModel.parse(
                xy,
                geometry=0,
                radius=np.full(len(xy), half),
                index=index,
                transformations=to_systems,
            )
        table.obs["region"] = pd.Categorical([name] * table.n_obs)
        out_tables[key] = TableModel.parse(
            table, region=name, region_key="region", instance_key="location_id"
        )
    return SpatialData(images=images, shapes=shapes, tables=out_tables)
