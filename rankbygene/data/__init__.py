"""Patch pipeline: spot patches, caches, augmentations, a torch Dataset, settings, statistics."""

from rankbygene.data._constants import BATCH_KEYS, BatchKeys
from rankbygene.data._dataset import SpotPatchDataset
from rankbygene.data._device_augmentation import DeviceAugmentation, random_dihedral
from rankbygene.data._patches import PatchExtractor
from rankbygene.data._settings import ImageSettings
from rankbygene.data._statistics import PatchStatistics, patch_statistics_tensor
from rankbygene.data._transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchTransform,
    RandomHEDJitter,
    RandomRot90,
    eval_transform,
    normalize_batch,
    stain_transform,
    strong_transform,
    weak_transform,
)

__all__ = [
    "BATCH_KEYS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchKeys",
    "DeviceAugmentation",
    "ImageSettings",
    "PatchExtractor",
    "PatchStatistics",
    "PatchTransform",
    "RandomHEDJitter",
    "RandomRot90",
    "SpotPatchDataset",
    "eval_transform",
    "normalize_batch",
    "patch_statistics_tensor",
    "random_dihedral",
    "stain_transform",
    "strong_transform",
    "weak_transform",
]
