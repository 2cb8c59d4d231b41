"""Library-size normalisation and log1p of counts into a layer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from scipy import sparse

from rankbygene._constants import LOG_NORMALIZED_MAX, LOGNORM_LAYER_KEY
from rankbygene._docs import d
from rankbygene._logging import logger

__all__ = ["normalize"]


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
    >>> from rankbygene.pp._normalize import check_not_log_normalized
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


def _lognormalize(adata: AnnData, x, target_sum: float | None):
    """``log1p(x / total * target_sum)`` through scanpy, on a float32 copy of ``x``."""
    x = x.astype(np.float32, copy=True) if sparse.issparse(x) else np.array(x, dtype=np.float32)
    if target_sum is None:
        # The median of the spots with counts, computed here: scanpy's median of CSR input
        # counts the empty spots too (another scale than dense input; all zeros past half).
        totals = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
        target_sum = float(np.median(totals[totals > 0]))
    light = light_adata(adata, x)
    sc.pp.normalize_total(light, target_sum=target_sum)
    sc.pp.log1p(light)
    return light.X


@d.dedent
def normalize(
    adata: AnnData,
    target_sum: float | None = 1e4,
    layer: str | None = None,
    key_added: str = LOGNORM_LAYER_KEY,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | np.ndarray | sparse.csr_matrix | None:
    """Library-size normalise and log-transform counts into a new layer.

    Each spot's counts are scaled to sum to ``target_sum`` and transformed with ``log1p``
    (:func:`scanpy.pp.normalize_total` then :func:`scanpy.pp.log1p`); the result goes to
    ``adata.layers[key_added]``. The counts themselves are left unchanged, so that the same
    AnnData can feed count-based steps (highly variable genes, the model's targets) and
    log-normalised ones.

    Parameters
    ----------
    %(adata)s
        Raw counts in ``layer`` (or ``X``); no spatial layout needed.
    target_sum
        Total count of each spot after normalisation; ``None`` uses the median total count over
        the spots with counts (scanpy's default for dense counts; sparse ones get the same).
    %(layer)s
        Raw counts.
    %(key_added)s
        In ``layers``; not ``layer`` itself.
    inplace
        ``False``: write nothing and return the values (as scanpy's
        ``normalize_total(inplace=False)`` returns its result).
    %(copy)s

    Returns
    -------
    ``None``, or a copy of ``adata`` when ``copy=True``; either way with
    ``layers[key_added]``: ``log1p`` of the normalised counts (float32, sparse when the counts
    are sparse). With ``inplace=False``, those values.

    Raises
    ------
    KeyError
        If ``layer`` is not in ``adata.layers``.
    ValueError
        If the counts are empty or contain NaN, infinite or negative values (the message says
        how many and where), if ``target_sum`` is not a positive finite number (or ``None`` on
        counts that are all zero), if ``key_added`` equals ``layer`` or if ``copy=True`` goes
        with ``inplace=False``.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.datasets.synthetic(n_slides=1, n_spots=100)
    >>> rbg.pp.normalize(adata, layer="counts")
    >>> adata.layers["lognorm"].shape == adata.shape
    True
    """
    if target_sum is not None and not (
        isinstance(target_sum, int | float | np.number)
        and not isinstance(target_sum, bool)
        and np.isfinite(target_sum)  # scanpy takes inf as "do not scale"
        and target_sum > 0
    ):
        raise ValueError(f"target_sum must be a positive finite number or None, got {target_sum!r}")
    if copy and not inplace:
        raise ValueError("copy=True returns a changed copy; it cannot go with inplace=False.")
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}")
    if layer is not None and key_added == layer:
        raise ValueError(
            f"key_added={key_added!r} would overwrite the counts in layer {layer!r}; "
            "choose another key"
        )
    x = get_matrix(adata, layer)
    check_not_empty(x, layer, "normalise")
    check_counts(adata, x, layer)
    if target_sum is None and not stored_values(x).any():
        # the median of the non-zero totals is then NaN, and so would be every value
        raise ValueError(
            f"{matrix_name(layer)} has no counts (every spot totals 0): target_sum=None scales "
            "to the median total; pass target_sum"
        )

    result = _lognormalize(adata, x, target_sum)
    if not inplace:
        return result
    out = adata.copy() if copy else adata
    out.layers[key_added] = result
    logger.info(
        "added layers[%r] (log1p of counts in %s normalised to %s per spot)",
        key_added,
        matrix_name(layer),
        "the median total" if target_sum is None else f"{target_sum:g}",
    )
    return out if copy else None
