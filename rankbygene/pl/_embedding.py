"""UMAP of the image embedding, through scanpy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from rankbygene._constants import IMAGE_EMBEDDING_KEY
from rankbygene._docs import d
from rankbygene.pl._utils import new_axes, show_or_save


@d.dedent
def embedding(
    adata: AnnData,
    color: str | Sequence[str] | None = None,
    use_rep: str = IMAGE_EMBEDDING_KEY,
    layer: str | None = None,
    n_neighbors: int = 15,
    random_state: int = 0,
    ncols: int = 3,
    show: bool | None = None,
    save: str | Path | None = None,
    **kwargs,
) -> Sequence[Axes] | None:
    """UMAP of ``obsm[use_rep]`` (the image embedding), coloured by library, region or gene.

    The neighbour graph and the UMAP are computed with scanpy on a light copy, so ``adata``
    keeps its own ``obsp``/``obsm["X_umap"]``.

    Parameters
    ----------
    adata
        AnnData with the embedding in ``obsm[use_rep]``.
    color
        ``obs`` columns or genes (``var_names``), one panel each.
    use_rep
        ``obsm`` key of the embedding.
    %(layer)s
        For gene colours.
    n_neighbors
        Neighbours of the UMAP graph.
    random_state
        Seed of the UMAP layout.
    ncols
        Panels per row.
    show, save
        Show the figure; save it to this path.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (``palette``, ``cmap``, ``size``, ...).

    Returns
    -------
    The axes, unless the figure was shown.

    Examples
    --------
    >>> adata.obsm["X_rankbygene"] = model.get_image_representation(adata)
    >>> rbg.pl.embedding(adata, color=["library_id", "region", "ERBB2"])
    """
    import scanpy as sc

    if use_rep not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{use_rep!r}] is missing (obsm keys: {list(adata.obsm)}); store the "
            "embedding first, e.g. adata.obsm['X_rankbygene'] = model.get_image_representation()."
        )
    colors = [color] if isinstance(color, str) or color is None else list(color)
    unknown = [
        c for c in colors if c is not None and c not in adata.obs and c not in adata.var_names
    ]
    if unknown:
        raise KeyError(f"{unknown} are neither obs columns nor genes of adata.")
    genes = [c for c in colors if c is not None and c in adata.var_names and c not in adata.obs]
    light = AnnData(
        X=_gene_columns(adata, genes, layer),
        obs=adata.obs.copy(),
        obsm={use_rep: np.asarray(adata.obsm[use_rep], dtype=np.float32)},
        uns={k: v for k, v in adata.uns.items() if k.endswith("_colors")},
    )
    light.var_names = genes
    sc.pp.neighbors(light, use_rep=use_rep, n_neighbors=n_neighbors, random_state=random_state)
    sc.tl.umap(light, random_state=random_state)
    fig, axes = new_axes(len(colors), ncols, (4.4, 3.8))
    for ax, name in zip(axes, colors, strict=True):
        sc.pl.embedding(light, basis="umap", color=name, ax=ax, show=False, **kwargs)
        ax.set_title(name if name is not None else use_rep)
    fig.tight_layout()
    return show_or_save(fig, show, save, axes, own_figure=True)


def _gene_columns(adata: AnnData, genes: list[str], layer: str | None) -> np.ndarray:
    if not genes:
        return np.zeros((adata.n_obs, 0), dtype=np.float32)
    matrix = adata[:, genes].X if layer is None else adata[:, genes].layers[layer]
    matrix = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    return matrix.astype(np.float32)
