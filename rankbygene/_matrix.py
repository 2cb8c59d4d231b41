"""Expression matrices of an AnnData: where they are, their checks and their log-normalisation.

Shared by ``pp`` (normalize, smooth_expression, select_genes), ``tl`` and the model's setup.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from scipy import sparse

#: Expression whose values are not all integers and all stay below this looks log-normalised
#: (log1p of counts normalised to 1e4 or 1e6 per spot stays below 10 or 14), not like counts.
LOG_NORMALIZED_MAX = 20.0


def matrix_name(layer: str | None) -> str:
    """How messages name the matrix of ``layer``: ``adata.X`` or ``adata.layers['<layer>']``."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def get_matrix(adata: AnnData, layer: str | None):
    """The expression matrix in ``layer`` (or ``X``); raises KeyError naming a missing layer."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass `layer=` naming the counts layer")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"layer {layer!r} not found in adata.layers (available: {list(adata.layers)})"
        )
    return adata.layers[layer]


def stored_values(x) -> np.ndarray:
    """The stored values of a dense or sparse matrix (without densifying)."""
    if sparse.issparse(x):
        return x.data
    return np.asarray(x)


def _first_position(x, bad_values: np.ndarray, adata: AnnData) -> str:
    """Human-readable position (spot, gene) of the first bad entry."""
    if sparse.issparse(x):
        coo = sparse.coo_matrix(x)
        i = int(np.flatnonzero(bad_values)[0])
        row, col = coo.row[i], coo.col[i]
    else:
        row, col = np.argwhere(bad_values)[0]
    return f"first at spot {adata.obs_names[row]!r}, gene {adata.var_names[col]!r}"


def check_not_empty(x, layer: str | None, what: str) -> None:
    """Raise ValueError when the matrix has no spot or no gene (scanpy and scipy fail obscurely)."""
    if 0 in x.shape:
        raise ValueError(
            f"{matrix_name(layer)} is empty ({x.shape[0]} spots x {x.shape[1]} genes): "
            f"nothing to {what}"
        )


def check_counts(adata: AnnData, x, layer: str | None) -> None:
    """Raise ValueError when counts contain NaN/inf or negative values, saying where."""
    values = stored_values(x)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{matrix_name(layer)} must be numeric, got dtype {values.dtype}")
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"{matrix_name(layer)} contains {int(bad.sum())} NaN or infinite values "
                f"({_first_position(x, bad, adata)}); counts must be finite"
            )
    neg = values < 0
    if neg.any():
        raise ValueError(
            f"{matrix_name(layer)} contains {int(neg.sum())} negative values "
            f"({_first_position(x, neg, adata)}); expected raw counts "
            "(pass `layer=` naming the counts layer)"
        )


def check_not_log_normalized(values: np.ndarray, where: str) -> None:
    """Raise when expression meant as counts looks log-normalised.

    It does when some values are not integers and all stay below ``LOG_NORMALIZED_MAX``: counts
    are integers, and log1p of normalised counts is rarely above 10. Normalising such values a
    second time would train on the wrong targets.

    Parameters
    ----------
    values
        The stored values (of a dense matrix, or ``.data`` of a sparse one), finite.
    where
        The matrix, for the message (e.g. ``"adata.layers['counts']"``).

    Raises
    ------
    ValueError
        The values look log-normalised; the message says what to pass instead.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene._matrix import check_not_log_normalized
    >>> check_not_log_normalized(np.array([0.0, 3.0, 12.0]), "adata.X")  # counts: fine
    >>> check_not_log_normalized(np.log1p([0.0, 3.0, 12.0]), "adata.X")
    Traceback (most recent call last):
    ...
    ValueError: adata.X looks log-normalised: its values are not integers and ...
    """
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0 or flat.dtype.kind != "f":
        return
    top = float(flat.max())
    if top >= LOG_NORMALIZED_MAX:
        return
    chunk = 1 << 22  # bounded temporaries on a large dense matrix; most stop at the first chunk
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk]
        if np.any(np.abs(part - np.rint(part)) > 1e-3):
            break
    else:
        return
    raise ValueError(
        f"{where} looks log-normalised: its values are not integers and all stay below "
        f"{LOG_NORMALIZED_MAX:g} (the largest is {top:.3g}), while counts are integers. Pass "
        "the layer of raw counts (e.g. layer='counts'), or is_log_normalized=True to use these "
        "values as they are. Counts that are not integers (corrected or smoothed) can be "
        "rounded first (np.rint)."
    )


def light_adata(adata: AnnData, x) -> AnnData:
    """Throw-away AnnData holding only a matrix, so scanpy writes nothing into the user's one."""
    return AnnData(
        X=x,
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )


def log1p_normalized(x, target_sum: float | None = 1e4):
    """``log1p(x / total * target_sum)`` per spot through scanpy, on a float32 copy of ``x``.

    The one log-normalisation of counts on the CPU (``pp.normalize``, ``tl.log_normalize``); the
    model's module does the same on each batch in torch (a test checks that they agree). Sparse
    counts stay sparse; spots without counts stay zero.

    Parameters
    ----------
    x
        Counts, spots x genes, dense or sparse.
    target_sum
        Total of each spot after normalisation; ``None``: the median total over the spots with
        counts (scanpy's median of sparse input counts the empty spots too).

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene._matrix import log1p_normalized
    >>> log1p_normalized(np.array([[1.0, 3.0], [0.0, 0.0]]), target_sum=4)
    array([[0.6931472, 1.3862944],
           [0.       , 0.       ]], dtype=float32)
    """
    x = x.astype(np.float32, copy=True) if sparse.issparse(x) else np.array(x, dtype=np.float32)
    if target_sum is None:
        totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
        target_sum = float(np.median(totals[totals > 0]))
    light = AnnData(X=x)
    with warnings.catch_warnings():
        # documented above: empty spots (tissue-free tiles, bins) are common here
        warnings.filterwarnings("ignore", "Some cells have zero counts", UserWarning)
        sc.pp.normalize_total(light, target_sum=target_sum)
    sc.pp.log1p(light)
    return light.X
