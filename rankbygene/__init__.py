"""rankbygene: gene-guided representations of H&E histology from spatial transcriptomics.

Submodules follow scanpy: :mod:`~rankbygene.pp` (preprocessing), :mod:`~rankbygene.tl` (tools),
:mod:`~rankbygene.pl` (plots), :mod:`~rankbygene.io` (readers), :mod:`~rankbygene.datasets`; the
model is :class:`~rankbygene.RankByGene` (scvi-tools API). Heavy submodules load on first use,
so ``import rankbygene`` stays quick. ``rankbygene.settings.verbosity`` (or
:func:`~rankbygene.set_verbosity`) sets how much the package logs; by default only its
warnings show.
"""

from __future__ import annotations

import importlib
from typing import Any

from rankbygene._logging import (
    Settings,
    get_verbosity,
    ignore_import_warnings,
    set_verbosity,
    settings,
)
from rankbygene._version import __version__

ignore_import_warnings()

_SUBMODULES = {"data", "datasets", "io", "losses", "model", "pl", "pp", "tl"}
_MODEL_NAMES = {"RankByGene": "rankbygene.model"}

__all__ = [
    "RankByGene",
    "Settings",
    "__version__",
    "get_verbosity",
    "set_verbosity",
    "settings",
    *sorted(_SUBMODULES),
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"rankbygene.{name}")
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module(_MODEL_NAMES[name]), name)
    raise AttributeError(f"module 'rankbygene' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
