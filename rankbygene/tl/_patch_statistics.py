"""Colour and texture statistics of each spot's patch: the baseline a learned encoder must beat."""

from __future__ import annotations

from typing import Literal

import numpy as np
from anndata import AnnData

from rankbygene._constants import PATCH_STATISTICS_KEY, SPATIAL_KEY
from rankbygene._logging import logger

__all__ = ["PATCH_STATISTICS", "patch_statistics"]

#: Names of the columns :func:`patch_statistics` computes, in order.
PATCH_STATISTICS: tuple[str, ...] = (
    *(f"{c}_mean" for c in "RGB"),
    *(f"{c}_sd" for c in "RGB"),
    *(f"{c}_mean" for c in ("hematoxylin", "eosin", "dab")),
    *(f"{c}_sd" for c in ("hematoxylin", "eosin", "dab")),
    "saturation_mean",
    "saturation_sd",
    "brightness_mean",
    *(f"grey_q{q}" for q in (10, 50, 90)),
    "gradient_mean",
    "gradient_sd",
    "laplacian_mean",
    "background_fraction",
    "nuclear_fraction",
)


#: Haematoxylin optical density above which a pixel counts as nuclear: about the 85th percentile
#: of pixels in HER2+ ST sections and in the synthetic tissue (nuclei cover 10-20% of tissue).
_NUCLEAR_HAEMATOXYLIN = 0.08


def _statistics(patches: np.ndarray) -> np.ndarray:
    """``(n, h, w, 3)`` uint8 patches -> ``(n, len(PATCH_STATISTICS))`` float32."""
    from scipy import ndimage
    from skimage.color import rgb2hed

    rgb = patches.astype(np.float32) / 255.0
    n = len(rgb)
    flat = rgb.reshape(n, -1, 3)
    hed = rgb2hed(rgb.reshape(-1, rgb.shape[2], 3)).reshape(n, -1, 3)  # colour deconvolution
    top, bottom = flat.max(axis=2), flat.min(axis=2)
    saturation = np.where(top > 0, (top - bottom) / np.maximum(top, 1e-6), 0.0)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gradient = np.hypot(ndimage.sobel(grey, axis=1), ndimage.sobel(grey, axis=2)).reshape(n, -1)
    laplacian = np.abs(ndimage.laplace(grey, mode="nearest")).reshape(n, -1)
    grey = grey.reshape(n, -1)
    nuclear = hed[..., 0] > _NUCLEAR_HAEMATOXYLIN
    return np.column_stack(
        [
            flat.mean(axis=1),
            flat.std(axis=1),
            hed.mean(axis=1),
            hed.std(axis=1),
            saturation.mean(axis=1),
            saturation.std(axis=1),
            top.mean(axis=1),
            np.quantile(grey, [0.1, 0.5, 0.9], axis=1).T,
            gradient.mean(axis=1),
            gradient.std(axis=1),
            laplacian.mean(axis=1),
            (grey > 0.86).mean(axis=1),
            nuclear.mean(axis=1),
        ]
    ).astype(np.float32)


def patch_statistics(
    adata: AnnData,
    library_key: str | None = None,
    spatial_key: str = SPATIAL_KEY,
    image_key: str | None = None,
    patch_scale: float = 1.0,
    patch_size: int = 64,
    out_of_bounds: Literal["raise", "pad"] = "pad",
    batch_size: int = 256,
    key_added: str = PATCH_STATISTICS_KEY,
    copy: bool = False,
) -> AnnData | np.ndarray | None:
    """Colour and texture statistics of each spot's patch, a baseline image representation.

    For each patch: RGB means and standard deviations, haematoxylin/eosin/DAB densities from
    colour deconvolution (means and standard deviations), saturation and brightness, grey-level
    quantiles, Sobel gradient and Laplacian strength (texture, sharpness), the fractions of
    background and of nuclear (haematoxylin-rich) pixels: :data:`PATCH_STATISTICS`. A ridge
    read-out on these is the first baseline a learned encoder must beat; use them as
    precomputed features (``setup_anndata(features_key=key_added)``) or with
    :class:`~rankbygene.tl.RidgePredictor`.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy spatial layout.
    library_key, spatial_key, image_key, patch_scale, patch_size, out_of_bounds
        Patch geometry, as :class:`~rankbygene.data.PatchExtractor`; use the model's
        ``patch_scale`` to compare with it on the same context.
    batch_size
        Patches processed at once (memory: ``batch_size * patch_size**2 * 40`` bytes).
    key_added
        ``obsm`` key of the ``(n_spots, 23)`` result.
    copy
        Return the array instead of writing it.

    Returns
    -------
    The array with ``copy=True``, else ``None`` (written to ``adata.obsm[key_added]``; the
    column names in ``adata.uns[key_added]``).

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.datasets.synthetic(n_slides=1, n_spots=20)
    >>> rbg.tl.patch_statistics(adata, library_key="library_id")
    >>> adata.obsm["X_patch_statistics"].shape
    (20, 23)
    """
    from rankbygene.data import PatchExtractor

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    patches = PatchExtractor(
        adata,
        library_key=library_key,
        spatial_key=spatial_key,
        image_key=image_key,
        patch_scale=patch_scale,
        patch_size=patch_size,
        out_of_bounds=out_of_bounds,
    )
    out = np.empty((adata.n_obs, len(PATCH_STATISTICS)), dtype=np.float32)
    with patches:
        for start in range(0, adata.n_obs, batch_size):
            stop = min(start + batch_size, adata.n_obs)
            out[start:stop] = _statistics(np.stack([patches[i] for i in range(start, stop)]))
    if copy:
        return out
    adata.obsm[key_added] = out
    adata.uns[key_added] = {"columns": list(PATCH_STATISTICS), "patch_size": patch_size}
    logger.info("added obsm[%r] and uns[%r]", key_added, key_added)
    return None
