"""The student's and the teacher's views of a whole batch, made on the device that trains.

On a GPU, augmenting patch by patch in DataLoader workers is what the GPU waits for (the colour
jitter's hue shift alone costs about 10 ms per 224 px patch on a CPU core). Here the same views
as :func:`~rankbygene.data.strong_transform` and :func:`~rankbygene.data.weak_transform` are made
for a whole uint8 batch at once, each patch with its own random draw: dihedral flips and
rotations in torch, colour jitter and grayscale through kornia's batched augmentations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rankbygene.data._transforms import (
    COLOUR_JITTER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    P_GRAYSCALE,
    P_JITTER,
    normalize_batch,
)

__all__ = ["DeviceAugmentation", "random_dihedral"]


def random_dihedral(images: Tensor) -> Tensor:
    """Each square image of ``(n, c, s, s)`` flipped and rotated by its own random symmetry.

    A horizontal flip, a vertical flip and a transposition, each with probability 1/2, draw the
    8 symmetries of the square uniformly (as flips and a random quarter turn do); pixels are only
    moved, never changed.

    Examples
    --------
    >>> import torch
    >>> random_dihedral(torch.arange(8.0).view(2, 1, 2, 2)).shape
    torch.Size([2, 1, 2, 2])
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (n, c, s, s); got shape {tuple(images.shape)}.")
    draws = torch.rand(3, images.shape[0], 1, 1, 1, device=images.device) < 0.5
    images = torch.where(draws[0], images.flip(-1), images)
    images = torch.where(draws[1], images.flip(-2), images)
    return torch.where(draws[2], images.transpose(-1, -2), images)


class DeviceAugmentation(nn.Module):
    """Strong and weak views of a uint8 batch, normalised, wherever the batch is.

    The weak (teacher) view is a random symmetry of the patch; the strong (student) view another
    random symmetry, colour jitter (probability ``p_jitter``) and grayscale (``p_grayscale``):
    the augmentations of :func:`~rankbygene.data.strong_transform` and
    :func:`~rankbygene.data.weak_transform`, with the same defaults. Work is done in float32.

    Parameters
    ----------
    mean, std
        Per-channel normalisation of pixel values in [0, 1]; ImageNet's by default.
    brightness, contrast, saturation, hue, p_jitter, p_grayscale
        As in :func:`~rankbygene.data.strong_transform`.

    Examples
    --------
    >>> import torch
    >>> patches = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    >>> strong, weak = DeviceAugmentation()(patches)
    >>> strong.shape, weak.dtype
    (torch.Size([4, 3, 16, 16]), torch.float32)
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        brightness: float = COLOUR_JITTER["brightness"],
        contrast: float = COLOUR_JITTER["contrast"],
        saturation: float = COLOUR_JITTER["saturation"],
        hue: float = COLOUR_JITTER["hue"],
        p_jitter: float = P_JITTER,
        p_grayscale: float = P_GRAYSCALE,
    ) -> None:
        import kornia.augmentation as K

        super().__init__()
        self.mean = IMAGENET_MEAN if mean is None else tuple(mean)
        self.std = IMAGENET_STD if std is None else tuple(std)
        self.colour = nn.Sequential(
            K.ColorJitter(brightness, contrast, saturation, hue, p=p_jitter),
            K.RandomGrayscale(p=p_grayscale),
        )

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """``(strong, weak)`` normalised float32 views of ``(n, 3, s, s)`` uint8 patches."""
        images = self._unit(patches)
        weak = random_dihedral(images)
        strong = self.colour(random_dihedral(images)).clamp(0.0, 1.0)
        return normalize_batch(strong, self.mean, self.std), normalize_batch(
            weak, self.mean, self.std
        )

    def plain(self, patches: Tensor) -> Tensor:
        """The un-augmented, normalised patches (validation), as :func:`eval_transform`."""
        return normalize_batch(self._unit(patches), self.mean, self.std)

    @staticmethod
    def _unit(patches: Tensor) -> Tensor:
        if patches.dtype != torch.uint8 or patches.ndim != 4 or patches.shape[1] != 3:
            raise ValueError(
                f"patches must be uint8 (n, 3, s, s); got {patches.dtype} {tuple(patches.shape)}."
            )
        return patches.float().div_(255.0)
