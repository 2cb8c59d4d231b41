"""Keys of the scanpy/squidpy spatial layout: read everywhere, written by the readers.

``obsm["spatial"]``, ``obs`` columns of libraries and array positions, and each library's
``uns["spatial"]`` entry (images, scale factors, metadata), built by :func:`spatial_entry` for
the readers, ``tile_slide`` and the synthetic data. docs/data_layout.md describes them.
"""

from __future__ import annotations

SPATIAL_KEY = "spatial"
#: ``obs`` column of each spot's library in squidpy's layout; preferred when ``library_key`` is
#: left out and several columns name the libraries of ``uns["spatial"]``.
LIBRARY_ID_KEY = "library_id"
#: ``layers`` key of the raw counts that the readers keep beside ``X``.
COUNTS_LAYER_KEY = "counts"
#: ``obs`` columns: array position (squidpy's), whether under tissue.
ARRAY_ROW_KEY = "array_row"
ARRAY_COL_KEY = "array_col"
IN_TISSUE_KEY = "in_tissue"
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

# Square bins (Visium HD): Space Ranger's ``scalefactors`` keys of the bin side in microns and of
# the full-resolution image's microns per pixel, kept in uns["spatial"][library]["scalefactors"].
SCALEFACTOR_BIN_SIZE_UM = "bin_size_um"
SCALEFACTOR_MPP = "microns_per_pixel"
#: ``scalefactors`` key of the side of the bins summed into pseudo-spots (``pp.aggregate_bins``).
SCALEFACTOR_AGGREGATED_BIN_SIZE_UM = "aggregated_bin_size_um"
