"""Per-gene agreement metrics between observed and predicted expression."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.stats import rankdata

from rankbygene._matrix import log1p_normalized


def log_normalize(counts, target_sum: float = 1e4) -> np.ndarray:
    """Library-size normalisation and log1p of a counts matrix, as a dense float32 array.

    ``log1p(counts / total * target_sum)`` per spot (:func:`scanpy.pp.normalize_total` then
    :func:`scanpy.pp.log1p`, as :func:`rankbygene.pp.normalize`); spots without counts stay 0.

    Examples
    --------
    >>> log_normalize(np.array([[1.0, 3.0]]), target_sum=4)
    array([[0.6931472, 1.3862944]], dtype=float32)
    """
    values = log1p_normalized(counts, target_sum)
    return values.toarray() if sparse.issparse(values) else np.asarray(values)


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column (gene); NaN where either side is constant.

    Examples
    --------
    >>> pearson_per_gene(np.array([[0.0], [1.0], [2.0]]), np.array([[1.0], [2.0], [4.0]]))
    array([0.98198051])
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"Shapes differ: observed {y_true.shape}, predicted {y_pred.shape}.")
    a = y_true - y_true.mean(axis=0)
    b = y_pred - y_pred.mean(axis=0)
    denominator = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denominator
    r[denominator == 0] = np.nan
    return r


def spearman_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Spearman rho of each column (average ranks for ties); NaN where either side is constant.

    Examples
    --------
    >>> spearman_per_gene(np.array([[0.0], [1.0], [2.0]]), np.array([[1.0], [2.0], [4.0]]))
    array([1.])
    """
    return pearson_per_gene(rankdata(y_true, axis=0), rankdata(y_pred, axis=0))
