"""The losses of the method, as small functions (usable outside the model)."""

from rankbygene.model._ema import cosine_momentum, make_teacher, update_ema
from rankbygene.model._losses import (
    cosine_similarity_matrix,
    distillation_loss,
    expression_similarity,
    gather_with_grad,
    info_nce,
    rank_agreement,
    ranking_consistency_loss,
)

__all__ = [
    "cosine_momentum",
    "cosine_similarity_matrix",
    "distillation_loss",
    "expression_similarity",
    "gather_with_grad",
    "info_nce",
    "make_teacher",
    "rank_agreement",
    "ranking_consistency_loss",
    "update_ema",
]
