"""Colour and texture statistics of H&E patches, computed in torch on a batch of images.

One implementation serves :func:`rankbygene.tl.patch_statistics` (the baseline a learned encoder
must beat) and :class:`PatchStatistics`, which appends the same statistics to an image encoder's
features (``RankByGene(..., patch_statistics=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rankbygene._precision import float32_region

__all__ = ["PATCH_STATISTICS", "PatchStatistics", "patch_statistics_tensor"]

#: Names of the statistics, in the order :func:`patch_statistics_tensor` returns them.
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
NUCLEAR_HAEMATOXYLIN = 0.08
#: Grey level above which a pixel counts as background (glass).
BACKGROUND_GREY = 0.86
_GREY_WEIGHTS = (0.299, 0.587, 0.114)
# the smallest RGB value before the optical-density log, as scikit-image's colour deconvolution
_MIN_RGB = 1e-6


def _hed_from_rgb() -> Tensor:
    from skimage.color import hed_from_rgb

    return torch.as_tensor(hed_from_rgb, dtype=torch.float32)


def _filter(grey: Tensor, kernel: Tensor) -> Tensor:
    """3x3 filter of ``(n, h, w)`` images, edges repeated (scipy.ndimage's ``reflect``)."""
    padded = nn.functional.pad(grey[:, None], (1, 1, 1, 1), mode="replicate")
    return nn.functional.conv2d(padded, kernel.to(grey)[None, None])[:, 0]


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


@torch.no_grad()
def patch_statistics_tensor(rgb: Tensor) -> Tensor:
    """Colour and texture statistics of each image: ``(n, 3, h, w)`` in [0, 1] -> ``(n, 23)``.

    RGB, haematoxylin/eosin/DAB optical density (scikit-image's colour deconvolution) and
    saturation means and sds, brightness, grey-level quantiles, Sobel gradient and Laplacian
    magnitude, and the fractions of background and of nuclear pixels:
    :data:`PATCH_STATISTICS`, in that order. Each image is filtered on its own.

    Parameters
    ----------
    rgb
        Images with values in [0, 1], channels first.

    Returns
    -------
    ``(n, len(PATCH_STATISTICS))`` float32 statistics, on the images' device; computed in float32
    also under autocast (mixed precision), so that they agree across devices and precisions.

    Examples
    --------
    >>> import torch
    >>> patch_statistics_tensor(torch.full((2, 3, 16, 16), 0.5)).shape
    torch.Size([2, 23])
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"images must be (n, 3, h, w); got shape {tuple(rgb.shape)}.")
    # float32 under a caller's autocast too: bf16 grey levels move the quantiles and the
    # thresholds, so GPU and CPU features would disagree (and older torch refuses bf16 quantiles)
    with float32_region(rgb.device):
        return _statistics(rgb.float())


def _statistics(rgb: Tensor) -> Tensor:
    n = rgb.shape[0]
    flat = rgb.reshape(n, 3, -1)
    density = torch.log(flat.clamp_min(_MIN_RGB)) / torch.log(torch.tensor(_MIN_RGB))
    hed = torch.einsum("ncp,cd->ndp", density, _hed_from_rgb().to(rgb.device)).clamp_min(0.0)
    top, bottom = flat.amax(dim=1), flat.amin(dim=1)
    saturation = torch.where(top > 0, (top - bottom) / top.clamp_min(1e-6), torch.zeros_like(top))
    grey = torch.einsum("nchw,c->nhw", rgb, torch.tensor(_GREY_WEIGHTS, device=rgb.device))
    gradient = torch.hypot(_filter(grey, _SOBEL_X.T), _filter(grey, _SOBEL_X)).reshape(n, -1)
    laplacian = _filter(grey, _LAPLACE).abs().reshape(n, -1)
    grey = grey.reshape(n, -1)
    quantiles = torch.quantile(grey, torch.tensor([0.1, 0.5, 0.9], device=rgb.device), dim=1)
    columns = [
        flat.mean(dim=2),
        flat.std(dim=2, unbiased=False),
        hed.mean(dim=2),
        hed.std(dim=2, unbiased=False),
        saturation.mean(dim=1, keepdim=True),
        saturation.std(dim=1, unbiased=False, keepdim=True),
        top.mean(dim=1, keepdim=True),
        quantiles.T,
        gradient.mean(dim=1, keepdim=True),
        gradient.std(dim=1, unbiased=False, keepdim=True),
        laplacian.mean(dim=1, keepdim=True),
        (grey > BACKGROUND_GREY).float().mean(dim=1, keepdim=True),
        (hed[:, 0] > NUCLEAR_HAEMATOXYLIN).float().mean(dim=1, keepdim=True),
    ]
    return torch.cat(columns, dim=1)


class PatchStatistics(nn.Module):
    """An image encoder whose features end with the patch's colour and texture statistics.

    Colour statistics carry much of what predicts expression on a few sections (cellularity,
    stain density) that ImageNet features keep only weakly; appended to the encoder's features,
    the projection heads can use both.

    Parameters
    ----------
    encoder
        Maps ``(n, 3, h, w)`` normalised images to ``(n, n_features)``.
    mean, std
        The normalisation of the encoder's input, undone to compute the statistics.

    Examples
    --------
    >>> import torch
    >>> encoder = PatchStatistics(torch.nn.Flatten(), mean=(0.5,) * 3, std=(0.25,) * 3)
    >>> encoder(torch.zeros(2, 3, 4, 4)).shape
    torch.Size([2, 71])
    """

    n_statistics = len(PATCH_STATISTICS)
    mean: Tensor
    std: Tensor

    def __init__(self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        features = self.encoder(images)
        with float32_region(images.device):
            rgb = (images.float() * self.std + self.mean).clamp(0.0, 1.0)
        # float32 out, also under autocast: the statistics' precision is kept to the heads
        return torch.cat([features.float(), patch_statistics_tensor(rgb)], dim=1)
