"""Colour and texture statistics of each spot's patch: the baseline a learned encoder must beat."""

from __future__ import annotations

from typing import Literal

import numpy as np
from anndata import AnnData

from rankbygene._constants import PATCH_STATISTICS_KEY
from rankbygene._docs import d
from rankbygene._layout._keys import SPATIAL_KEY
from rankbygene._logging import logger
from rankbygene.data._patches import PatchExtractor
from rankbygene.data._statistics import PATCH_STATISTICS, patch_statistics_tensor

__all__ = ["PATCH_STATISTICS", "patch_statistics"]


@d.dedent
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
) -> AnnData | None:
    """Colour and texture statistics of each spot's patch, a baseline image representation.

    For each patch: RGB means and standard deviations, haematoxylin/eosin/DAB densities from
    colour deconvolution (means and standard deviations), saturation and brightness, grey-level
    quantiles, Sobel gradient and Laplacian strength (texture, sharpness), the fractions of
    background and of nuclear (haematoxylin-rich) pixels: :data:`PATCH_STATISTICS`, each patch
    on its own (:func:`~rankbygene.data.patch_statistics_tensor`). A ridge
    read-out on these is the first baseline a learned encoder must beat; use them as
    precomputed features (``setup_anndata(features_key=key_added)``) or with
    :class:`~rankbygene.tl.RidgePredictor`.

    Parameters
    ----------
    %(adata)s
    %(library_key)s
    spatial_key, image_key, patch_scale, patch_size
        Patch geometry, as :class:`~rankbygene.data.PatchExtractor`; use the model's
        ``patch_scale`` to compare with it on the same context.
    out_of_bounds
        Spots whose patch misses pixels (beyond the image, or NaN or infinite pixels): ``"pad"``
        them with white, with a warning counting them (the default, as for training), or
        ``"raise"`` an error counting them.
    batch_size
        Patches processed at once (memory: ``batch_size * patch_size**2 * 40`` bytes).
    %(key_added)s
        In ``obsm`` (the values) and ``uns`` (their names).
    %(copy)s

    Returns
    -------
    ``None``, or a copy of ``adata`` with ``copy=True``; either way with
    ``obsm[key_added]``, the ``(n_spots, 23)`` statistics, and ``uns[key_added]``, their
    names (``columns``) and ``patch_size``.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.datasets.synthetic(n_slides=1, n_spots=20)
    >>> rbg.tl.patch_statistics(adata, library_key="library_id")
    >>> adata.obsm["X_patch_statistics"].shape
    (20, 23)
    """
    import torch

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
            batch = np.stack([patches[i] for i in range(start, stop)])
            images = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
            out[start:stop] = patch_statistics_tensor(images).numpy()
    target = adata.copy() if copy else adata
    target.obsm[key_added] = out
    target.uns[key_added] = {"columns": list(PATCH_STATISTICS), "patch_size": patch_size}
    logger.info("added obsm[%r] and uns[%r]", key_added, key_added)
    return target if copy else None
