"""The scanpy/squidpy spatial layout of an AnnData: the one place that reads and writes it.

- :mod:`~rankbygene._layout._sources`: where each library's pixels are (:func:`image_sources`),
  the spots' coordinates and each spot's library (:func:`spot_libraries`,
  :func:`resolve_library_key`), for every reader of patches and every function taking a
  ``library_key``;
- :mod:`~rankbygene._layout._checks`: the checks before any work (:func:`validate_layout`);
- :mod:`~rankbygene._layout._tissue`: a slide's thumbnail and its tissue mask
  (:func:`read_thumbnail`, :func:`tissue_mask`), for tiling and for the layout check;
- :mod:`~rankbygene._layout._entry`: the builder of ``uns["spatial"]`` entries and their
  thumbnails (:func:`spatial_entry`, :func:`thumbnails`), for the readers, ``tile_slide`` and
  the synthetic data.

The keys themselves are in :mod:`~rankbygene._layout._keys`. Pixels are read through
:mod:`rankbygene._image`, below this package; the slide readers of :mod:`rankbygene.io`, above
it, build their entries here (``tests/test_imports.py`` checks the direction).
"""

from rankbygene._layout._checks import validate_layout
from rankbygene._layout._entry import (
    image_scales,
    read_thumbnails,
    scaled_size,
    scalefactor_image,
    scalefactor_key,
    shrink,
    spatial_entry,
    thumbnails,
)
from rankbygene._layout._sources import (
    ImageSource,
    image_sources,
    resolve_library_key,
    spatial_coordinates,
    spot_libraries,
)
from rankbygene._layout._tissue import read_thumbnail, tissue_mask

__all__ = [
    "ImageSource",
    "image_scales",
    "image_sources",
    "read_thumbnail",
    "read_thumbnails",
    "resolve_library_key",
    "scaled_size",
    "scalefactor_image",
    "scalefactor_key",
    "shrink",
    "spatial_coordinates",
    "spatial_entry",
    "spot_libraries",
    "thumbnails",
    "tissue_mask",
    "validate_layout",
]
