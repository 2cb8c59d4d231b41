"""Keys the package reads and writes in an AnnData (see the data-layout page of the docs)."""

from __future__ import annotations

from typing import NamedTuple

# Written by the package, and only these.
IMAGE_EMBEDDING_KEY = "X_rankbygene"
GENE_EMBEDDING_KEY = "X_rankbygene_gene"
PREDICTED_LAYER_KEY = "rankbygene_predicted"
UNS_KEY = "rankbygene"

# Read from the scanpy/squidpy spatial layout.
SPATIAL_KEY = "spatial"
SCALEFACTOR_SPOT_DIAMETER = "spot_diameter_fullres"
METADATA_SOURCE_IMAGE = "source_image_path"
#: ``obs`` column of each spot's library in squidpy's layout; preferred when ``library_key`` is
#: left out and several columns name the libraries of ``uns["spatial"]``.
LIBRARY_ID_KEY = "library_id"

# Logging.
LOGGER_NAME = "rankbygene"
#: Lightning's advertisement lines start with this; its loggers that emit them.
LIGHTNING_TIP_PREFIX = "💡 Tip"
LIGHTNING_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
#: (category, emitting module) of third-party warnings raised on import that say nothing about
#: the user's code: docrep's complaints about squidpy's docstrings.
QUIET_IMPORT_WARNINGS = ((SyntaxWarning, r"docrep(\.|$)"),)
#: (category, emitting module) of third-party warnings the command line drops while it runs:
#: Lightning 2.6 calling an API that PyTorch deprecated.
QUIET_RUN_WARNINGS = ((FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),)


class BatchKeys(NamedTuple):
    """Keys of the per-spot tensors in a mini-batch (datasets produce them, the module reads)."""

    image: str = "image"
    image_weak: str = "image_weak"
    expression: str = "expression"
    features: str = "features"
    features_weak: str = "features_weak"
    index: str = "index"


#: The one definition of the mini-batch keys, as scvi-tools' ``REGISTRY_KEYS``.
BATCH_KEYS = BatchKeys()
