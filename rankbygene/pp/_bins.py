"""Square bins (Visium HD) summed into larger square pseudo-spots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from rankbygene._constants import N_BINS_KEY
from rankbygene._docs import d
from rankbygene._layout import resolve_library_key, spatial_coordinates, spot_libraries
from rankbygene._layout._keys import (
    ARRAY_COL_KEY,
    ARRAY_ROW_KEY,
    IN_TISSUE_KEY,
    SCALEFACTOR_AGGREGATED_BIN_SIZE_UM,
    SCALEFACTOR_BIN_SIZE_UM,
    SCALEFACTOR_MPP,
    SCALEFACTOR_SPOT_DIAMETER,
    SCALEFACTORS_KEY,
    SPATIAL_KEY,
    SPATIALDATA_ATTRS_KEY,
)
from rankbygene._logging import logger

__all__ = ["aggregate_bins"]

# Bins whose centre is further than this share of a bin from the grid are off it.
_GRID_TOLERANCE = 0.25
_GRID_COLUMNS = (ARRAY_ROW_KEY, ARRAY_COL_KEY)
# The bins' spacing may differ from their recorded size by this share at most.
_PITCH_TOLERANCE = 0.1
_PITCH_SAMPLE = 10_000  # bins whose nearest neighbour is looked for, at most


@d.dedent
def aggregate_bins(
    adata: AnnData,
    size_um: float,
    library_key: str | None = None,
    bin_size_um: float | None = None,
    min_bins: int = 1,
    spatial_key: str = SPATIAL_KEY,
) -> AnnData:
    """Sum square bins (Visium HD) into square pseudo-spots of side ``size_um``.

    The bins of each library are tiled by squares of ``size_um / bin_size`` bins a side, on the
    bins' own grid (``obs["array_row"]``/``["array_col"]`` when present, else the grid the
    centres lie on); each square with at least ``min_bins`` bins becomes a pseudo-spot. Its
    counts are the sum of its bins' (``X`` and every layer: aggregate counts, normalise after),
    its centre the mean of their centres, its diameter ``size_um`` in full-resolution pixels,
    so that :class:`~rankbygene.RankByGene` reads patches of that side. Train on 8 or 16 um bins
    as they are, or on pseudo-spots of a chosen size.

    The bin size and the image resolution come from each library's ``scalefactors``
    (``bin_size_um``, and ``microns_per_pixel`` or ``spot_diameter_fullres``, as
    :func:`rankbygene.io.from_spatialdata` records them for Visium HD bins), and are checked
    against the data: the bins' spacing in pixels (neighbouring bins' distance per step of
    their grid) times the microns per pixel must be the bin size, within 10%%.

    Memory per million bins, measured (tracemalloc) on 96,442 bins of 8 um and 100 genes (17
    non-zero counts per bin) and scaled; counts grow with the non-zeros (8 bytes each in CSR
    float32, a real 18,000-gene panel has hundreds per 8 um bin), the rest with the bins:

    - the bins as AnnData (:func:`rankbygene.io.from_spatialdata`): 0.35 GB (counts 0.14,
      ``obs`` 0.19, ``obsm["spatial"]`` 0.016), converting them peaks about 1 GB higher;
    - this function: 0.21 GB above its input, the output being the pseudo-spots only;
    - :func:`rankbygene.pp.smooth_expression` on the bins: 1.2 GB above its input;
    - training (``model.train`` with its default ``cache="memory"``): the decoded patches,
      ``3 * input_size**2`` bytes per bin (3.1 GB at ``input_size=32``, 7 GB at 48); pass
      ``cache="disk"`` to map them from disk instead (embedding and prediction stream them).

    Pseudo-spots of ``k x k`` bins need ``k**2`` times less of each.

    Parameters
    ----------
    %(adata)s
        Bins (e.g. from :func:`rankbygene.io.from_spatialdata`).
    size_um
        Side of a pseudo-spot in microns: a whole multiple of the bin size (e.g. 32 or 48 um
        from 8 um bins; 56 um is the nearest to a Visium spot's 55 um).
    %(library_key)s
        Bins of different libraries are never summed together.
    bin_size_um
        Bin side in microns, for libraries whose ``scalefactors`` lack ``bin_size_um``; where
        they record it, the two must agree.
    min_bins
        Pseudo-spots with fewer bins (at the tissue's edge) are dropped.
    spatial_key
        ``obsm`` key of the bin centres in full-resolution pixels.

    Returns
    -------
    A new AnnData of pseudo-spots, sorted by library and grid position: ``X`` and layers
    summed, ``var`` as ``adata``'s, ``obsm[spatial_key]`` the mean bin centres, ``obs`` with the
    library column, ``array_row``/``array_col`` (the pseudo-spot grid), ``in_tissue``,
    ``n_bins`` and, for each categorical column of ``adata`` (e.g. a cluster or region label),
    its most frequent value among the bins; other ``obs`` and ``obsm`` entries are left out.
    ``uns`` is ``adata``'s (images shared, not copied) with each library's
    ``spot_diameter_fullres`` and ``bin_size_um`` set to the pseudo-spot's and
    ``aggregated_bin_size_um`` the bins'; the pseudo-spots annotate no SpatialData element.

    Raises
    ------
    KeyError
        The bin size or the image resolution of a library is unknown, or a key is missing.
    ValueError
        ``size_um`` is not a whole multiple of a library's bin size, ``min_bins`` is below 1,
        the bins lie on no square grid, or ``bin_size_um`` disagrees with the recorded bin size
        or with the bins' spacing (naming both).

    Examples
    --------
    >>> import rankbygene as rbg
    >>> bins = rbg.datasets.synthetic_visium_hd(size_um=400, bin_sizes_um=8, as_anndata=True)
    >>> spots = rbg.pp.aggregate_bins(bins, size_um=32)
    >>> int(spots.obs["n_bins"].max())
    16
    >>> spots.uns["spatial"]["synthetic_hd"]["scalefactors"]["bin_size_um"]
    32.0
    """
    if isinstance(min_bins, bool) or not isinstance(min_bins, int | np.integer) or min_bins < 1:
        raise ValueError(f"min_bins must be an integer >= 1; got {min_bins!r}.")
    if not (
        isinstance(size_um, int | float | np.number) and math.isfinite(size_um) and size_um > 0
    ):
        raise ValueError(f"size_um must be a positive number of microns; got {size_um!r}.")
    library_key = resolve_library_key(adata, library_key)
    libraries = spot_libraries(adata, library_key)
    coords = spatial_coordinates(adata, spatial_key)
    spatial = adata.uns.get(SPATIAL_KEY) or {}
    names = list(pd.unique(libraries))

    keys = np.zeros((adata.n_obs, 3), dtype=np.int64)  # library, pseudo-spot row and column
    scales: dict[str, tuple[float, float]] = {}
    for k, library in enumerate(names):
        rows = np.flatnonzero(libraries == library)
        pitch = _bin_pitch(adata, rows, coords[rows])
        bin_size, mpp = _bin_geometry(spatial.get(library), library, bin_size_um, pitch)
        factor = _factor(size_um, bin_size, library)
        grid = _grid_positions(adata, rows, coords[rows], bin_size / mpp, library)
        keys[rows] = np.column_stack([np.full(len(rows), k), grid // factor])
        scales[library] = (bin_size, mpp)

    # one int64 per bin (library, row, column), cheaper to sort than rows of three
    origin = keys.min(axis=0)
    keys -= origin
    span = keys.max(axis=0) + 1
    codes, which = np.unique(
        (keys[:, 0] * span[1] + keys[:, 1]) * span[2] + keys[:, 2], return_inverse=True
    )
    groups = np.column_stack(np.unravel_index(codes, tuple(span))) + origin
    which = which.ravel()
    indicator = sparse.csr_matrix(
        (np.ones(adata.n_obs, dtype=np.float32), (which, np.arange(adata.n_obs))),
        shape=(len(groups), adata.n_obs),
    )
    n_bins = np.bincount(which, minlength=len(groups))
    kept = np.flatnonzero(n_bins >= min_bins)
    indicator, groups, n_bins = indicator[kept], groups[kept], n_bins[kept]

    centres = np.asarray(indicator @ coords) / n_bins[:, None]
    group_library = np.asarray(names, dtype=object)[groups[:, 0]]
    obs = pd.DataFrame(
        {
            ARRAY_ROW_KEY: groups[:, 1],
            ARRAY_COL_KEY: groups[:, 2],
            IN_TISSUE_KEY: np.ones(len(groups), dtype=np.int64),
            N_BINS_KEY: n_bins.astype(np.int64),
        },
        index=pd.Index(
            [
                f"{lib}_{size_um:g}um_{r}_{c}"
                for lib, r, c in zip(group_library, groups[:, 1], groups[:, 2], strict=True)
            ]
        ),
    )
    for column in adata.obs.columns:
        values = adata.obs[column]
        if (
            column == library_key
            or column in obs
            or not isinstance(values.dtype, pd.CategoricalDtype)
        ):
            continue
        obs[column] = _most_frequent(values, indicator)
    if library_key is not None:
        source = adata.obs[library_key]
        categories = (
            source.cat.categories if isinstance(source.dtype, pd.CategoricalDtype) else None
        )
        obs.insert(0, library_key, pd.Categorical(group_library, categories=categories))

    out = AnnData(
        X=_summed(adata.X, indicator),
        obs=obs,
        var=adata.var.copy(),
        obsm={spatial_key: centres},
        layers={key: _summed(layer, indicator) for key, layer in adata.layers.items()},
        uns=_uns(adata.uns, scales, size_um),
    )
    left_out = [key for key in adata.obsm if key != spatial_key]
    logger.info(
        "aggregate_bins: %d bins -> %d pseudo-spots of %g um (%s bins a side)%s",
        adata.n_obs,
        out.n_obs,
        size_um,
        ", ".join(f"{round(size_um / b)}" for b, _ in scales.values()),
        f"; obsm {left_out} not aggregated" if left_out else "",
    )
    return out


def _bin_geometry(
    entry: Mapping[str, Any] | None, library: str, bin_size_um: float | None, pitch: float
) -> tuple[float, float]:
    """``(bin side in um, um per full-resolution pixel)`` of a library, checked against the
    bins' spacing ``pitch`` (pixels per grid step)."""
    scalefactors = (entry or {}).get(SCALEFACTORS_KEY) or {}
    recorded = scalefactors.get(SCALEFACTOR_BIN_SIZE_UM)
    where = f"scalefactors[{SCALEFACTOR_BIN_SIZE_UM!r}]"
    if (
        bin_size_um is not None
        and recorded is not None
        and not math.isclose(float(bin_size_um), float(recorded), rel_tol=1e-6)
    ):
        raise ValueError(
            f"bin_size_um={float(bin_size_um):g} disagrees with library {library!r}, whose "
            f"bins are recorded as {float(recorded):g} um ({where}): leave bin_size_um out."
        )
    bin_size = recorded if bin_size_um is None else bin_size_um
    if bin_size is None:
        raise KeyError(
            f"Library {library!r} has no {where}: pass bin_size_um "
            "(rbg.io.from_spatialdata records it for Visium HD bins)."
        )
    bin_size = float(bin_size)
    if not bin_size > 0:
        raise ValueError(f"Library {library!r}: the bin size must be positive; got {bin_size}.")
    what = "bin_size_um" if bin_size_um is not None else where
    if SCALEFACTOR_MPP in scalefactors:
        mpp = float(scalefactors[SCALEFACTOR_MPP])
        if np.isfinite(pitch) and abs(pitch * mpp / bin_size - 1) > _PITCH_TOLERANCE:
            raise ValueError(
                f"Library {library!r}: its bins lie {pitch:.3g} px apart, {pitch * mpp:.3g} um "
                f"at the recorded {mpp:g} um per pixel (scalefactors[{SCALEFACTOR_MPP!r}]), "
                f"not {bin_size:g} um ({what})."
            )
        return bin_size, mpp
    if SCALEFACTOR_SPOT_DIAMETER in scalefactors:
        # the bins' side in pixels is their diameter: the resolution follows
        diameter = float(scalefactors[SCALEFACTOR_SPOT_DIAMETER])
        if np.isfinite(pitch) and abs(pitch / diameter - 1) > _PITCH_TOLERANCE:
            raise ValueError(
                f"Library {library!r}: its bins lie {pitch:.3g} px apart but are "
                f"{diameter:.3g} px wide (scalefactors[{SCALEFACTOR_SPOT_DIAMETER!r}]): square "
                "bins touch, so one of the two is wrong."
            )
        return bin_size, bin_size / diameter
    raise KeyError(
        f"Library {library!r} has neither scalefactors[{SCALEFACTOR_MPP!r}] nor "
        f"[{SCALEFACTOR_SPOT_DIAMETER!r}]: the image resolution is unknown."
    )


def _bin_pitch(adata: AnnData, rows: np.ndarray, xy: np.ndarray) -> float:
    """Pixels per step of the bins' grid, or NaN where the bins do not say.

    With ``array_row``/``array_col``: the least-squares map from grid positions to centres
    (bins missing in between, or jittered centres, do not bias it). Without: the median distance
    to the nearest bin, when the bins lie on an axis-aligned grid of that step.
    """
    if len(xy) < 2:
        return float("nan")
    if all(column in adata.obs for column in _GRID_COLUMNS):
        grid = adata.obs[list(_GRID_COLUMNS)].iloc[rows].to_numpy()
        if np.issubdtype(grid.dtype, np.number) and np.isfinite(grid).all():
            design = np.column_stack([grid.astype(np.float64), np.ones(len(grid))])
            if np.linalg.matrix_rank(design) == 3:
                steps = np.linalg.lstsq(design, xy, rcond=None)[0][:2]
                return float(np.linalg.norm(steps, axis=1).mean())
    query = np.arange(len(xy))
    if len(xy) > _PITCH_SAMPLE:  # a sample gives the median as well
        query = np.random.default_rng(0).choice(len(xy), _PITCH_SAMPLE, replace=False)
    distances, _ = cKDTree(xy).query(xy[query], k=2)
    pitch = float(np.median(distances[:, 1]))
    position = (xy - xy.min(axis=0)) / pitch if pitch > 0 else xy * np.nan
    if not np.abs(position - np.rint(position)).max() <= _GRID_TOLERANCE:
        return float("nan")  # no grid of that step: the grid's own check says so
    return pitch


def _factor(size_um: float, bin_size: float, library: str) -> int:
    factor = size_um / bin_size
    if factor < 1 - 1e-6 or abs(factor - round(factor)) > 1e-6:
        below, above = max(1, math.floor(factor)), max(1, math.ceil(factor))
        raise ValueError(
            f"size_um={size_um:g} is not a whole multiple of library {library!r}'s {bin_size:g} "
            f"um bins: try {below * bin_size:g} or {above * bin_size:g}."
        )
    return int(round(factor))


def _grid_positions(
    adata: AnnData, rows: np.ndarray, xy: np.ndarray, bin_px: float, library: str
) -> np.ndarray:
    """``(row, column)`` of each bin on its grid: ``array_row``/``array_col``, else from ``xy``."""
    if all(column in adata.obs for column in _GRID_COLUMNS):
        grid = adata.obs[list(_GRID_COLUMNS)].iloc[rows].to_numpy()
        numeric = np.issubdtype(grid.dtype, np.number) and np.isfinite(grid).all()
        if numeric and (grid == np.round(grid)).all():
            return grid.astype(np.int64)
    # no array positions: bins on an axis-aligned grid of their own side
    position = (xy[:, ::-1] - xy[:, ::-1].min(axis=0)) / bin_px
    grid = np.rint(position)
    off = np.abs(position - grid).max() if len(grid) else 0.0
    if off > _GRID_TOLERANCE:
        raise ValueError(
            f"Library {library!r}: bins lie up to {off:.2f} bins off an axis-aligned grid of "
            f"{bin_px:.2f} pixels; give their grid positions as obs[{ARRAY_ROW_KEY!r}] and "
            f"obs[{ARRAY_COL_KEY!r}]."
        )
    return grid.astype(np.int64)


def _summed(matrix: Any, indicator: sparse.csr_matrix) -> Any:
    if sparse.issparse(matrix):
        dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.floating) else np.float32
        return sparse.csr_matrix(indicator @ matrix.astype(dtype, copy=False))
    matrix = np.asarray(matrix)
    dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.floating) else np.float32
    return np.asarray(indicator @ matrix.astype(dtype, copy=False))


def _most_frequent(values: pd.Series, indicator: sparse.csr_matrix) -> pd.Categorical:
    """The most frequent category among each pseudo-spot's bins (missing where all are)."""
    codes = values.cat.codes.to_numpy()
    present = codes >= 0
    n_categories = max(len(values.cat.categories), 1)
    onehot = sparse.csr_matrix(
        (np.ones(int(present.sum()), dtype=np.float32), (np.flatnonzero(present), codes[present])),
        shape=(len(codes), n_categories),
    )
    tally = (indicator @ onehot).toarray()
    best = np.where(tally.max(axis=1) > 0, tally.argmax(axis=1), -1)
    return pd.Categorical.from_codes(best, categories=values.cat.categories)


def _uns(uns: Mapping[str, Any], scales: dict[str, tuple[float, float]], size_um: float) -> dict:
    out = {key: value for key, value in uns.items() if key != SPATIALDATA_ATTRS_KEY}
    spatial = dict(out.get(SPATIAL_KEY) or {})
    for library, (bin_size, mpp) in scales.items():
        entry = dict(spatial.get(library) or {})
        entry[SCALEFACTORS_KEY] = {
            **(entry.get(SCALEFACTORS_KEY) or {}),
            SCALEFACTOR_SPOT_DIAMETER: size_um / mpp,
            SCALEFACTOR_BIN_SIZE_UM: float(size_um),
            SCALEFACTOR_MPP: mpp,
            SCALEFACTOR_AGGREGATED_BIN_SIZE_UM: bin_size,
        }
        spatial[library] = entry
    if spatial:
        out[SPATIAL_KEY] = spatial
    return out
