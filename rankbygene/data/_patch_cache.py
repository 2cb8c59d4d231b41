"""The cache of decoded patches: in memory, or a ``.npy`` memory map on disk that later runs and
DataLoader workers share, with a checksum per patch so that a damaged file is repaired, not served.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from rankbygene._logging import logger

__all__ = ["CACHE_FORMAT", "PatchCache"]

CACHE_FORMAT = 2  # bump when the pixels produced for the same inputs, or the files, change
# A cached patch's entry in the checksum array: this bit, so that no entry of a patch is 0
# (not cached), and the CRC-32 of its pixels, which finds any flipped byte of the patch.
_CACHED = np.uint64(1 << 32)


class PatchCache:
    """Patches ``(n_patches, patch_size, patch_size, 3)`` uint8 by slot, and which are cached.

    With a ``path``, the pixels are the ``.npy`` file there and the checksums a ``.sums.npy``
    beside it, both memory-mapped; a file that is not a complete array of the expected shape is
    rebuilt (with a warning), and a patch whose pixels no longer match its checksum is reported
    and treated as not cached. Without one, the patches are an array in memory. Pickled, a disk
    cache leaves its maps behind and the receiver maps the same files; a memory cache travels
    with its patches unless none is cached yet.
    """

    def __init__(self, n_patches: int, patch_size: int, path: Path | None = None) -> None:
        self.path = path
        self.shape = (int(n_patches), int(patch_size), int(patch_size), 3)
        self._store: np.ndarray | None = None  # the patches, one row per slot
        self._sums: np.ndarray | None = None  # per slot: 0, or _CACHED | CRC-32 of its patch
        self._repaired = 0  # cached patches found damaged, in this process
        self._mapped(create=True)

    @property
    def n_cached(self) -> int:
        """Number of slots whose patch is cached."""
        return int(np.count_nonzero(self._mapped(create=False)[1]))

    def missing(self) -> np.ndarray:
        """Slots whose patch is not cached (the files are made anew if they are gone)."""
        return np.flatnonzero(self._mapped(create=True)[1] == 0)

    def get(self, slot: int, spot: int) -> np.ndarray | None:
        """The cached patch of ``slot`` (``spot`` names it in a warning), else ``None``."""
        store, sums = self._mapped(create=False)
        if not sums[slot]:
            return None
        patch = np.array(store[slot])
        if self.path is None or sums[slot] == _checksum(patch):
            return patch
        self._repaired += 1  # changed on disk: the caller reads it again and puts it back
        if self._repaired == 1:
            logger.warning(
                f"Patch cache {self.path}: the patch of spot {spot} does not match its "
                "checksum (the file changed on disk): it is read again from the image. Other "
                "damaged patches are read again without a message."
            )
        return None

    def put(self, slot: int, patch: np.ndarray) -> None:
        store, sums = self._mapped(create=False)
        store[slot] = patch
        sums[slot] = _checksum(patch)  # after the pixels: a reader never sees half a patch

    def flush(self) -> None:
        # np.memmap, on disk (np.ndarray has no flush)
        if isinstance(self._store, np.memmap) and isinstance(self._sums, np.memmap):
            self._store.flush()
            self._sums.flush()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_store"] = state["_sums"] = None  # mapped again by the receiver
        elif self._sums is not None and not self._sums.any():
            state["_store"] = state["_sums"] = None  # nothing worth shipping
        return state

    def _mapped(self, create: bool) -> tuple[np.ndarray, np.ndarray]:
        if self._store is None:
            if self.path is None:
                # np.empty commits no memory until a patch is written
                self._store = np.empty(self.shape, dtype=np.uint8)
                self._sums = np.zeros(self.shape[0], dtype=np.uint64)
            else:
                self._open_files(create)
        assert self._store is not None
        assert self._sums is not None
        return self._store, self._sums

    def _open_files(self, create: bool) -> None:
        """Map the cache's pixels and their checksums, rebuilding a file that is damaged.

        ``create=False`` (a process that received the cache) requires both files to exist.
        """
        path = self.path
        assert path is not None  # a disk cache
        sums_path = path.with_suffix(".sums.npy")
        shape = self.shape
        if not create and not (path.is_file() and sums_path.is_file()):
            raise FileNotFoundError(f"The patch cache {path} is gone; build a new extractor.")
        path.parent.mkdir(parents=True, exist_ok=True)
        store = _open_npy(path, shape, np.uint8)
        if store is None:
            # Checksums are only trusted beside the pixels they were computed on; they go
            # first, so that a run killed between the two files never leaves old ones behind.
            sums_path.unlink(missing_ok=True)
            store = _create_npy(path, shape, np.uint8)
        sums = _open_npy(sums_path, (shape[0],), np.uint64)
        if sums is None:
            sums = _create_npy(sums_path, (shape[0],), np.uint64)
        self._store, self._sums = store, sums
        if create:
            n_cached = int(np.count_nonzero(sums))
            logger.info(f"patch cache {path}: {n_cached} of {shape[0]} patches cached")


def _checksum(patch: np.ndarray) -> np.uint64:
    """A cached patch's checksum entry: ``_CACHED`` with the CRC-32 of its pixels."""
    return _CACHED | np.uint64(zlib.crc32(np.ascontiguousarray(patch).data))


def _npy_problem(path: Path, shape: tuple[int, ...], dtype: Any) -> str | None:
    """Why the ``.npy`` file at ``path`` is not a complete array of ``shape`` and ``dtype``.

    Returns ``None`` when it is. Checked from the header and the file size, never by mapping it:
    numpy's ``r+`` memory map zero-extends a short file, which would serve zeros as data.
    """
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                found, fortran, found_dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                found, fortran, found_dtype = np.lib.format.read_array_header_2_0(handle)
            else:  # open_memmap writes 1.0, or 2.0 for very large headers
                return f"unexpected .npy format version {version}"
            offset = handle.tell()
    except (ValueError, EOFError, OSError) as err:  # empty, cut inside the header, not .npy
        return f"unreadable header ({type(err).__name__}: {err})"
    if tuple(found) != tuple(shape) or found_dtype != np.dtype(dtype) or fortran:
        return f"holds {found_dtype} {tuple(found)}, expected {np.dtype(dtype)} {tuple(shape)}"
    size, expected = path.stat().st_size, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size != expected:
        return f"{size} bytes, expected {expected} (truncated or overwritten)"
    return None


def _open_npy(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap | None:
    """The ``.npy`` memory map at ``path``; ``None`` when it is absent or damaged (warned)."""
    if not path.is_file():
        return None
    problem = _npy_problem(path, shape, dtype)
    if problem is None:
        return np.load(path, mmap_mode="r+")
    logger.warning(f"Patch cache file {path} is damaged ({problem}): rebuilding it.")
    return None


def _create_npy(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    """A new zero-filled ``.npy`` memory map at ``path``, replacing what was there."""
    # Written under a temporary name, flushed, then renamed: an interrupted write never leaves a
    # file under the cache's name, and a concurrent run never sees half a header.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        if dtype == np.bool_:
            array[:] = False
        array.flush()
        del array
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r+")
