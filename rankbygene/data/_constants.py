"""Keys of the per-spot tensors in a mini-batch: the datasets produce them, the module reads."""

from __future__ import annotations

from typing import NamedTuple


class BatchKeys(NamedTuple):
    """Keys of the per-spot tensors in a mini-batch (datasets produce them, the module reads)."""

    image: str = "image"
    image_weak: str = "image_weak"
    expression: str = "expression"
    features: str = "features"
    features_weak: str = "features_weak"
    index: str = "index"  # type: ignore[assignment]  # shadows tuple.index, a public name


#: The one definition of the mini-batch keys, as scvi-tools' ``REGISTRY_KEYS``.
BATCH_KEYS = BatchKeys()
