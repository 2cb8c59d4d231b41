"""Tools: evaluation of predicted expression and analyses of embeddings."""

from rankbygene.tl._evaluate import evaluate_expression, summarize_expression_scores
from rankbygene.tl._metrics import log_normalize, pearson_per_gene, spearman_per_gene

__all__ = [
    "evaluate_expression",
    "log_normalize",
    "pearson_per_gene",
    "spearman_per_gene",
    "summarize_expression_scores",
]
