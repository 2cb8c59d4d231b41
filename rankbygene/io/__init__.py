"""Readers: spatial transcriptomics slides into AnnData (scanpy/squidpy layout), images lazily.

The slide readers live here; the image readers (:class:`ImageReader` and its kinds,
:func:`open_image`, :func:`write_pyramidal_tiff`) live in :mod:`rankbygene._image`, below the
spatial layout that the slide readers build, and are re-exported here.

Images are also written here: :func:`write_pyramidal_tiff` writes an array as the tiled
pyramidal TIFF that whole-slide readers (and :func:`rankbygene.pp.tile_slide`) expect.

Every slide enters the package in the scanpy/squidpy spatial layout: raw counts in ``X``
(and ``layers["counts"]``), spot centres in full-resolution pixels in ``obsm["spatial"]``, and
``uns["spatial"][library_id]`` with thumbnails, scale factors (``spot_diameter_fullres``
included) and, where there is one, ``metadata["source_image_path"]``, the full-resolution image
that patches are read from lazily (:func:`open_image`).

**Visium** goes through squidpy (or scanpy), which already writes this layout. Pass
``source_image_path``, the full-resolution H&E, so that patches come from it rather than from
the ``hires`` thumbnail, and keep the raw counts in a layer::

    import squidpy as sq

    adata = sq.read.visium("sample/", source_image_path="sample/image.tif")
    adata.var_names_make_unique()
    adata.layers["counts"] = adata.X.copy()

With the ``spatialdata`` extra, a Space Ranger folder also comes through spatialdata-io, with the
same spots and patches; Visium HD folders (positions in parquet, which squidpy does not read)
come this way only::

    import spatialdata_io

    sdata = spatialdata_io.visium_hd("run/outs", fullres_image_file="run/image.tif")
    bins = from_spatialdata(sdata, table_key="square_008um")  # library: the section

**HEST-1k** samples are read with :func:`read_hest` from the files of one sample id; the
whole-slide image is read lazily from its pyramid, the precomputed patches are checked
against the spots and recorded::

    from rankbygene.io import read_hest

    adata = read_hest(
        "hest_data/st/TENX95.h5ad",
        wsi="hest_data/wsis/TENX95.tif",
        patches="hest_data/patches/TENX95.h5",
        metadata="hest_data/metadata/TENX95.json",
    )

**Legacy Spatial Transcriptomics** (ST v1, e.g. the HER2+ breast cancer set) is read with
:func:`read_st` from its count table, spot-selection table and H&E image;
:func:`rankbygene.datasets.her2st` does this for any section of the public HER2+ data::

    from rankbygene.io import read_st

    adata = read_st(
        "her2st/ST-cnts/C2.tsv.gz",
        "her2st/ST-spotfiles/C2_selection.tsv",
        "her2st/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    )

**SpatialData** objects (e.g. from ``spatialdata-io``) are read with :func:`from_spatialdata`
from a table and the circles it annotates, the H&E image element kept lazy; results go back
with :func:`to_spatialdata`::

    from rankbygene.io import from_spatialdata, to_spatialdata

    adata = from_spatialdata(sdata, table_key="table")
    ...
    to_spatialdata(adata, sdata)  # obsm, layers and uns["rankbygene"] into sdata["table"]

**WSIData** slides (``wsidata``/LazySlide, the ``wsi`` extra) are read through their own reader
by :class:`WSIDataImage`; :func:`rankbygene.pp.tile_slide` takes a ``WSIData`` and its tile
tables, and :class:`rankbygene.model.FeatureExtractor` embeds its tiles with
``lazyslide.tl.feature_extraction``.
"""

from rankbygene._image import (
    ArrayImage,
    ImageReader,
    OpenSlideImage,
    PILImage,
    TiffImage,
    WSIDataImage,
    open_image,
    write_pyramidal_tiff,
)
from rankbygene.io._hest import read_hest
from rankbygene.io._spatialdata_read import from_spatialdata
from rankbygene.io._spatialdata_write import to_spatialdata
from rankbygene.io._st import infer_spot_diameter, read_st

__all__ = [
    "ArrayImage",
    "ImageReader",
    "OpenSlideImage",
    "PILImage",
    "TiffImage",
    "WSIDataImage",
    "from_spatialdata",
    "infer_spot_diameter",
    "open_image",
    "read_hest",
    "read_st",
    "to_spatialdata",
    "write_pyramidal_tiff",
]
