"""Keys the package reads and writes in an AnnData (see the data-layout page of the docs)."""

from __future__ import annotations

from typing import NamedTuple

# Written by the package, and only these.
IMAGE_EMBEDDING_KEY = "X_rankbygene"
GENE_EMBEDDING_KEY = "X_rankbygene_gene"
PREDICTED_LAYER_KEY = "rankbygene_predicted"
UNS_KEY = "rankbygene"
#: Key in ``uns["rankbygene"]`` of an ``embed_slides`` file: the SHA-256 of its settings
#: fingerprint, slide stamp and tile arrays, checked before the file is taken as done.
SLIDE_CHECKSUM_KEY = "sha256"

# Read from the scanpy/squidpy spatial layout.
SPATIAL_KEY = "spatial"
SCALEFACTOR_SPOT_DIAMETER = "spot_diameter_fullres"
METADATA_SOURCE_IMAGE = "source_image_path"
#: ``obs`` column of each spot's library in squidpy's layout; preferred when ``library_key`` is
#: left out and several columns name the libraries of ``uns["spatial"]``.
LIBRARY_ID_KEY = "library_id"

# What setup_anndata takes for data in the wrong units.
#: Expression whose values are not all integers and all stay below this looks log-normalised
#: (log1p of counts normalised to 1e4 or 1e6 per spot stays below 10 or 14), not like counts.
LOG_NORMALIZED_MAX = 20.0
#: Spots closer to their nearest neighbour than this many spot diameters (median) would overlap:
#: their coordinates (or the diameter) are not in full-resolution pixels.
MIN_SPOT_SPACING = 0.5
#: Spacing in spot diameters that a correction of the coordinates must restore to be a likely
#: one (arrays of touching spots or bins have about 1, Visium 1.8, legacy ST 2).
PLAUSIBLE_SPOT_SPACING = (0.8, 4.0)
#: Centre-to-centre distance in spot diameters of the usual arrays (Visium 100 um / 55 um, legacy
#: ST 200 um / 100 um): the spacing a likely correction of the coordinates should restore.
TYPICAL_SPOT_SPACING = 1.8
#: Spots whose extent stays within this fraction of the full-resolution image on both axes lie
#: in its top-left corner, as coordinates in downscaled-image pixels do.
CORNER_FRACTION = 1 / 3
#: Share of spots outside the image above which spots that all fit once x and y are exchanged
#: are taken for swapped coordinates.
SWAPPED_OUTSIDE_FRACTION = 0.1
#: Factors coordinates are commonly off by besides the images' scale factors: pixel positions of
#: a spot table divided by 10.
COMMON_COORDINATE_FACTORS = (10.0,)

# Logging.
LOGGER_NAME = "rankbygene"
#: Lightning's advertisement lines start with this; its loggers that emit them.
LIGHTNING_TIP_PREFIX = "💡 Tip"
LIGHTNING_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
#: What scvi-tools' TrainRunner prints (to stdout, with the NameError class whatever the
#: exception) when training raises, interruptions included; the exception itself propagates.
SCVI_TRAINING_EXCEPTION_PRINT = "Exception raised during training."
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
