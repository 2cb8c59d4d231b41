"""Library-size normalisation and log1p of counts into a layer."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scipy import sparse

from rankbygene._constants import LOGNORM_LAYER_KEY
from rankbygene._docs import d
from rankbygene._logging import logger
from rankbygene._matrix import (
    check_counts,
    check_not_empty,
    get_matrix,
    log1p_normalized,
    matrix_name,
    stored_values,
)

__all__ = ["normalize"]


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

    result = log1p_normalized(x, target_sum)
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
