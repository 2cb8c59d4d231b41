"""Agreement between observed and predicted expression, per gene and per library."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from rankbygene._constants import PREDICTED_LAYER_KEY
from rankbygene._docs import d
from rankbygene._layout import spot_libraries
from rankbygene._logging import logger
from rankbygene._metrics import log_normalize, pearson_per_gene, spearman_per_gene

METRICS = ("pearson", "spearman", "mae", "mse")


@d.dedent
def evaluate_expression(
    adata: AnnData,
    layer_pred: str = PREDICTED_LAYER_KEY,
    layer_true: str | None = None,
    library_key: str | None = None,
    genes: Sequence[str] | None = None,
    true_is_counts: bool = True,
    target_sum: float = 1e4,
) -> pd.DataFrame:
    """Per-gene, per-library Pearson, Spearman, MAE and MSE of predicted vs observed expression.

    Observed counts are put on the prediction's scale first: ``log1p(counts / total * target_sum)``
    with the total over the evaluated genes (the model's panel), as the model does.

    Conventions: the HER2+ literature (ST-Net, HisToGene, Hist2ST, BLEEP) and the HEST benchmark
    report, for each held-out slide, the Pearson correlation of each gene across that slide's
    spots, averaged over genes; slides are then averaged. :func:`summarize_expression_scores` does
    exactly that (genes that are constant on a slide have an undefined correlation and are left
    out of the mean, as ``scipy.stats.pearsonr`` would flag them).

    Parameters
    ----------
    adata
        AnnData with the prediction in ``layers[layer_pred]`` and the observed expression.
    layer_pred
        Layer of predicted (log-normalised) expression.
    layer_true
        Layer of observed expression; ``None``: ``layers["counts"]`` when present, else ``X``.
    %(library_key)s
        Metrics are computed within each library (slide).
    genes
        Genes to evaluate (default: all).
    true_is_counts
        Observed expression is counts (log-normalised here); ``False`` when it already is on the
        prediction's scale.
    target_sum
        Library size of the normalisation.

    Returns
    -------
    Long table with columns ``library``, ``gene``, ``pearson``, ``spearman``, ``mae``, ``mse``.

    Examples
    --------
    >>> model.predict_expression(test)
    >>> scores = rbg.tl.evaluate_expression(test, library_key="library_id")
    >>> rbg.tl.summarize_expression_scores(scores)
    """
    if layer_pred not in adata.layers:
        raise KeyError(
            f"Layer {layer_pred!r} with predictions is missing (layers: {list(adata.layers)}); "
            "run model.predict_expression first."
        )
    if layer_true is None:
        layer_true = "counts" if "counts" in adata.layers else None
    if layer_true is not None and layer_true not in adata.layers:
        raise KeyError(f"Layer {layer_true!r} with observed expression is missing.")
    observed = adata.X if layer_true is None else adata.layers[layer_true]
    if observed is None:
        raise ValueError("No observed expression: adata.X is empty and no layer_true given.")
    columns = np.arange(adata.n_vars)
    if genes is not None:
        genes = list(genes)
        columns = adata.var_names.get_indexer(genes)
        if (columns < 0).all():
            raise ValueError(f"None of the {len(genes)} genes to evaluate are in adata.var_names.")
        if (columns < 0).any():
            missing = [g for g, c in zip(genes, columns, strict=True) if c < 0]
            raise ValueError(f"{len(missing)} genes are not in adata.var_names: {missing[:5]}.")
    names = adata.var_names[columns].astype(str)
    libraries = spot_libraries(adata, library_key, default="all")
    predicted = _dense(adata.layers[layer_pred])
    observed = _dense(observed)
    if not np.isfinite(observed).all():
        raise ValueError("Observed expression has NaN or infinite values.")
    if true_is_counts:
        if (observed < 0).any():
            raise ValueError(
                "Observed expression has negative values: pass true_is_counts=False for "
                "log-normalised values."
            )
        observed = log_normalize(observed[:, columns], target_sum=target_sum)
    else:
        observed = observed[:, columns]
    predicted = predicted[:, columns]
    tables = []
    for library in pd.unique(libraries):
        rows = libraries == library
        y, p = observed[rows], predicted[rows]
        tables.append(
            pd.DataFrame(
                {
                    "library": library,
                    "gene": names,
                    "pearson": pearson_per_gene(y, p),
                    "spearman": spearman_per_gene(y, p),
                    "mae": np.abs(y - p).mean(axis=0),
                    "mse": ((y - p) ** 2).mean(axis=0),
                }
            )
        )
    scores = pd.concat(tables, ignore_index=True)
    logger.info("evaluated %d genes in %d libraries", len(names), len(tables))
    return scores


def summarize_expression_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric over genes within each library, then over libraries (row ``"mean"``).

    Examples
    --------
    >>> rbg.tl.summarize_expression_scores(scores)
    """
    missing = [c for c in ("library", *METRICS) if c not in scores]
    if missing:
        raise KeyError(f"scores lacks columns {missing}; use evaluate_expression's output.")
    per_library = scores.groupby("library", sort=False)[list(METRICS)].mean()
    n_genes = scores.groupby("library", sort=False)["pearson"].count().rename("n_genes")
    per_library = per_library.join(n_genes)
    overall = per_library[list(METRICS)].mean().to_frame("mean").T
    overall["n_genes"] = per_library["n_genes"].mean()
    return pd.concat([per_library, overall])


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix, dtype=np.float64)
