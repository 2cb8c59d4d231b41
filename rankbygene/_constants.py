"""Keys the package reads and writes in an AnnData (see the data-layout page of the docs)."""

from __future__ import annotations

from typing import NamedTuple

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

# The scanpy/squidpy spatial layout: read everywhere; written by the readers, tile_slide and the
# synthetic data (each uns["spatial"] entry built by rankbygene._layout.spatial_entry).
SPATIAL_KEY = "spatial"
#: ``obs`` column of each spot's library in squidpy's layout; preferred when ``library_key`` is
#: left out and several columns name the libraries of ``uns["spatial"]``.
LIBRARY_ID_KEY = "library_id"
#: ``layers`` key of the raw counts that the readers keep beside ``X``.
COUNTS_LAYER_KEY = "counts"
#: ``obs`` columns: array position (squidpy's), whether under tissue, a tile's tissue fraction.
ARRAY_ROW_KEY = "array_row"
ARRAY_COL_KEY = "array_col"
IN_TISSUE_KEY = "in_tissue"
TISSUE_FRACTION_KEY = "tissue_fraction"
#: ``obs`` column of the patient of a HER2+ section (``datasets.her2st``).
PATIENT_KEY = "patient"
#: The three parts of a library's ``uns["spatial"]`` entry.
IMAGES_KEY = "images"
SCALEFACTORS_KEY = "scalefactors"
METADATA_KEY = "metadata"
#: Image keys: squidpy's thumbnails, and the lazy full-resolution image of a SpatialData element.
HIRES_IMAGE_KEY = "hires"
LOWRES_IMAGE_KEY = "lowres"
FULLRES_IMAGE_KEY = "fullres"
#: An image's scale factor (its pixels per full-resolution pixel) is under
#: ``f"{SCALEFACTOR_PREFIX}{image_key}{SCALEFACTOR_SUFFIX}"``, e.g. ``tissue_hires_scalef``.
SCALEFACTOR_PREFIX = "tissue_"
SCALEFACTOR_SUFFIX = "_scalef"
SCALEFACTOR_SPOT_DIAMETER = "spot_diameter_fullres"
#: Fiducial diameter of the synthetic data, as Space Ranger writes it.
SCALEFACTOR_FIDUCIAL_DIAMETER = "fiducial_diameter_fullres"
#: ``metadata`` keys. The full-resolution image file that patches are read from, lazily:
METADATA_SOURCE_IMAGE = "source_image_path"
#: An HDF5 file of precomputed patches (HEST-1k), used where there is no source image.
METADATA_PATCHES_PATH = "patches_path"
#: Microns per full-resolution pixel, and the assay.
METADATA_MPP = "mpp"
METADATA_TECHNOLOGY = "technology"
#: The function that wrote the entry (``tile_slide``, the synthetic data), and its seed.
METADATA_SOURCE = "source"
METADATA_SEED = "seed"
#: The files ``read_st`` read, and a HEST sample's own metadata (``read_hest``).
METADATA_COUNTS_PATH = "counts_path"
METADATA_SPOTS_PATH = "spots_path"
METADATA_HEST = "hest"
#: ``uns`` key of a SpatialData table's own attributes (``TableModel.ATTRS_KEY``: the elements it
#: annotates and its region and instance keys), kept or dropped by the SpatialData converters.
SPATIALDATA_ATTRS_KEY = "spatialdata_attrs"
#: The elements ``from_spatialdata`` read.
METADATA_SPATIALDATA_TABLE = "spatialdata_table"
METADATA_SPATIALDATA_SHAPES = "spatialdata_shapes"
METADATA_SPATIALDATA_IMAGE = "spatialdata_image"
#: A library of whole-slide tiles (``tile_slide``): the tile side in microns (what marks a
#: library as tiles) and in pixels, the grid's stride and the tissue thresholds used.
METADATA_TILE_SIZE_UM = "tile_size_um"
METADATA_TILE_SIZE_PX = "tile_size_px"
METADATA_STRIDE_PX = "stride_px"
#: Tiles of a LazySlide/wsidata tile table: the downsample of the pyramid level its tile spec
#: reads them from, so that the package reads the same pixels (not the coarsest level that
#: suffices for the encoder's input).
METADATA_READ_DOWNSAMPLE = "read_downsample"
METADATA_TISSUE_THRESHOLD = "tissue_threshold"
METADATA_SATURATION_THRESHOLD = "saturation_threshold"

# What setup_anndata takes for data in the wrong units.
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
#: Share of spots outside the image above which the coordinates (or the image's scale factor)
#: are taken for another unit: patches there would be padding, not tissue.
OUTSIDE_IMAGE_FRACTION = 0.5
#: Factors coordinates are commonly off by besides the images' scale factors: pixel positions of
#: a spot table divided by 10.
COMMON_COORDINATE_FACTORS = (10.0,)

# The layout check against the image (validate_layout): spots lie where the tissue is.
#: Long side in pixels of the thumbnail whose tissue mask and colours the spots are compared with.
LAYOUT_THUMBNAIL_SIDE = 512
#: Overlap (Dice) of the spots' footprint with the tissue mask, and leave-one-out R^2 of the
#: image's colours at the spots from expression: what coordinates corrected by a factor or a
#: swap must reach (either), and the gains over the coordinates as given that decide alone (in
#: these units, partial gains of both add up). Measured on the HER2+ sections (B4, C2-C4), 60
#: synthetic Visium slides and 53 Visium HD fields: for valid coordinates, no correction gained
#: more than 0.01 overlap; where one gained agreement (0.31 at most: HER2+ C4 with every gene,
#: 0.21 against -0.10), its overlap was 0.13 worse. Corrections of real errors gained 0.14 (swap,
#: C2 and C4) to 0.9 overlap, or 0.4-0.9 agreement on the synthetic slides.
MIN_TISSUE_OVERLAP = 0.5
TISSUE_OVERLAP_GAIN = 0.1
MIN_IMAGE_AGREEMENT = 0.4
IMAGE_AGREEMENT_GAIN = 0.3
#: A correction whose overlap is worse than that of the coordinates as given by more than this
#: is no finding, whatever its agreement.
TISSUE_OVERLAP_SLACK = 0.05
#: Share of the spots that must lie on the image for their agreement with it to count.
MIN_AGREEMENT_INSIDE = 0.9
#: Spots needed for the agreement, and spots sampled for it at most.
MIN_AGREEMENT_SPOTS = 30
MAX_AGREEMENT_SPOTS = 2000

# Square bins (Visium HD): Space Ranger's ``scalefactors`` keys of the bin side in microns and of
# the full-resolution image's microns per pixel, kept in uns["spatial"][library]["scalefactors"].
SCALEFACTOR_BIN_SIZE_UM = "bin_size_um"
SCALEFACTOR_MPP = "microns_per_pixel"
#: ``scalefactors`` key of the side of the bins summed into pseudo-spots (``pp.aggregate_bins``),
#: and ``obs`` column of how many were summed into each.
SCALEFACTOR_AGGREGATED_BIN_SIZE_UM = "aggregated_bin_size_um"
N_BINS_KEY = "n_bins"

# Patch resolution (PatchExtractor.check_resolution).
#: Patches of spots upsampled by more than this factor are logged as blurry; tiles of a whole
#: slide, whose size is chosen, are warned about as soon as they are upsampled at all. A spot's
#: diameter is fixed by the assay, and some upsampling of it is the norm (a 55 um Visium spot
#: spans 110 px at 0.5 um/px, below a 224 px encoder input).
MAX_SPOT_UPSAMPLING = 4.0

# Logging.
LOGGER_NAME = "rankbygene"
#: scvi-tools' logger: its INFO lines (e.g. "Generating sequential column names" at each setup,
#: "File model.pt already downloaded" at each load) show only at the package's verbosity.
SCVI_LOGGER_NAME = "scvi"
#: Seconds of work before a progress bar shows: shorter work shows none.
PROGRESS_DELAY_S = 2.0
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
#: the user's code: docrep's complaints about squidpy's docstrings, and tqdm's "IProgress not
#: found" when scvi-tools imports ``tqdm.auto`` in Jupyter without ipywidgets (the package's
#: own bars do without ipywidgets; tqdm raises no other warning on import).
QUIET_IMPORT_WARNINGS = ((SyntaxWarning, r"docrep(\.|$)"), (Warning, r"tqdm\.auto"))
#: (category, emitting module) of third-party warnings the command line and ``train()`` drop:
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
