"""Ranking consistency at a few anchor spots: gene-side against image-side similarity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes

from rankbygene._constants import IMAGE_EMBEDDING_KEY, RANK_CONSISTENCY_KEY
from rankbygene._docs import d
from rankbygene._layout import resolve_library_key, spot_libraries
from rankbygene.pl._utils import new_axes, show_or_save
from rankbygene.tl._rank_consistency import (
    candidate_similarities,
    gene_side_rows,
    representation,
    unit_rows,
)
from rankbygene.tl._rank_consistency import (
    rank_consistency as tl_rank_consistency,
)


@d.dedent
def rank_consistency(
    adata: AnnData,
    model=None,
    anchors: Sequence[str] | None = None,
    n_anchors: int = 3,
    use_rep: str = IMAGE_EMBEDDING_KEY,
    gene_rep: str | None = None,
    layer: str | None = "counts",
    n_neighbors: int | None = 30,
    library_key: str | None = None,
    ncols: int = 4,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Sequence[Axes] | None:
    """Gene-side against image-side similarity of anchor spots to their candidates.

    One panel per anchor (its candidates: the ``n_neighbors`` nearest spots on the gene side,
    within its library), with the Spearman rho of the two orderings, and a last panel with the
    distribution of rho over every spot (:func:`rankbygene.tl.rank_consistency`). A well
    aligned image encoder puts the points on an increasing curve.

    Parameters
    ----------
    adata
        AnnData with the image embedding in ``obsm[use_rep]`` and counts (or ``gene_rep``).
    model
        A trained :class:`~rankbygene.RankByGene`: its image embedding of ``adata`` is computed
        here when ``obsm[use_rep]`` is absent (nothing is written to ``adata``).
    anchors
        Spot names (``obs_names``); default: ``n_anchors`` spots at evenly spaced quantiles of
        the per-spot consistency, from the least to the most consistent.
    n_anchors
        Anchors chosen when ``anchors`` is None.
    use_rep, gene_rep, layer, n_neighbors
        As in :func:`rankbygene.tl.rank_consistency`.
    %(library_key)s
    ncols
        Panels per row.
    show, save
        Show the figure; save it to this path.

    Returns
    -------
    The axes, unless the figure was shown.

    Examples
    --------
    >>> rbg.pl.rank_consistency(test, model=model, library_key="library_id")
    """
    library_key = resolve_library_key(adata, library_key)
    light = AnnData(
        obs=adata.obs[[library_key]] if library_key else pd.DataFrame(index=adata.obs_names)
    )
    if use_rep in adata.obsm:
        light.obsm[use_rep] = adata.obsm[use_rep]
    elif model is not None:
        light.obsm[use_rep] = model.get_image_representation(adata, library_key=library_key)
    else:
        representation(adata, use_rep)  # raises the missing-key error
    gene = gene_side_rows(adata, gene_rep, layer)
    light.obsm["_gene_side"] = gene
    tl_rank_consistency(
        light,
        use_rep=use_rep,
        gene_rep="_gene_side",
        n_neighbors=n_neighbors,
        library_key=library_key,
    )
    scores = light.obs[RANK_CONSISTENCY_KEY]
    if anchors is None:
        ranked = scores.dropna().sort_values()
        if ranked.empty:
            raise ValueError("No spot has a defined rank consistency (too few spots?).")
        picks = np.linspace(0, len(ranked) - 1, min(n_anchors, len(ranked))).round().astype(int)
        anchors = list(ranked.index[picks])
    unknown = [a for a in anchors if a not in adata.obs_names]
    if unknown:
        raise KeyError(f"Anchors not in adata.obs_names: {unknown[:5]}.")
    fig, axes = new_axes(len(anchors) + 1, ncols, (3.3, 3.0))
    image = unit_rows(np.asarray(light.obsm[use_rep], dtype=np.float64))
    gene = unit_rows(gene)
    libraries = spot_libraries(adata, library_key, default="all")
    for ax, name in zip(axes, anchors, strict=False):
        i = adata.obs_names.get_loc(name)
        rows = np.flatnonzero(libraries == libraries[i])
        anchor = np.searchsorted(rows, [i])  # the anchor's row within its library
        s_image, s_gene = candidate_similarities(image[rows], gene[rows], anchor, n_neighbors)
        s_image, s_gene = s_image[0], s_gene[0]
        rho = scores.iloc[i]  # the anchor's score, from the candidates plotted here
        ax.scatter(s_gene, s_image, s=12, alpha=0.8)
        ax.set_title(f"{name}\nrho = {rho:.2f}", fontsize=9)
        ax.set_xlabel("gene-side similarity")
        ax.set_ylabel("image-side similarity")
    last = axes[-1]
    last.hist(scores.dropna(), bins=30, color="grey")
    last.axvline(scores.mean(), color="k", lw=1)
    last.set_title(f"all spots: mean rho = {scores.mean():.2f}", fontsize=9)
    last.set_xlabel("rank consistency (Spearman)")
    fig.tight_layout()
    return show_or_save(fig, show, save, axes, own_figure=True)
