"""Patch transforms: normalisation for inference and the method's strong/weak augmentation pair.

Every transform takes a uint8 ``(H, W, 3)`` patch (numpy, as :class:`PatchExtractor` returns it,
or a ``(3, H, W)`` uint8 tensor) and returns a normalised float32 ``(3, H, W)`` tensor. They are
module-level classes, so they pickle into DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

__all__ = [
    "COLOUR_JITTER",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "P_GRAYSCALE",
    "P_JITTER",
    "PatchTransform",
    "RandomHEDJitter",
    "RandomRot90",
    "eval_transform",
    "normalize_batch",
    "stain_transform",
    "strong_transform",
    "weak_transform",
]

#: ImageNet channel means and standard deviations (RGB, pixel values in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: The student's colour augmentation: jitter strengths, and how often jitter and grayscale apply
#: (:func:`strong_transform` per patch, :class:`DeviceAugmentation` per batch).
COLOUR_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
P_JITTER = 0.8
P_GRAYSCALE = 0.2


class RandomRot90(torch.nn.Module):
    """Rotate a ``(..., H, W)`` tensor by a random multiple of 90 degrees.

    Histology has no canonical orientation, so all four rotations are equally likely. The draw uses
    torch's generator, which DataLoader seeds per worker.
    """

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()))
        return torch.rot90(image, k, dims=(-2, -1)) if k else image


#: Stain vectors (rows: haematoxylin, eosin, DAB) in optical density, Ruifrok & Johnston (2001),
#: the matrix scikit-image's ``rgb2hed`` inverts.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)


class RandomHEDJitter(torch.nn.Module):
    """Stain augmentation: scale and shift each stain's optical density (Tellez et al., 2018).

    The ``(3, H, W)`` uint8 image is deconvolved into haematoxylin, eosin and DAB densities; each
    is multiplied by ``U(1 - sigma, 1 + sigma)`` and shifted by ``U(-sigma, sigma)`` times its
    spread; the image is recomposed. This mimics the stain variation between labs and scanners,
    unlike hue jitter or grayscale, which change colours H&E never takes.

    Parameters
    ----------
    sigma
        Strength; 0.05 is a common choice for H&E.

    Examples
    --------
    >>> import torch
    >>> image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    >>> RandomHEDJitter(0.0)(image).sub(image).abs().max() <= 1
    tensor(True)
    """

    def __init__(self, sigma: float = 0.05) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0; got {sigma}.")
        self.sigma = float(sigma)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        rgb = image.float().div(255.0).clamp_min(1e-6)
        density = -torch.log(rgb).reshape(3, -1)  # optical density per channel
        stains = torch.linalg.solve(_RGB_FROM_HED.T, density)  # (3 stains, pixels)
        scale = 1 + (torch.rand(3, 1) * 2 - 1) * self.sigma
        shift = (torch.rand(3, 1) * 2 - 1) * self.sigma * stains.std(dim=1, keepdim=True)
        density = _RGB_FROM_HED.T @ (stains * scale + shift)
        out = torch.exp(-density).reshape(image.shape).clamp(0, 1)
        return (out * 255.0).round().to(torch.uint8)


class PatchTransform:
    """uint8 patch -> (augmented) normalised float32 ``(3, H, W)`` tensor.

    Parameters
    ----------
    augment
        Transforms applied to the uint8 ``(3, H, W)`` tensor before normalisation (may be empty).
    mean, std
        Per-channel normalisation of pixel values in [0, 1].
    normalize
        ``False``: return the (augmented) uint8 tensor, to be normalised per batch where the
        model runs (:func:`normalize_batch`): a quarter of the bytes to collate and copy.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.data import PatchTransform
    >>> PatchTransform([])(np.zeros((8, 8, 3), np.uint8)).shape
    torch.Size([3, 8, 8])
    """

    def __init__(
        self,
        augment: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        normalize: bool = True,
    ) -> None:
        mean = IMAGENET_MEAN if mean is None else tuple(float(m) for m in mean)
        std = IMAGENET_STD if std is None else tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB); got {mean} and {std}.")
        if min(std) <= 0:
            raise ValueError(f"std must be positive; got {std}.")
        self.mean, self.std = mean, std
        self.augment = v2.Compose(list(augment)) if augment else None
        self.normalize = (
            v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
            if normalize
            else None
        )

    def __call__(self, patch: np.ndarray | torch.Tensor) -> torch.Tensor:
        image = _as_chw_uint8(patch)
        if self.augment is not None:
            image = self.augment(image)
        if self.normalize is not None:
            image = self.normalize(image)
        # v2 may hand back a tv_tensors subclass; collate and models want a plain tensor.
        return image.as_subclass(torch.Tensor).contiguous()

    def __repr__(self) -> str:
        steps = self.augment.transforms if self.augment is not None else []
        inner = ", ".join(type(t).__name__ for t in steps) or "no augmentation"
        return f"PatchTransform({inner}; mean={self.mean}, std={self.std})"


def _as_chw_uint8(patch: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(patch, torch.Tensor):
        image = patch
    else:
        array = np.asarray(patch)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"Expected an (H, W, 3) patch; got shape {array.shape}.")
        if not array.flags.writeable:  # views of an in-memory image; torch wants writable
            array = array.copy()
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if image.dtype != torch.uint8:
        raise TypeError(f"Expected a uint8 patch; got {image.dtype}.")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"Expected a (3, H, W) tensor; got shape {tuple(image.shape)}.")
    return image


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> torch.Tensor:
    """Normalised float32 ``(n, 3, H, W)`` images, on their device.

    The per-batch counterpart of :func:`eval_transform` (equal to it within float rounding), for
    patches that travel to the GPU as uint8. Always float32, also under autocast.

    Parameters
    ----------
    images
        uint8 images, or float images with values in [0, 1].
    mean, std
        Per-channel statistics; ImageNet's by default.

    Examples
    --------
    >>> import torch
    >>> normalize_batch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8)).dtype
    torch.float32
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (n, 3, h, w); got shape {tuple(images.shape)}.")
    unit = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    shape = (1, 3, 1, 1)
    centre = torch.tensor(IMAGENET_MEAN if mean is None else mean, device=images.device)
    scale = torch.tensor(IMAGENET_STD if std is None else std, device=images.device)
    return (unit - centre.float().view(shape)) / scale.float().view(shape)


def eval_transform(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> PatchTransform:
    """Normalisation only, for inference and validation.

    Parameters
    ----------
    mean, std
        Per-channel statistics; ImageNet's by default (pass a timm model's
        ``pretrained_cfg["mean"]`` / ``["std"]`` to match its pretraining).

    Returns
    -------
    Callable: uint8 ``(H, W, 3)`` array -> float32 ``(3, H, W)`` tensor.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.data import eval_transform
    >>> x = eval_transform()(np.full((4, 4, 3), 255, np.uint8))
    >>> x.dtype, tuple(x.shape)
    (torch.float32, (3, 4, 4))
    """
    return PatchTransform([], mean, std)


def weak_transform(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> PatchTransform:
    """The teacher's view: random horizontal/vertical flips and 90-degree rotations, normalised.

    The pixels are only permuted, never changed.

    Parameters
    ----------
    mean, std
        Per-channel statistics; ImageNet's by default.

    Returns
    -------
    Callable: uint8 ``(H, W, 3)`` array -> float32 ``(3, H, W)`` tensor.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.data import weak_transform
    >>> tuple(weak_transform()(np.zeros((8, 8, 3), np.uint8)).shape)
    (3, 8, 8)
    """
    return PatchTransform(_dihedral(), mean, std)


def strong_transform(
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    brightness: float = COLOUR_JITTER["brightness"],
    contrast: float = COLOUR_JITTER["contrast"],
    saturation: float = COLOUR_JITTER["saturation"],
    hue: float = COLOUR_JITTER["hue"],
    p_jitter: float = P_JITTER,
    p_grayscale: float = P_GRAYSCALE,
) -> PatchTransform:
    """The student's view: flips, 90-degree rotations, colour jitter and grayscale, normalised.

    Parameters
    ----------
    mean, std
        Per-channel statistics; ImageNet's by default.
    brightness, contrast, saturation, hue
        Colour jitter strengths (:class:`torchvision.transforms.v2.ColorJitter`).
    p_jitter
        Probability of applying the colour jitter.
    p_grayscale
        Probability of converting to grayscale (kept as 3 channels).

    Returns
    -------
    Callable: uint8 ``(H, W, 3)`` array -> float32 ``(3, H, W)`` tensor.

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.data import strong_transform
    >>> tuple(strong_transform()(np.zeros((8, 8, 3), np.uint8)).shape)
    (3, 8, 8)
    """
    for name, p in (("p_jitter", p_jitter), ("p_grayscale", p_grayscale)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]; got {p}.")
    jitter = v2.ColorJitter(
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue
    )
    augment = [
        *_dihedral(),
        v2.RandomApply([jitter], p=p_jitter),
        v2.RandomGrayscale(p=p_grayscale),
    ]
    return PatchTransform(augment, mean, std)


def stain_transform(
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    sigma: float = 0.05,
    normalize: bool = True,
) -> PatchTransform:
    """A stain-realistic view: flips, 90-degree rotations and HED stain jitter, normalised.

    The views of a frozen backbone's features (``freeze_backbone=True``) are made with it;
    ``normalize=False`` returns the uint8 view (see :class:`PatchTransform`).

    Examples
    --------
    >>> import numpy as np
    >>> from rankbygene.data import stain_transform
    >>> tuple(stain_transform()(np.zeros((8, 8, 3), np.uint8)).shape)
    (3, 8, 8)
    """
    return PatchTransform([*_dihedral(), RandomHEDJitter(sigma)], mean, std, normalize)


def _dihedral() -> list[Callable[[torch.Tensor], torch.Tensor]]:
    return [v2.RandomHorizontalFlip(p=0.5), v2.RandomVerticalFlip(p=0.5), RandomRot90()]
