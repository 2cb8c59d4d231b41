"""Tools: analyses of embeddings and predicted expression."""

from rankbygene.tl._metrics import log_normalize, pearson_per_gene, spearman_per_gene

__all__ = ["log_normalize", "pearson_per_gene", "spearman_per_gene"]
