"""Cross-modal ranking consistency per spot: does the image side order neighbours as genes do?"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from rankbygene._constants import IMAGE_EMBEDDING_KEY, RANK_CONSISTENCY_KEY
from rankbygene._docs import d
from rankbygene._layout import spot_libraries
from rankbygene._logging import logger
from rankbygene._metrics import log_normalize, spearman_per_gene

_ROW_CHUNK = 512  # anchors per block: bounds memory at chunk x library-size similarities


@d.dedent
def rank_consistency(
    adata: AnnData,
    use_rep: str = IMAGE_EMBEDDING_KEY,
    gene_rep: str | None = None,
    layer: str | None = "counts",
    n_neighbors: int | None = 30,
    library_key: str | None = None,
    key_added: str = RANK_CONSISTENCY_KEY,
    copy: bool = False,
) -> AnnData | None:
    """Per-spot Spearman correlation between image-side and gene-side similarity orderings.

    The alignment measure of the RankByGene method, spot by spot: for an anchor spot, the
    candidates are its ``n_neighbors`` nearest spots on the gene side (or every other spot of its
    library); the gene side orders them by expression similarity and the image side by cosine
    similarity of ``obsm[use_rep]``. The score is the Spearman correlation of the two orderings:
    1 when the image embedding ranks the anchor's transcriptomic neighbours exactly as the
    transcriptome does, 0 when it is blind to them. Spots are only compared within their library.

    Parameters
    ----------
    adata
        AnnData with the image embedding in ``obsm[use_rep]``.
    use_rep
        ``obsm`` key of the image embedding.
    gene_rep
        ``obsm`` key of a gene-side representation (e.g. ``"X_rankbygene_gene"``), compared by
        cosine similarity. ``None``: the Pearson correlation of the log-normalised expression in
        ``layer``.
    %(layer)s
        Counts, for the gene side when ``gene_rep`` is ``None``.
    n_neighbors
        Candidates per anchor: its nearest gene-side neighbours (the method's local scale);
        ``None`` ranks every other spot of the library (its global scale).
    %(library_key)s
        Spots are only compared within their library.
    %(key_added)s
        In ``obs``.
    %(copy)s

    Returns
    -------
    ``None``, or the copy with ``copy=True``; ``obs[key_added]`` holds the scores (NaN where
    a spot has fewer than 2 candidates or a constant row).

    Examples
    --------
    >>> adata.obsm["X_rankbygene"] = model.get_image_representation(adata)
    >>> rbg.tl.rank_consistency(adata, library_key="library_id")
    >>> adata.obs["rank_consistency"].mean()
    """
    image = representation(adata, use_rep)
    gene = gene_side_rows(adata, gene_rep, layer)
    if n_neighbors is not None and n_neighbors < 2:
        raise ValueError(f"n_neighbors must be at least 2 (or None); got {n_neighbors}.")
    libraries = spot_libraries(adata, library_key, default="all")
    scores = np.full(adata.n_obs, np.nan)
    for library in pd.unique(libraries):
        rows = np.flatnonzero(libraries == library)
        scores[rows] = _consistency(image[rows], gene[rows], n_neighbors)
    adata = adata.copy() if copy else adata
    adata.obs[key_added] = scores
    logger.info("added obs[%r] (mean %.3f)", key_added, np.nanmean(scores))
    return adata if copy else None


def representation(adata: AnnData, key: str) -> np.ndarray:
    """The finite ``(n_obs, d)`` float64 array in ``adata.obsm[key]``.

    Raises
    ------
    KeyError
        ``key`` is not in ``adata.obsm``.
    ValueError
        The array is not 2-D or has NaN or infinite values.
    """
    if key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{key!r}] is missing (obsm keys: {list(adata.obsm)}); store the "
            "embedding first, e.g. adata.obsm['X_rankbygene'] = model.get_image_representation()."
        )
    values = np.asarray(adata.obsm[key], dtype=np.float64)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"adata.obsm[{key!r}] must be a finite (n_obs, d) array.")
    return values


def gene_side_rows(adata: AnnData, gene_rep: str | None, layer: str | None) -> np.ndarray:
    """Rows whose cosine similarity is the gene-side similarity.

    ``obsm[gene_rep]`` when given, else the log-normalised expression of ``layer`` (``None``:
    ``X``) centred per spot, whose cosine similarity is the Pearson correlation of profiles.
    """
    if gene_rep is not None:
        return representation(adata, gene_rep)
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} is missing (layers: {list(adata.layers)}).")
    counts = adata.X if layer is None else adata.layers[layer]
    expression = log_normalize(counts).astype(np.float64)
    # Pearson correlation of expression profiles = cosine of the centred rows
    return expression - expression.mean(axis=1, keepdims=True)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def candidate_similarities(
    image: np.ndarray, gene: np.ndarray, anchors: np.ndarray, n_neighbors: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Image- and gene-side similarities of each anchor to its candidates.

    The numpy counterpart of the candidates of :func:`rankbygene.losses.rank_agreement`.

    Parameters
    ----------
    image, gene
        Unit rows (:func:`unit_rows`) of the spots of one library, image and gene side.
    anchors
        Row indices of the anchors.
    n_neighbors
        Candidates per anchor: its nearest gene-side neighbours (clipped to the other spots);
        ``None``: every other spot.

    Returns
    -------
    ``(s_image, s_gene)``, each ``(len(anchors), k)``: the cosine similarities of each anchor
    to its ``k`` candidates (in no particular order, the same in both).
    """
    n = len(image)
    k = n - 1 if n_neighbors is None else min(n_neighbors, n - 1)
    s_gene = gene[anchors] @ gene.T
    s_image = image[anchors] @ image.T
    s_gene[np.arange(len(anchors)), anchors] = -np.inf  # never its own candidate
    if k < 1:
        empty = np.empty((len(anchors), 0))
        return empty, empty.copy()
    candidates = np.argpartition(-s_gene, k - 1, axis=1)[:, :k]
    return (
        np.take_along_axis(s_image, candidates, axis=1),
        np.take_along_axis(s_gene, candidates, axis=1),
    )


def _consistency(image: np.ndarray, gene: np.ndarray, n_neighbors: int | None) -> np.ndarray:
    n = len(image)
    out = np.full(n, np.nan)
    if n < 3:
        return out
    image, gene = unit_rows(image), unit_rows(gene)
    for start in range(0, n, _ROW_CHUNK):
        anchors = np.arange(start, min(start + _ROW_CHUNK, n))
        s_image, s_gene = candidate_similarities(image, gene, anchors, n_neighbors)
        # one Spearman per anchor: the columns of the transposes
        out[anchors] = spearman_per_gene(s_image.T, s_gene.T)
    return out
