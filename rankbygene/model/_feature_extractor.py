"""A RankByGene image encoder as a LazySlide feature extractor.

``lazyslide.tl.feature_extraction(wsi, model)`` takes a model with LazySlide's image-model
interface (``name``, ``model``, ``get_transform``, ``encode_image``, ``to``, ``try_compile``):
it reads each tile of ``wsi.shapes[tile_key]`` through the ``WSIData``'s reader, applies
``get_transform()`` to it and stores ``encode_image`` of the batches in
``wsi.tables[f"{name}_{tile_key}"]``. :class:`FeatureExtractor` is that model for a RankByGene
encoder, with the package's own resizing and normalisation, so that its features are those of
:meth:`RankByGene.get_image_representation` on the same tiles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import nn

from rankbygene._image import resize
from rankbygene._logging import logger
from rankbygene._precision import float32_region
from rankbygene.data._transforms import eval_transform

if TYPE_CHECKING:
    from rankbygene.model._model import RankByGene

__all__ = ["FeatureExtractor", "TileTransform"]


class TileTransform:
    """uint8 ``(H, W, 3)`` tile -> the encoder's normalised float32 ``(3, S, S)`` input.

    The tile is resized to ``input_size`` as the package resizes patches (PIL bilinear,
    :func:`rankbygene._image.resize`), then normalised with the encoder's mean and std.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.model._feature_extractor import TileTransform
    >>> TileTransform(16)(np.zeros((32, 32, 3), np.uint8)).shape
    torch.Size([3, 16, 16])
    """

    def __init__(
        self,
        input_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.input_size = int(input_size)
        self.normalize = eval_transform(mean, std)

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        tile = np.asarray(tile)
        if tile.ndim == 3 and tile.shape[-1] == 4:  # RGBA from some readers
            tile = tile[..., :3]
        if tile.shape[:2] != (self.input_size, self.input_size):
            tile = resize(np.ascontiguousarray(tile), self.input_size)
        return self.normalize(tile)

    def __repr__(self) -> str:
        return f"TileTransform(input_size={self.input_size}, {self.normalize!r})"


class FeatureExtractor(nn.Module):
    """A trained RankByGene image encoder with LazySlide's image-model interface.

    Pass it to ``lazyslide.tl.feature_extraction``: LazySlide reads the tiles of a ``WSIData``
    through its reader, the extractor resizes them to the model's ``input_size`` and normalises
    them as the package does, so that the features equal, within 1e-3,
    :meth:`~RankByGene.get_image_representation` of the same tiles,
    ``rbg.pp.tile_slide(wsi, tile_key="tiles")``: those are read from the pyramid level the
    tile spec reads (not the coarsest level that suffices for the encoder's input, which holds
    other pixels). The features equal when the spec reads its tiles without rescaling them
    (``tile_tissues`` without ``mpp``, or at an ``mpp`` of one of the slide's levels);
    otherwise LazySlide rescales each tile first (OpenCV's area average). It shares the model's
    weights (moving it to a device moves the model). Needs the ``wsi`` extra only to be used
    with LazySlide.

    Parameters
    ----------
    model
        A RankByGene model with an image encoder (not one trained on precomputed features).
    kind
        ``"embedding"``: the L2-normalised teacher embedding (``n_latent``, as
        :meth:`~RankByGene.get_image_representation`); ``"backbone"``: the teacher backbone's
        features.
    name
        Name of the features in LazySlide: they go to ``wsi.tables[f"{name}_{tile_key}"]``.

    Attributes
    ----------
    model
        The model's module (LazySlide's interface names it ``model``).
    name
        As given.

    Examples
    --------
    >>> import lazyslide as zs  # doctest: +SKIP
    >>> wsi = zs.open_wsi("slide.svs", store=None)  # doctest: +SKIP
    >>> zs.pp.find_tissues(wsi)  # doctest: +SKIP
    >>> zs.pp.tile_tissues(wsi, 224, mpp=0.5)  # doctest: +SKIP
    >>> extractor = rbg.model.FeatureExtractor(model)  # doctest: +SKIP
    >>> zs.tl.feature_extraction(wsi, extractor)  # doctest: +SKIP
    >>> features = wsi["rankbygene_tiles"].X  # doctest: +SKIP
    """

    def __init__(
        self,
        model: RankByGene,
        kind: Literal["embedding", "backbone"] = "embedding",
        name: str = "rankbygene",
    ) -> None:
        super().__init__()
        if kind not in ("embedding", "backbone"):
            raise ValueError(f"kind must be 'embedding' or 'backbone'; got {kind!r}.")
        module = model.module
        if module.uses_features:
            raise ValueError(
                "This model was trained on precomputed features (features_key): it has no image "
                "encoder to extract features from tiles with."
            )
        settings = model.image_settings
        if settings.patch_scale != 1.0:
            logger.warning(
                f"The model reads patches {settings.patch_scale:g} times the spot; LazySlide "
                "hands it the tiles only, so its features differ from get_image_representation's."
            )
        self.model = module
        self.kind = kind
        self.name = str(name)
        self.input_size = settings.patch_size
        self.mean = settings.mean
        self.std = settings.std

    def get_transform(self) -> TileTransform:
        """The per-tile transform LazySlide applies before batching (resize and normalise)."""
        return TileTransform(self.input_size, self.mean, self.std)

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Features of a batch: normalised ``(B, 3, S, S)`` floats, or uint8 ``(B, H, W, 3)``.

        uint8 batches (tiles collated without :meth:`get_transform`) are resized (bilinear,
        antialiased) and normalised here.
        """
        self.model.eval()
        device = next(self.model.parameters()).device
        image = image.to(device)
        if image.dtype == torch.uint8:
            with float32_region(device):  # the caller's autocast must not round the pixels
                image = self._normalise_uint8(image)
        return self.model.embed_images(image, teacher=True, kind=self.kind).float()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode_image`, so that the extractor is also a plain callable."""
        return self.encode_image(image)

    def try_compile(self, **compile_kws: Any) -> FeatureExtractor:
        """Compile the teacher backbone with :func:`torch.compile` where it can be; else skip."""
        with contextlib.suppress(Exception):  # LazySlide's compile is best-effort
            compiled = torch.compile(self.model.teacher_backbone, **compile_kws)
            self.model.teacher_backbone = cast(torch.nn.Module, compiled)
        return self

    def _normalise_uint8(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 4 and image.shape[-1] in (3, 4):
            image = image[..., :3].permute(0, 3, 1, 2)
        image = image.float() / 255.0
        if image.shape[-2:] != (self.input_size, self.input_size):
            image = nn.functional.interpolate(
                image, size=(self.input_size, self.input_size), mode="bilinear", antialias=True
            )
        transform = self.get_transform().normalize
        mean = torch.tensor(transform.mean, device=image.device).view(1, 3, 1, 1)
        std = torch.tensor(transform.std, device=image.device).view(1, 3, 1, 1)
        return (image - mean) / std

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind!r}, input_size={self.input_size}"
