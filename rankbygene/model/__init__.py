"""The RankByGene model (scvi-tools API), its module, training plan, encoders and losses."""

from rankbygene.model._encoders import Backbone, ProjectionHead, create_backbone
from rankbygene.model._model import RankByGene
from rankbygene.model._module import RankByGeneModule
from rankbygene.model._training_plan import RankByGeneTrainingPlan

__all__ = [
    "Backbone",
    "ProjectionHead",
    "RankByGene",
    "RankByGeneModule",
    "RankByGeneTrainingPlan",
    "create_backbone",
]
