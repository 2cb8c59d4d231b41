"""The installed package's version, for ``rankbygene.__version__`` and the records it writes."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("rankbygene")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
