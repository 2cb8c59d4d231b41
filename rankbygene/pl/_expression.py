"""Observed against predicted expression: maps on the tissue and per-gene scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes

from rankbygene._constants import PREDICTED_LAYER_KEY
from rankbygene._docs import d
from rankbygene._layout import resolve_library_key, spot_libraries
from rankbygene._layout._keys import COUNTS_LAYER_KEY, LOWRES_IMAGE_KEY, SPATIAL_KEY
from rankbygene._logging import quiet_third_party_imports
from rankbygene._metrics import log_normalize, pearson_per_gene
from rankbygene.pl._utils import new_axes, show_or_save


@d.dedent
def expression_maps(
    adata: AnnData,
    genes: str | Sequence[str],
    layer_pred: str = PREDICTED_LAYER_KEY,
    layer_true: str | None = COUNTS_LAYER_KEY,
    library_id: str | None = None,
    library_key: str | None = None,
    img_res_key: str = LOWRES_IMAGE_KEY,
    cmap: str = "magma",
    panel_size: tuple[float, float] = (4.2, 3.8),
    show: bool | None = None,
    save: str | Path | None = None,
    **kwargs,
) -> Sequence[Axes] | None:
    """Observed and predicted expression side by side on the H&E image, one row per gene.

    Drawn with :func:`squidpy.pl.spatial_scatter`. Observed counts are log-normalised over the
    genes of ``adata`` (the model's panel), the scale of the prediction; each panel has its own
    colour scale (predictions are smoother than counts), and the predicted panel's title gives
    the Pearson r of the gene over the library's spots.

    Parameters
    ----------
    adata
        AnnData with ``layers[layer_pred]`` (see ``RankByGene.predict_expression``) and, for the
        observed column, counts.
    genes
        Gene or genes to draw.
    layer_pred
        Layer of the prediction.
    layer_true
        Layer of observed counts (``None``: ``X``). When the layer is missing (a slide without
        ST), only the predicted column is drawn.
    library_id
        Library to draw (default: the first).
    %(library_key)s
    img_res_key
        Image of ``uns["spatial"][library_id]["images"]`` underneath.
    cmap
        Colour map of the expression.
    panel_size
        Size of one panel in inches.
    show, save
        Show the figure; save it to this path.
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter` (e.g. ``size``, ``crop_coord``).

    Returns
    -------
    The axes (rows of [observed, predicted]), unless the figure was shown.

    Examples
    --------
    >>> model.predict_expression(test)
    >>> rbg.pl.expression_maps(test, ["ERBB2", "KRT19"], library_key="library_id")
    """
    with quiet_third_party_imports():
        import squidpy as sq

    genes = [genes] if isinstance(genes, str) else list(genes)
    if layer_pred not in adata.layers:
        raise KeyError(
            f"Layer {layer_pred!r} is missing (layers: {list(adata.layers)}); run "
            "model.predict_expression first."
        )
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"Genes not in adata.var_names: {missing}.")
    one, library_id = _one_library(adata, library_id, library_key)
    observed = _observed(one, layer_true)
    columns = one.var_names.get_indexer(genes)
    predicted = np.asarray(_dense(one.layers[layer_pred])[:, columns], dtype=np.float32)
    layers = {"predicted": predicted}
    if observed is not None:
        layers["observed"] = observed[:, columns]
    # A light AnnData that only carries what squidpy needs: the user's stays untouched.
    canvas = AnnData(
        X=np.zeros((one.n_obs, len(genes)), dtype=np.float32),
        obs=pd.DataFrame(index=one.obs_names),
        var=pd.DataFrame(index=pd.Index(genes)),
        obsm={SPATIAL_KEY: np.asarray(one.obsm[SPATIAL_KEY])},
        uns={SPATIAL_KEY: {library_id: one.uns[SPATIAL_KEY][library_id]}},
        layers=layers,
    )
    kinds = [k for k in ("observed", "predicted") if k in layers]
    fig, axes = new_axes(len(genes) * len(kinds), len(kinds), panel_size)
    for row, gene in enumerate(genes):
        r = (
            pearson_per_gene(layers["observed"][:, [row]], predicted[:, [row]])[0]
            if "observed" in layers
            else None
        )
        for col, kind in enumerate(kinds):
            ax = axes[row * len(kinds) + col]
            title = f"{gene} {kind}"
            if kind == "predicted" and r is not None:
                title += f" (r = {r:.2f})"
            sq.pl.spatial_scatter(
                canvas,
                color=gene,
                layer=kind,
                library_id=library_id,
                img_res_key=img_res_key,
                cmap=cmap,
                ax=ax,
                title=title,
                **kwargs,
            )
    fig.tight_layout()
    return show_or_save(fig, show, save, axes, own_figure=True)


def gene_scores(
    results: pd.DataFrame | Mapping[str, pd.DataFrame],
    metric: str = "pearson",
    n_label: int = 5,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Per-gene scores, sorted, with the best and worst genes named; methods side by side.

    Parameters
    ----------
    results
        :func:`rankbygene.tl.evaluate_expression`'s table (the score of a gene is its mean over
        libraries); a mapping ``{method: table}``, or one table with a ``method`` column, draws
        one curve per method. The benchmark's table (``method`` and ``held_out`` columns, no
        ``gene``) draws the mean score of each method per held-out section as bars.
    metric
        Column to draw.
    n_label
        Best and worst genes named (of the first method).
    ax
        Axes to draw on.
    show, save
        Show the figure; save it to this path.

    Returns
    -------
    The axes, unless the figure was shown.

    Examples
    --------
    >>> scores = rbg.tl.evaluate_expression(test, library_key="library_id")
    >>> rbg.pl.gene_scores(scores)
    """
    table = _as_long_table(results)
    if metric not in table:
        raise KeyError(f"results has no {metric!r} column (columns: {list(table.columns)}).")
    fig, axes = new_axes(1, 1, (6.5, 4.0), ax=ax)
    panel = axes[0]
    if "gene" not in table:
        _method_bars(table, metric, panel)
    else:
        _sorted_gene_curves(table, metric, n_label, panel)
    fig.tight_layout()
    shown = show_or_save(fig, show, save, axes, own_figure=ax is None)
    return None if shown is None else shown[0]


def _as_long_table(results) -> pd.DataFrame:
    if isinstance(results, Mapping):
        frames = [frame.assign(method=name) for name, frame in results.items()]
        if not frames:
            raise ValueError("results is empty.")
        return pd.concat(frames, ignore_index=True)
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a DataFrame or a dict of them; got {type(results)}.")
    return results


def _sorted_gene_curves(table: pd.DataFrame, metric: str, n_label: int, ax: Axes) -> None:
    methods = list(pd.unique(table["method"])) if "method" in table else [None]
    for i, method in enumerate(methods):
        rows = table if method is None else table[table["method"] == method]
        per_gene = rows.groupby("gene", sort=False)[metric].mean().dropna()
        per_gene = per_gene.sort_values(ascending=False)
        label = (
            f"{method} (mean {per_gene.mean():.3f})" if method else f"mean {per_gene.mean():.3f}"
        )
        ax.plot(np.arange(len(per_gene)), per_gene.to_numpy(), label=label, lw=1.5)
        if i == 0 and n_label > 0:
            _label_extremes(per_gene, min(n_label, len(per_gene) // 2), ax)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("genes, sorted by score")
    ax.set_ylabel(metric)
    ax.legend(frameon=False, fontsize=8)


def _label_extremes(per_gene: pd.Series, n: int, ax: Axes) -> None:
    """Name the ``n`` best and worst genes in two stacked columns, with a thin line to each point.

    Neighbouring genes have nearly equal scores, so labels placed at the points would overlap.
    """
    count = len(per_gene)
    step = 0.07 * max(float(per_gene.iloc[0] - per_gene.iloc[-1]), 1e-6)
    arrow = {"arrowstyle": "-", "lw": 0.4, "color": "grey"}
    for j in range(n):
        ax.annotate(
            per_gene.index[j],
            (j, per_gene.iloc[j]),
            xytext=(0.12 * count, per_gene.iloc[0] - j * step),
            fontsize=7,
            va="center",
            arrowprops=arrow,
        )
    for j in range(n):
        rank = count - n + j
        ax.annotate(
            per_gene.index[rank],
            (rank, per_gene.iloc[rank]),
            xytext=(0.86 * count, per_gene.iloc[-1] + (n - 1 - j) * step),
            fontsize=7,
            va="center",
            ha="right",
            arrowprops=arrow,
        )


def _method_bars(table: pd.DataFrame, metric: str, ax: Axes) -> None:
    if "method" not in table:
        raise KeyError("results needs a 'gene' column (per-gene scores) or a 'method' column.")
    group = "held_out" if "held_out" in table else None
    if group is None:
        means = table.groupby("method", sort=False)[metric].mean().to_frame(metric)
    else:
        means = table.groupby(["method", group], sort=False)[metric].mean().unstack(group)
        means["overall"] = means.mean(axis=1)
    means = means.sort_values(means.columns[-1], ascending=False)
    means.plot.bar(ax=ax, width=0.8, rot=30)
    ax.set_ylabel(f"mean {metric} over genes")
    ax.set_xlabel("")
    ax.legend(frameon=False, fontsize=8, title=group)


def _one_library(
    adata: AnnData, library_id: str | None, library_key: str | None
) -> tuple[AnnData, str]:
    spatial = adata.uns.get(SPATIAL_KEY, {})
    if not spatial:
        raise KeyError(f"adata.uns[{SPATIAL_KEY!r}] is missing: no image to draw on.")
    library_key = resolve_library_key(adata, library_key)
    libraries = None if library_key is None else spot_libraries(adata, library_key)
    if library_id is None:
        library_id = str(libraries[0]) if libraries is not None else next(iter(spatial))
    if library_id not in spatial:
        raise KeyError(
            f"Library {library_id!r} not in adata.uns[{SPATIAL_KEY!r}] ({list(spatial)})."
        )
    if libraries is None:
        return adata, library_id
    return adata[libraries == library_id], library_id


def _observed(adata: AnnData, layer_true: str | None) -> np.ndarray | None:
    if layer_true is not None and layer_true not in adata.layers:
        return None
    counts = adata.X if layer_true is None else adata.layers[layer_true]
    return None if counts is None else log_normalize(counts)


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
