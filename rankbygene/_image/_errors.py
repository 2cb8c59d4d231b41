"""Errors of file decoders, re-raised as a ``ValueError`` that names the file."""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["corrupt_file_error", "is_decoder_error", "reading_file"]

#: What decoders raise on truncated or damaged bytes: EOFError (gzip, bz2, lzma streams cut
#: short), OSError (gzip's BadGzipFile and CRC checks, PIL's "image file is truncated"), zlib and
#: lzma errors, SyntaxError and struct.error (PIL on broken PNG chunks and headers).
DECODER_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    SyntaxError,
    struct.error,
)

#: Missing or unreadable files are not damaged ones: their own error says more.
_NOT_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)

#: Libraries whose every error means the bytes could not be decoded. imagecodecs has no common
#: base class (DeflateError, JpegError... derive from RuntimeError), so they are told by module.
_DECODER_MODULES = ("imagecodecs", "tifffile", "zarr", "numcodecs", "openslide")


def is_decoder_error(err: BaseException, also: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``err`` says a file's bytes could not be decoded (truncated or corrupt).

    Parameters
    ----------
    err
        The exception raised while reading a file.
    also
        More exception types that mean a damaged file where the caller reads.

    Returns
    -------
    ``True`` for decoder errors; ``False`` for a missing or unreadable file and anything else.
    """
    if isinstance(err, _NOT_DECODER_ERRORS):
        return False
    if isinstance(err, DECODER_ERRORS + also):
        return True
    return type(err).__module__.split(".")[0] in _DECODER_MODULES


def corrupt_file_error(path: str | Path, err: BaseException, what: str = "file") -> ValueError:
    """The ``ValueError`` to raise (``from err``) when ``path`` could not be decoded.

    Parameters
    ----------
    path
        The file.
    err
        The decoder's error, quoted in the message.
    what
        What the file is, e.g. ``"count table"`` or ``"image file"``.

    Returns
    -------
    A ``ValueError`` naming the file and saying it looks truncated or corrupt.
    """
    return ValueError(
        f"Could not read {what} {path}: it looks truncated or corrupt "
        f"({type(err).__name__}: {err})."
    )


@contextmanager
def reading_file(
    path: str | Path | None, what: str = "file", also: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Re-raise decoder errors raised in the block as a ``ValueError`` naming ``path``.

    Other errors (a missing file among them) pass through unchanged.

    Parameters
    ----------
    path
        The file read in the block (``None``: nothing to name, errors pass through).
    what
        What the file is, for the message.
    also
        More exception types that mean a damaged file here (e.g. ``ValueError`` where a library
        raises it for a garbled header field).

    Examples
    --------
    >>> import gzip
    >>> with reading_file("counts.tsv.gz", "count table"):  # doctest: +SKIP
    ...     gzip.open("counts.tsv.gz").read()
    """
    try:
        yield
    except Exception as err:
        if path is None or not is_decoder_error(err, also):
            raise
        raise corrupt_file_error(path, err, what) from err
