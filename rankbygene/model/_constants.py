"""Keys of the model's AnnData registry (``AnnDataManager`` fields), as scvi-tools' own."""

from __future__ import annotations

from typing import NamedTuple

from scvi import REGISTRY_KEYS as SCVI_REGISTRY_KEYS


class RegistryKeys(NamedTuple):
    """Registry keys of :meth:`~rankbygene.RankByGene.setup_anndata`'s fields.

    The model reads the ``obsm`` keys of the coordinates and features from these fields (for
    its ``image_settings``), not from the setup arguments.
    """

    #: The expression (counts, or log-normalised with ``is_log_normalized``): scvi-tools' key.
    X_KEY: str = SCVI_REGISTRY_KEYS.X_KEY
    #: The spot centres in full-resolution pixels (``spatial_key``).
    SPATIAL_KEY: str = "spatial"
    #: Precomputed image features (``features_key``); ``summary_stats["n_features"]`` is their size.
    FEATURES_KEY: str = "features"


#: The one definition of the registry keys.
REGISTRY_KEYS = RegistryKeys()
