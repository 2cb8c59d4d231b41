"""Plots: training curves, expression maps on the tissue, per-gene scores, embeddings, the
method's ranking consistency and survival curves; matplotlib, with scanpy's ``show``/``save``."""

from rankbygene.pl._embedding import embedding
from rankbygene.pl._expression import expression_maps, gene_scores
from rankbygene.pl._history import history
from rankbygene.pl._rank import rank_consistency
from rankbygene.pl._survival import km_curves

__all__ = [
    "embedding",
    "expression_maps",
    "gene_scores",
    "history",
    "km_curves",
    "rank_consistency",
]
