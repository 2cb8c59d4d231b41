"""Where the tissue is: a slide's thumbnail, read band by band, and its tissue mask.

One implementation for whole-slide tiling (:func:`~rankbygene.pp.tile_slide` keeps the tiles on
tissue) and for the layout check of :func:`~rankbygene._layout.validate_layout` (spots must lie
where the tissue is).
"""

from __future__ import annotations

import warnings

import numpy as np

from rankbygene._image import ImageReader, PILImage, resize

__all__ = ["read_thumbnail", "tissue_mask"]

_BAND_PIXELS = 1 << 25  # source pixels decoded per band of the thumbnail (~100 MB of RGB)


def read_thumbnail(reader: ImageReader, scale: float) -> np.ndarray:
    """The slide downscaled by ``scale`` (thumbnail pixels per full-resolution pixel).

    Read band by band from the coarsest pyramid level that suffices, so that at most about
    ``2**25`` source pixels are decoded at a time (JPEG/PNG files, which have no random access,
    are decoded by PIL's draft mode or whole).
    """
    height, width = reader.shape
    out_w = max(1, int(round(width * scale)))
    out_h = max(1, int(round(height * scale)))
    if isinstance(reader, PILImage):
        thumb, _ = reader.thumbnail(max(out_w, out_h))
        return resize(thumb, (out_w, out_h))
    level = reader.best_level(width / out_w)
    down = reader.level_downsamples[level]
    level_width = width / down
    source_rows_per_row = (height / out_h) / down
    rows_per_band = max(1, int(_BAND_PIXELS // max(1.0, level_width * source_rows_per_row)))
    thumb = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for r0 in range(0, out_h, rows_per_band):
        r1 = min(out_h, r0 + rows_per_band)
        y0 = r0 * height / out_h
        y1 = r1 * height / out_h
        thumb[r0:r1] = reader.read_region(0, y0, width, y1 - y0, out_size=(out_w, r1 - r0))
    return thumb


def tissue_mask(
    thumbnail: np.ndarray,
    min_saturation: float = 0.05,
    min_area: float = 1e-4,
) -> tuple[np.ndarray, float]:
    """Tissue pixels of an RGB thumbnail: Otsu's threshold on saturation, cleaned up.

    Parameters
    ----------
    thumbnail
        ``(H, W, 3)`` uint8 image.
    min_saturation
        Lowest threshold (Otsu's is raised to it), in [0, 1].
    min_area
        Specks and holes smaller than this fraction of the thumbnail are removed or filled.

    Returns
    -------
    Boolean ``(H, W)`` mask and the saturation threshold used.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene._layout import tissue_mask
    >>> image = np.full((64, 64, 3), 240, np.uint8)
    >>> image[16:48, 16:48] = (200, 120, 180)  # a pink square on glass
    >>> mask, threshold = tissue_mask(image)
    >>> bool(mask[16:48, 16:48].mean() > 0.99), bool(mask[:16].any())
    (True, False)
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    rgb = np.asarray(thumbnail)
    high = rgb.max(axis=-1).astype(np.float32)
    low = rgb.min(axis=-1).astype(np.float32)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    # CLAM blurs the saturation before thresholding: speckle noise on glass does not pass.
    saturation = ndimage.median_filter(saturation, size=3)
    if float(saturation.max() - saturation.min()) > 1e-6:
        threshold = float(threshold_otsu(saturation))
    else:
        threshold = float(saturation.max())
    threshold = max(threshold, float(min_saturation))
    mask = saturation > threshold
    min_size = max(1, int(round(min_area * mask.size)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns on masks with a single label
        mask = remove_small_objects(mask, min_size)
        mask = remove_small_holes(mask, min_size)
    return mask, threshold
