"""Where a model's spot images (or their features) are and how its patches are cut and scaled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from anndata import AnnData

from rankbygene._layout import resolve_library_key
from rankbygene._layout._keys import SPATIAL_KEY

__all__ = ["ImageSettings"]


@dataclass(frozen=True)
class ImageSettings:
    """The image side of a model: the AnnData keys it reads and the patches its encoder takes.

    A model hands this record to the data layer (:meth:`PatchExtractor.from_settings`, its
    loaders) instead of itself, so that the data layer needs nothing else of the model.

    Parameters
    ----------
    spatial_key
        ``obsm`` key of the spot centres in full-resolution pixels.
    image_key
        In-memory image of each library to read (e.g. ``"hires"``); ``None``: the source file,
        else the sharpest image.
    library_key
        ``obs`` column naming each spot's library, used where an AnnData has it.
    patch_scale
        Patch side in spot diameters.
    patch_size
        Side in pixels of the patches (the encoder's input size).
    mean, std
        RGB normalisation of the encoder's input; ``None``: ImageNet's.
    features_key
        ``obsm`` key of precomputed image features that replace the patches; ``None``: patches.

    Examples
    --------
    >>> from rankbygene.data import ImageSettings
    >>> settings = ImageSettings(library_key="library_id", patch_scale=1.5, patch_size=64)
    >>> settings.patch_size, settings.uses_features
    (64, False)
    """

    spatial_key: str = SPATIAL_KEY
    image_key: str | None = None
    library_key: str | None = None
    patch_scale: float = 1.0
    patch_size: int = 224
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    features_key: str | None = None

    def __post_init__(self) -> None:
        scale = self.patch_scale
        number = isinstance(scale, int | float | np.floating) and not isinstance(scale, bool)
        if not (number and np.isfinite(scale) and scale > 0):
            raise ValueError(f"patch_scale must be a positive number; got {scale!r}.")
        size = self.patch_size
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"patch_size must be a positive int; got {size!r}.")
        # tuples, so that the record stays immutable and hashable
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            values = tuple(float(v) for v in values)
            if len(values) != 3:
                raise ValueError(f"{name} needs 3 values (RGB); got {values}.")
            object.__setattr__(self, name, values)
        object.__setattr__(self, "patch_scale", float(scale))
        object.__setattr__(self, "patch_size", int(size))

    @property
    def uses_features(self) -> bool:
        """Whether precomputed features (``obsm[features_key]``) replace the patches."""
        return self.features_key is not None

    def library_column(self, adata: AnnData, library_key: str | None = None) -> str | None:
        """The ``obs`` column of libraries to use for ``adata``.

        ``library_key`` when given; else the model's ``library_key`` where ``adata.obs`` has it
        (an AnnData of one library, a query, may lack it); else found from the data
        (:func:`rankbygene._layout.resolve_library_key`: ``None`` for one library).

        Examples
        --------
        >>> import anndata as ad, numpy as np, pandas as pd
        >>> settings = ImageSettings(library_key="library_id")
        >>> settings.library_column(ad.AnnData(np.zeros((2, 2))))  # no such column: None
        >>> obs = pd.DataFrame({"library_id": ["a", "b"]}, index=["s0", "s1"])
        >>> settings.library_column(ad.AnnData(np.zeros((2, 2)), obs=obs))
        'library_id'
        """
        return resolve_library_key(adata, library_key, setup_key=self.library_key)
