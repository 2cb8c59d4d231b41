"""Tools: evaluation of predicted expression and analyses of embeddings."""

from rankbygene._metrics import log_normalize, pearson_per_gene, spearman_per_gene
from rankbygene.model._readout import KnnPredictor, RidgePredictor, with_neighbor_context
from rankbygene.tl._cv import CrossValidationResult
from rankbygene.tl._embed import embed_slides
from rankbygene.tl._evaluate import evaluate_expression, summarize_expression_scores
from rankbygene.tl._mil import GatedAttentionMIL, SlideClassifier, fit_slide_classifier
from rankbygene.tl._patch_statistics import PATCH_STATISTICS, patch_statistics
from rankbygene.tl._rank_consistency import rank_consistency
from rankbygene.tl._slide import slide_features
from rankbygene.tl._survival import CoxModel, fit_survival

__all__ = [
    "PATCH_STATISTICS",
    "CoxModel",
    "CrossValidationResult",
    "GatedAttentionMIL",
    "KnnPredictor",
    "RidgePredictor",
    "SlideClassifier",
    "embed_slides",
    "evaluate_expression",
    "fit_slide_classifier",
    "fit_survival",
    "log_normalize",
    "patch_statistics",
    "pearson_per_gene",
    "rank_consistency",
    "slide_features",
    "spearman_per_gene",
    "summarize_expression_scores",
    "with_neighbor_context",
]
