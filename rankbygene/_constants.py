"""Keys the package writes into a user's AnnData (see the data-layout page of the docs).

The layout's own keys are in :mod:`rankbygene._layout._keys`, the registry keys in
:mod:`rankbygene.model._constants`, the mini-batch keys in :mod:`rankbygene.data._constants`.
"""

from __future__ import annotations

# Written by the package into a user's AnnData (docs/data_layout.md lists each; a test checks).
IMAGE_EMBEDDING_KEY = "X_rankbygene"
GENE_EMBEDDING_KEY = "X_rankbygene_gene"
PREDICTED_LAYER_KEY = "rankbygene_predicted"
UNS_KEY = "rankbygene"
#: ``layers`` key of the log-normalised expression of ``pp.normalize``.
LOGNORM_LAYER_KEY = "lognorm"
#: Appended to the layer's name by ``pp.smooth_expression`` (``"lognorm_smoothed"``); the layer
#: of smoothed ``X`` is ``"smoothed"`` (no ``X_`` prefix: scanpy keeps that for ``obsm``).
SMOOTHED_LAYER_SUFFIX = "_smoothed"
SMOOTHED_LAYER_KEY = "smoothed"
#: ``var`` column of ``pp.select_genes``: whether a gene is in the panel.
PANEL_KEY = "rankbygene_panel"
#: ``obs`` column of ``tl.rank_consistency``.
RANK_CONSISTENCY_KEY = "rank_consistency"
#: ``obsm`` (values) and ``uns`` (their names) key of ``tl.patch_statistics``.
PATCH_STATISTICS_KEY = "X_patch_statistics"
#: Key in ``uns["rankbygene"]`` of an ``embed_slides`` file: the SHA-256 of its settings
#: fingerprint, slide stamp and tile arrays, checked before the file is taken as done.
SLIDE_CHECKSUM_KEY = "sha256"
#: ``obs`` column of a tile's tissue fraction (``pp.tile_slide``).
TISSUE_FRACTION_KEY = "tissue_fraction"
#: ``obs`` column of the patient of a HER2+ section (``datasets.her2st``).
PATIENT_KEY = "patient"
#: ``obs`` column of how many bins were summed into each pseudo-spot (``pp.aggregate_bins``).
N_BINS_KEY = "n_bins"
