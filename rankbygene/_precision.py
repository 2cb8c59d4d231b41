"""Numerical precision: which work runs in mixed precision, and which stays in float32.

Encoders run under autocast on a GPU (bf16 where the GPU has it) because that is where the time
goes; everything numerically delicate (colour statistics, similarities and losses, read-outs)
runs in float32 whatever the caller's autocast state, so that features computed on a GPU and on
a CPU agree. Precision is named as Lightning names it: ``"32-true"``, ``"bf16-mixed"`` and
``"16-mixed"``; the same names select the same code path on every device, which is how the CPU
tests exercise the GPU's mixed-precision path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "MIXED_PRECISIONS",
    "PRECISIONS",
    "autocast_dtype",
    "default_precision",
    "float32_region",
    "inference_autocast",
]

#: Lightning's names of the precisions the package runs with.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
MIXED_PRECISIONS = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def default_precision(device: str | torch.device) -> str:
    """Precision chosen for ``device``: bf16-mixed on GPUs that have it, else float32.

    fp16 is never chosen by itself: its range can overflow in large backbones and needs loss
    scaling; ask for ``"16-mixed"`` explicitly on GPUs without bf16.

    Examples
    --------
    >>> default_precision("cpu")
    '32-true'
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def autocast_dtype(precision: str | int | None) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision name; ``None`` for full precision.

    Raises
    ------
    ValueError
        An unknown precision.

    Examples
    --------
    >>> autocast_dtype("bf16-mixed")
    torch.bfloat16
    >>> autocast_dtype("32-true") is None
    True
    """
    name = {32: "32-true", "32": "32-true", 16: "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed"}
    precision = name.get(precision, precision)  # Lightning's short spellings
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    return MIXED_PRECISIONS.get(precision)


@contextlib.contextmanager
def inference_autocast(device: str | torch.device, precision: str | None) -> Iterator[None]:
    """Autocast of an inference pass on ``device`` (``precision=None``: its default).

    Examples
    --------
    >>> with inference_autocast("cpu", "bf16-mixed"):
    ...     torch.ones(2, 2) @ torch.ones(2, 2)
    tensor([[2., 2.],
            [2., 2.]], dtype=torch.bfloat16)
    """
    device = torch.device(device)
    dtype = autocast_dtype(default_precision(device) if precision is None else precision)
    if dtype is None:
        # full precision asked for: also inside a caller's autocast
        with float32_region(device):
            yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def float32_region(device: str | torch.device) -> contextlib.AbstractContextManager:
    """Context in which autocast is off for ``device``: work in it keeps its input dtypes.

    A no-op on device types without autocast support.

    Examples
    --------
    >>> with torch.autocast("cpu", dtype=torch.bfloat16), float32_region("cpu"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    try:
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    except RuntimeError:  # device types without autocast support
        return contextlib.nullcontext()
