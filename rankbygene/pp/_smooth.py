"""Spatial smoothing of expression over each spot's rings of grid neighbours."""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from rankbygene._constants import SMOOTHED_LAYER_KEY, SMOOTHED_LAYER_SUFFIX
from rankbygene._docs import d
from rankbygene._layout import resolve_library_key, spot_libraries
from rankbygene._layout._keys import SPATIAL_KEY
from rankbygene._logging import logger, quiet_third_party_imports
from rankbygene._matrix import get_matrix, matrix_name, stored_values

__all__ = ["smooth_expression", "smoothed_layer_key"]


def smoothed_layer_key(layer: str | None) -> str:
    """The default layer of :func:`smooth_expression`: ``"smoothed"`` for ``X``, else
    ``f"{layer}_smoothed"``, without scanpy's ``X_`` prefix (which names ``obsm`` keys).

    Examples
    --------
    >>> smoothed_layer_key(None), smoothed_layer_key("lognorm")
    ('smoothed', 'lognorm_smoothed')
    """
    return SMOOTHED_LAYER_KEY if layer is None else f"{layer}{SMOOTHED_LAYER_SUFFIX}"


# Neighbours within this factor of the nearest-neighbour distance count as the first ring when
# inferring the grid: hexagonal grids have 6 at 1.0, square grids 4 at 1.0 (diagonals at 1.41).
_RING_TOLERANCE = 1.25


def _infer_n_neighs(coords: np.ndarray, codes: np.ndarray) -> int:
    """6 for a hexagonal grid, 8 for a square grid (3x3 neighbourhood), from the coordinates."""
    kinds = set()
    for code in np.unique(codes):
        xy = coords[codes == code]
        if len(xy) < 2:
            continue
        dist, _ = cKDTree(xy).query(xy, k=min(len(xy), 9))
        nearest = np.median(dist[:, 1])
        if nearest <= 0:
            raise ValueError(
                "several spots share the same coordinates; if the AnnData holds several slides, "
                "pass `library_key=` naming the obs column that tells them apart"
            )
        # The 90th percentile, not the maximum: a few spots of a hand-registered legacy ST
        # array sit close enough to a diagonal neighbour to count 5 (seen on HER2+ C4).
        counts = (dist[:, 1:] <= _RING_TOLERANCE * nearest).sum(axis=1)
        first_ring = int(np.percentile(counts, 90, method="higher"))
        if first_ring in (5, 6, 7):
            kinds.add(6)
        elif first_ring == 4:
            kinds.add(8)
        else:
            raise ValueError(
                f"could not infer the spot grid (spots have up to {first_ring} equidistant "
                "nearest neighbours; expected 6 on a hexagonal or 4 on a square grid); "
                "pass `n_neighs=`"
            )
    if not kinds:
        raise ValueError("could not infer the spot grid from fewer than 2 spots; pass `n_neighs=`")
    if len(kinds) > 1:
        raise ValueError(
            "libraries mix hexagonal and square grids; smooth them separately or pass `n_neighs=`"
        )
    return kinds.pop()


@contextmanager
def _quiet_squidpy_graph_log():
    """Silence squidpy's per-call "Creating graph" INFO line; this function logs its own."""
    squidpy_logger = logging.getLogger("spatialdata._logging")
    level = squidpy_logger.level
    squidpy_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        squidpy_logger.setLevel(level)


def _smoothing_operator(
    coords: np.ndarray, library: pd.Categorical | None, n_neighs: int, n_rings: int
) -> sparse.csr_matrix:
    """Row-normalised (spot + its rings of neighbours) averaging matrix, block-diagonal per library.

    The graph comes from squidpy's grid builder, run on a throw-away AnnData so that nothing is
    written into the user's one.
    """
    n = coords.shape[0]
    light = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)))
    light.obsm[SPATIAL_KEY] = coords
    library_key = None
    if library is not None:
        library_key = "library"
        light.obs[library_key] = library
    kwargs = {
        "spatial_key": SPATIAL_KEY,
        "library_key": library_key,
        "n_neighs": n_neighs,
        "n_rings": n_rings,
        "copy": True,
    }
    # imported here: squidpy (with spatialdata) takes a second to import, and only this needs it
    with quiet_third_party_imports():
        import squidpy as sq

    with _quiet_squidpy_graph_log():
        if hasattr(sq.gr, "spatial_neighbors_grid"):  # squidpy >= 1.7
            graph = sq.gr.spatial_neighbors_grid(light, **kwargs)
        else:
            graph = sq.gr.spatial_neighbors(light, coord_type="grid", **kwargs)
    # (connectivities, distances); a named tuple in recent squidpy.
    adj = sparse.csr_matrix(graph[0], dtype=np.float64)
    adj.data[:] = 1.0
    # Symmetric neighbourhoods, and each spot counts itself.
    adj = adj.maximum(adj.T) + sparse.identity(n, format="csr")
    adj.data[:] = 1.0
    degree = np.asarray(adj.sum(axis=1)).ravel()
    return sparse.csr_matrix(sparse.diags(1.0 / degree) @ adj)


@d.dedent
def smooth_expression(
    adata: AnnData,
    n_rings: int = 1,
    layer: str | None = None,
    key_added: str | None = None,
    library_key: str | None = None,
    spatial_key: str = SPATIAL_KEY,
    n_neighs: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Average each spot's expression with its spatial neighbours (denoising the targets).

    Each spot's value becomes the unweighted mean over the spot and its grid neighbours up to
    ``n_rings`` rings away, within its own library (slides are never mixed). Spots at the tissue
    edge average over the neighbours they have. This is the "3x3 mean" of the reference
    RankByGene preprocessing on legacy ST data, generalised to Visium's hexagonal grid.

    The grid graph is :func:`squidpy.gr.spatial_neighbors_grid` (``coord_type="grid"``), computed
    on a throw-away AnnData: ``adata`` gets no ``obsp``/``uns`` entries.

    Parameters
    ----------
    %(adata)s
    n_rings
        Rings of neighbours to include: 1 = the immediate neighbours (6 on a hexagonal grid,
        8 with ``n_neighs=8`` on a square grid), 2 adds the next ring, and so on.
    %(layer)s
        Usually log-normalised expression (see :func:`rankbygene.pp.normalize`).
    %(key_added)s
        In ``layers``; default ``f"{layer}_smoothed"``, or ``"smoothed"`` for ``X``.
    %(library_key)s
        Spots are only averaged with spots of the same library.
    spatial_key
        Key of the spot coordinates in ``adata.obsm``.
    n_neighs
        Neighbours in the first ring, passed to squidpy's grid builder. ``None`` infers the grid
        from the coordinates: 6 for a hexagonal (Visium-like) grid, 8 for a square grid such as
        legacy ST, where the first ring is the full 3x3 block including diagonals. Use 4 for a
        square grid without diagonals.
    %(copy)s

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``; either way with ``layers[key_added]``:
    the smoothed expression (sparse CSR when the input is sparse, else a dense array).

    Raises
    ------
    KeyError
        If ``obsm[spatial_key]``, ``layer`` or ``obs[library_key]`` is missing.
    ValueError
        If the coordinates do not have shape ``(n_obs, 2)`` or are not finite, the expression is
        not finite, ``n_rings``/``n_neighs`` are not positive integers, or the grid cannot be
        inferred.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.datasets.synthetic(n_slides=2, n_spots=100)
    >>> rbg.pp.normalize(adata, layer="counts")
    >>> rbg.pp.smooth_expression(adata, layer="lognorm")  # per library: obs["library_id"]
    >>> "lognorm_smoothed" in adata.layers
    True
    """
    # Validate everything before computing or writing anything.
    if isinstance(n_rings, bool) or not isinstance(n_rings, int | np.integer) or n_rings < 1:
        raise ValueError(f"n_rings must be an integer >= 1, got {n_rings!r}")
    if n_neighs is not None and (
        isinstance(n_neighs, bool) or not isinstance(n_neighs, int | np.integer) or n_neighs < 1
    ):
        raise ValueError(f"n_neighs must be None or an integer >= 1, got {n_neighs!r}")
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"spot coordinates not found: adata.obsm[{spatial_key!r}] is missing "
            f"(available: {list(adata.obsm)})"
        )
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] < 2:
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must have shape (n_obs, 2) = ({adata.n_obs}, 2), "
            f"got {coords.shape}"
        )
    coords = np.ascontiguousarray(coords[:, :2], dtype=np.float64)
    if not np.isfinite(coords).all():
        raise ValueError(f"adata.obsm[{spatial_key!r}] contains NaN or infinite coordinates")
    library_key = resolve_library_key(adata, library_key)
    library = pd.Categorical(spot_libraries(adata, library_key))
    x = get_matrix(adata, layer)
    values = stored_values(x)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{matrix_name(layer)} must be numeric, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise ValueError(f"{matrix_name(layer)} contains NaN or infinite values")
    if key_added is None:
        key_added = smoothed_layer_key(layer)
    codes = library.codes
    if n_neighs is None:
        n_neighs = _infer_n_neighs(coords, codes)
    sizes = np.bincount(codes)
    sizes = sizes[sizes > 0]
    if sizes.size and sizes.min() <= n_neighs:
        raise ValueError(
            f"every library needs more than n_neighs={n_neighs} spots; the smallest has "
            f"{sizes.min()}"
        )

    op = _smoothing_operator(coords, library, int(n_neighs), int(n_rings))
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float32
    if sparse.issparse(x):
        smoothed = sparse.csr_matrix(op @ sparse.csr_matrix(x)).astype(dtype)
    else:
        smoothed = np.asarray(op @ np.asarray(x, dtype=np.float64), dtype=dtype)

    out = adata.copy() if copy else adata
    out.layers[key_added] = smoothed
    logger.info(
        "added layers[%r] (%s averaged over %d ring(s) of %s grid neighbours%s)",
        key_added,
        matrix_name(layer),
        n_rings,
        "hexagonal" if n_neighs == 6 else f"{n_neighs}-neighbour",
        f" per obs[{library_key!r}]" if library_key else "",
    )
    return out if copy else None
