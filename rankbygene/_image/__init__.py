"""Images read lazily by region, and written as pyramids: the layer below the spatial layout.

- :mod:`~rankbygene._image._base`: the reader interface (:class:`ImageReader`) and the pixel
  conversions every reader shares (:func:`as_rgb_uint8`, :func:`resize`);
- :mod:`~rankbygene._image._tiff`: TIFF/SVS pyramids, decoded chunk by chunk with a cache;
- :mod:`~rankbygene._image._readers`: in-memory arrays, JPEG/PNG, OpenSlide, and
  :func:`open_image`, which picks the reader of a source;
- :mod:`~rankbygene._image._wsidata`: slides opened by ``wsidata`` (LazySlide);
- :mod:`~rankbygene._image._patch_file`: HDF5 files of precomputed patches (HEST-1k);
- :mod:`~rankbygene._image._pyramid`: writing a tiled pyramidal TIFF;
- :mod:`~rankbygene._image._errors`: decoder errors re-raised naming the file.

This package imports nothing else of rankbygene but its logger: :mod:`rankbygene._layout`
builds on it, and :mod:`rankbygene.io` re-exports its public readers.
"""

from rankbygene._image._base import BACKGROUND, ImageReader, as_rgb_uint8, is_lazy_array, resize
from rankbygene._image._errors import reading_file
from rankbygene._image._patch_file import (
    PATCH_BARCODE_KEYS,
    PATCH_COORDS_KEY,
    PATCH_IMAGE_KEYS,
    PatchFile,
)
from rankbygene._image._pyramid import write_pyramidal_tiff
from rankbygene._image._readers import ArrayImage, OpenSlideImage, PILImage, open_image
from rankbygene._image._tiff import ChunkCacheInfo, TiffImage
from rankbygene._image._wsidata import (
    TileBoxes,
    WSIDataImage,
    is_wsidata,
    require_wsidata,
    table_boxes,
)

__all__ = [
    "BACKGROUND",
    "PATCH_BARCODE_KEYS",
    "PATCH_COORDS_KEY",
    "PATCH_IMAGE_KEYS",
    "ArrayImage",
    "ChunkCacheInfo",
    "ImageReader",
    "OpenSlideImage",
    "PILImage",
    "PatchFile",
    "TiffImage",
    "TileBoxes",
    "WSIDataImage",
    "as_rgb_uint8",
    "is_lazy_array",
    "is_wsidata",
    "open_image",
    "reading_file",
    "require_wsidata",
    "resize",
    "table_boxes",
    "write_pyramidal_tiff",
]
