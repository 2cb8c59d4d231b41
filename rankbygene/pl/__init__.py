"""Plots: training curves, expression maps on the tissue, per-gene scores, embeddings and the
ranking consistency of the method; matplotlib, with scanpy's ``show``/``save`` conventions."""

from rankbygene.pl._embedding import embedding
from rankbygene.pl._expression import expression_maps, gene_scores
from rankbygene.pl._history import history
from rankbygene.pl._rank import rank_consistency

__all__ = ["embedding", "expression_maps", "gene_scores", "history", "rank_consistency"]
