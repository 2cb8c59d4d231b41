"""A library's ``uns["spatial"]`` entry: the one builder of entries and their thumbnails.

Every reader (``io.read_st``, ``io.read_hest``, ``io.from_spatialdata``), ``pp.tile_slide`` and
the synthetic data build their entries here, so that images, scale factors and metadata are
named and computed one way. Nothing of :mod:`rankbygene.io` is imported at run time: the readers
there import this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from rankbygene._image import ImageReader
from rankbygene._layout._keys import (
    HIRES_IMAGE_KEY,
    IMAGES_KEY,
    LOWRES_IMAGE_KEY,
    METADATA_KEY,
    SCALEFACTOR_PREFIX,
    SCALEFACTOR_SPOT_DIAMETER,
    SCALEFACTOR_SUFFIX,
    SCALEFACTORS_KEY,
)

__all__ = [
    "image_scales",
    "read_thumbnails",
    "scaled_size",
    "scalefactor_image",
    "scalefactor_key",
    "shrink",
    "spatial_entry",
    "thumbnails",
]

#: An image with its scale factor (image pixels per full-resolution pixel).
ScaledImage = tuple[np.ndarray, float]


def scalefactor_key(image_key: str) -> str:
    """The ``scalefactors`` key of an image's scale factor.

    Examples
    --------
    >>> scalefactor_key("hires")
    'tissue_hires_scalef'
    """
    return f"{SCALEFACTOR_PREFIX}{image_key}{SCALEFACTOR_SUFFIX}"


def scalefactor_image(key: str) -> str | None:
    """The image a ``scalefactors`` key is the scale factor of; ``None`` for other keys.

    Examples
    --------
    >>> scalefactor_image("tissue_lowres_scalef"), scalefactor_image("spot_diameter_fullres")
    ('lowres', None)
    """
    key = str(key)
    if key.startswith(SCALEFACTOR_PREFIX) and key.endswith(SCALEFACTOR_SUFFIX):
        return key[len(SCALEFACTOR_PREFIX) : -len(SCALEFACTOR_SUFFIX)] or None
    return None


def image_scales(entry: Mapping[str, Any]) -> dict[str, float]:
    """Scale factor of each image of an entry that has a finite, positive one.

    Examples
    --------
    >>> entry = {"images": {"hires": None, "lowres": None},
    ...          "scalefactors": {"tissue_hires_scalef": 0.5}}
    >>> image_scales(entry)
    {'hires': 0.5}
    """
    images = entry.get(IMAGES_KEY) or {}
    scalefactors: dict[str, Any] = entry.get(SCALEFACTORS_KEY) or {}
    scales = {}
    for key in images:
        try:
            scale = float(scalefactors[scalefactor_key(key)])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(scale) and scale > 0:
            scales[key] = scale
    return scales


def spatial_entry(
    images: Mapping[str, ScaledImage],
    spot_diameter: float | None = None,
    metadata: Mapping[str, Any] | None = None,
    scalefactors: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """A library's ``uns["spatial"]`` entry, as squidpy reads it.

    Parameters
    ----------
    images
        Image key (``"hires"``, ``"lowres"``, ...) to the image and its scale factor.
    spot_diameter
        ``spot_diameter_fullres``, in full-resolution pixels; left out when ``None``.
    metadata
        The entry's ``metadata``.
    scalefactors
        Further ``scalefactors`` entries, after the images' and the spot diameter.

    Returns
    -------
    ``{"images": ..., "scalefactors": {"tissue_<image>_scalef": ..., "spot_diameter_fullres":
    ..., ...}, "metadata": ...}``.

    Examples
    --------
    >>> import numpy as np
    >>> entry = spatial_entry({"hires": (np.zeros((4, 4, 3), np.uint8), 0.5)}, 20.0)
    >>> entry["scalefactors"]
    {'tissue_hires_scalef': 0.5, 'spot_diameter_fullres': 20.0}
    """
    factors = {scalefactor_key(key): float(scale) for key, (_, scale) in images.items()}
    if spot_diameter is not None:
        factors[SCALEFACTOR_SPOT_DIAMETER] = float(spot_diameter)
    factors.update(scalefactors or {})
    return {
        IMAGES_KEY: {key: image for key, (image, _) in images.items()},
        SCALEFACTORS_KEY: factors,
        METADATA_KEY: dict(metadata or {}),
    }


def scaled_size(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(width, height)`` of an image of ``shape`` ``(height, width)`` scaled by ``scale``."""
    return max(1, int(round(shape[1] * scale))), max(1, int(round(shape[0] * scale)))


def shrink(
    image: np.ndarray,
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BOX,
) -> np.ndarray:
    """``image`` resized down to ``size`` ``(width, height)``; as it is when it already fits."""
    if image.shape[1] <= size[0] and image.shape[0] <= size[1]:
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(image).resize(size, resample))


def thumbnails(
    hires: np.ndarray,
    hires_scale: float,
    lowres_max_side: int,
    shape: tuple[int, int] | None = None,
    resample: Image.Resampling = Image.Resampling.BOX,
    along_long_side: bool = False,
) -> dict[str, ScaledImage]:
    """``hires`` and a ``lowres`` image shrunk from it, each with its scale factor.

    Parameters
    ----------
    hires
        The ``hires`` image.
    hires_scale
        Its scale factor.
    lowres_max_side
        Long side of ``lowres`` in pixels of the reference image (at most its own).
    shape
        ``(height, width)`` of the full-resolution image, the reference of ``lowres_max_side``;
        by default ``hires`` itself is (at ``hires_scale``).
    resample
        PIL filter shrinking ``hires``.
    along_long_side
        Give ``lowres`` the ratio of its long side to the reference's (Space Ranger's
        ``max_side / long side``) as scale factor rather than the ratio of the widths.

    Returns
    -------
    ``{"hires": (hires, hires_scale), "lowres": (lowres, lowres_scale)}``, C-contiguous, the
    ``lowres`` image never a view of ``hires``.

    Examples
    --------
    >>> import numpy as np
    >>> images = thumbnails(np.zeros((100, 200, 3), np.uint8), 0.5, 50)
    >>> images["lowres"][0].shape, images["lowres"][1]
    ((25, 50, 3), 0.125)
    """
    height, width = hires.shape[:2] if shape is None else shape
    reference_scale = hires_scale if shape is None else 1.0
    factor = min(1.0, lowres_max_side / max(height, width))
    lowres = shrink(hires, scaled_size((height, width), factor), resample)
    if lowres is hires:
        lowres = lowres.copy()  # an entry's images are edited independently
    if along_long_side:
        lowres_scale = reference_scale * max(lowres.shape[:2]) / max(height, width)
    else:
        lowres_scale = reference_scale * lowres.shape[1] / width
    return {
        HIRES_IMAGE_KEY: (np.ascontiguousarray(hires), float(hires_scale)),
        LOWRES_IMAGE_KEY: (lowres, float(lowres_scale)),
    }


def read_thumbnails(
    reader: ImageReader, hires_max_side: int, lowres_max_side: int
) -> dict[str, ScaledImage]:
    """``hires`` and ``lowres`` thumbnails of an image file, decoding it once where possible.

    ``lowres`` is shrunk from ``hires`` unless it would be the sharper of the two; its scale
    factor is Space Ranger's, ``lowres_max_side`` over the image's long side.

    Examples
    --------
    >>> from rankbygene.io import open_image
    >>> images = read_thumbnails(open_image("slide.tif"), 2000, 600)  # doctest: +SKIP
    """
    hires, hires_scale = reader.thumbnail(hires_max_side)
    height, width = reader.shape
    if min(1.0, lowres_max_side / max(height, width)) > hires_scale:
        lowres, lowres_scale = reader.thumbnail(lowres_max_side)
        return {
            HIRES_IMAGE_KEY: (np.ascontiguousarray(hires), float(hires_scale)),
            LOWRES_IMAGE_KEY: (np.ascontiguousarray(lowres), float(lowres_scale)),
        }
    return thumbnails(
        hires,
        hires_scale,
        lowres_max_side,
        shape=(height, width),
        resample=Image.Resampling.BILINEAR,
        along_long_side=True,
    )
