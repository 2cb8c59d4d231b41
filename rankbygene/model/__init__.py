"""The RankByGene model (scvi-tools API), its module, training plan, encoders and losses."""

from rankbygene.model._data import inference_loader_settings, training_loader_settings
from rankbygene.model._encoders import Backbone, ProjectionHead, create_backbone
from rankbygene.model._feature_extractor import FeatureExtractor
from rankbygene.model._model import RankByGene
from rankbygene.model._module import RankByGeneModule
from rankbygene.model._packaged_weights import (
    PACKAGED_WEIGHTS,
    PackagedWeights,
    load_packaged_weights,
    packaged_weights_path,
)
from rankbygene.model._training_plan import RankByGeneTrainingPlan

__all__ = [
    "PACKAGED_WEIGHTS",
    "Backbone",
    "FeatureExtractor",
    "PackagedWeights",
    "ProjectionHead",
    "RankByGene",
    "RankByGeneModule",
    "RankByGeneTrainingPlan",
    "create_backbone",
    "inference_loader_settings",
    "load_packaged_weights",
    "packaged_weights_path",
    "training_loader_settings",
]
