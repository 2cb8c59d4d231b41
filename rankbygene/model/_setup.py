"""Checks of setup_anndata and of gene panels, before anything is registered or loaded."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from anndata import AnnData
from scipy import sparse

from rankbygene._layout import (
    image_sources,
    spatial_coordinates,
    spot_libraries,
    validate_layout,
)
from rankbygene._matrix import check_not_log_normalized


def validate_setup(
    adata: AnnData,
    layer: str | None,
    library_key: str | None,
    spatial_key: str,
    image_key: str | None,
    features_key: str | None,
    is_log_normalized: bool,
    check_layout: bool = True,
) -> None:
    """Every check of setup_anndata, before anything is written."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData; got {type(adata).__name__}.")
    if adata.n_obs < 2 or adata.n_vars < 2:
        raise ValueError(
            f"AnnData has {adata.n_obs} spots and {adata.n_vars} genes: too few (at least 2 "
            "of each; with one gene every gene embedding is the same)."
        )
    if not adata.var_names.is_unique:
        repeated = list(adata.var_names[adata.var_names.duplicated()].unique()[:5])
        raise ValueError(
            f"adata.var_names repeat (e.g. {repeated}): predictions are keyed by gene; call "
            "adata.var_names_make_unique() first."
        )
    if not adata.obs_names.is_unique:
        # outputs are by position, so this works, but joins by spot name (obs of a prediction,
        # pandas merges, SpatialData tables) would mix spots up
        repeated = list(adata.obs_names[adata.obs_names.duplicated()].unique()[:5])
        warnings.warn(
            f"adata.obs_names repeat (e.g. {repeated}), as after concatenating sections: call "
            "adata.obs_names_make_unique() (or concatenate with index_unique='-') so that "
            "spots can be told apart by name.",
            UserWarning,
            stacklevel=3,
        )
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not in adata.layers (layers: {list(adata.layers)}).")
    matrix = adata.X if layer is None else adata.layers[layer]
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    if matrix is None:
        raise ValueError(f"{where} is empty: expression is needed for training.")
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    n_nan = int(np.count_nonzero(~np.isfinite(values)))
    if n_nan:
        raise ValueError(f"{where} has {n_nan} NaN or infinite values.")
    if not is_log_normalized:
        n_neg = int(np.count_nonzero(values < 0))
        if n_neg:
            raise ValueError(
                f"{where} has {n_neg} negative values: counts are expected (or pass "
                "is_log_normalized=True for log-normalised expression)."
            )
        check_not_log_normalized(values, where)
    variance = column_variance(matrix)
    constant = np.flatnonzero(variance <= 0)
    if constant.size:
        names = list(adata.var_names[constant[:5]])
        raise ValueError(
            f"{constant.size} genes have zero variance across spots (e.g. {names}): they carry no "
            "signal; drop them (e.g. rbg.pp.select_genes or sc.pp.filter_genes)."
        )
    spatial_coordinates(adata, spatial_key)
    libraries = spot_libraries(adata, library_key)
    if features_key is not None:
        if features_key not in adata.obsm:
            raise KeyError(
                f"features_key {features_key!r} not in adata.obsm (keys: {list(adata.obsm)})."
            )
        features = np.asarray(adata.obsm[features_key])
        if features.ndim not in (2, 3) or features.shape[0] != adata.n_obs:
            raise ValueError(
                f"adata.obsm[{features_key!r}] must be (n_obs, n_features) or (n_obs, n_views, "
                f"n_features); got {features.shape}."
            )
        n_bad = int(np.count_nonzero(~np.isfinite(features)))
        if n_bad:
            raise ValueError(f"adata.obsm[{features_key!r}] has {n_bad} NaN or infinite values.")
    else:
        sources = image_sources(adata, list(np.unique(libraries)), image_key=image_key)
        validate_layout(
            adata,
            sources,
            libraries,
            spatial_key,
            check_units=check_layout,
            expression=matrix,
            is_log_normalized=is_log_normalized,
        )


def column_variance(matrix: Any) -> np.ndarray:
    if sparse.issparse(matrix):
        mean = np.asarray(matrix.mean(axis=0)).ravel()
        mean_sq = np.asarray(matrix.multiply(matrix).mean(axis=0)).ravel()
        return mean_sq - mean**2
    return np.asarray(matrix, dtype=np.float64).var(axis=0)


def check_var_names(adata: AnnData, model_genes: Sequence[str]) -> None:
    """Name the genes that differ between ``adata`` and the model."""
    model_genes = [str(g) for g in model_genes]
    have = adata.var_names.astype(str)
    if len(have) == len(model_genes) and (have == np.asarray(model_genes)).all():
        return
    missing = [g for g in model_genes if g not in set(have)]
    extra = len(set(have) - set(model_genes))
    if missing:
        raise ValueError(
            f"adata lacks {len(missing)} of the model's {len(model_genes)} genes "
            f"(e.g. {missing[:5]}); subset or reindex it to the model's panel "
            "(model.adata_manager or the saved var_names)."
        )
    raise ValueError(
        f"adata's genes differ from the model's: {extra} extra genes or another order; "
        "use adata[:, model_genes]."
    )
