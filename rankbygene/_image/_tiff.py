"""TIFF, OME-TIFF and SVS files read through tifffile, chunk by chunk, from any pyramid level."""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from rankbygene._image._base import ImageReader
from rankbygene._image._errors import corrupt_file_error, reading_file
from rankbygene._logging import logger

__all__ = ["DEFAULT_CACHE_BYTES", "TIFF_SUFFIXES", "ChunkCacheInfo", "TiffImage"]

DEFAULT_CACHE_BYTES = 64 * 2**20  # decoded TIFF chunks kept per open image: ~340 RGB 256-px tiles
#: File suffixes read by :class:`TiffImage` when the backend is left to :func:`open_image`.
TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf", ".ome.tif", ".ome.tiff", ".qptiff"}
_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}  # old-style, new-style, ALT JPEG, lossy JPEG (DNG)
#: Most pixels a TIFF tile may hold beyond its level's own size (4096 x 4096, more than writers
#: use): a header saying more is damaged, and decoding one such tile would allocate gigabytes
_MAX_TILE_PIXELS = 2**24
# tifffile raises a plain ValueError for garbled tags met while decoding (e.g. a bit depth of
# "(24543, 34255, 61740)"), and its zarr store KeyError, IndexError, TypeError, RuntimeError
# or ZeroDivisionError for chunk counts or sizes that do not fit; the box is inside the level,
# so any of them means a damaged file
_TIFF_READ_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    RuntimeError,
    ZeroDivisionError,
)


class TiffImage(ImageReader):
    """A TIFF, OME-TIFF or SVS file read through tifffile, tile by tile, from any pyramid level.

    A region is read by decoding only the TIFF chunks (tiles or strips) it overlaps, and the
    decoded chunks are kept in a least-recently-used cache bounded in bytes, so that neighbouring
    regions sharing a chunk (tiles of a slide read in grid order) decode it once. Several chunks
    missing from the cache are decoded on as many threads as tifffile's zarr store would use
    (none on machines with fewer than 6 cores). Pages this fast path does not cover (several
    pages per level, separate colour planes, samples other than 8-bit, depth) are read through
    tifffile's zarr store, as is any level whose chunks fail to decode.

    One reader may be shared by the threads of a process. A forked process should open its own
    (the file offset is shared with the parent); one that reads through an inherited reader
    anyway gets new locks and threads rather than copies stuck in the parent's state.

    Parameters
    ----------
    path
        The file.
    mpp
        Microns per pixel at full resolution, overriding what the file says.
    cache_bytes
        Most bytes of decoded chunks kept per open image (``0``: no cache).
    """

    def __init__(
        self, path: str | Path, mpp: float | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        import tifffile
        import zarr

        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int | np.integer):
            raise ValueError(f"cache_bytes must be a non-negative int; got {cache_bytes!r}.")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be non-negative; got {cache_bytes}.")
        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            levels = list(series.levels)
        except Exception as err:  # tifffile raises several types for a broken file
            raise corrupt_file_error(self.path, err, "TIFF file") from err
        self._axes = series.axes
        self._arrays: list[Any] = []  # zarr arrays, one per pyramid level
        self._grids: list[_ChunkGrid | None] = []
        shapes, tiles = [], []
        with reading_file(self.path, "TIFF file", _TIFF_READ_ERRORS):
            for i, level in enumerate(levels):
                store = self._tif.series[0].aszarr(level=i)
                self._arrays.append(zarr.open(store, mode="r"))
                shapes.append(_tiff_hw(level.shape, level.axes))
                self._grids.append(_ChunkGrid.of(level))
                page = level.keyframe
                tiled = page is not None and page.is_tiled
                tiles.append((page.tilelength, page.tilewidth) if tiled else (0, 0))
        # What a damaged header says: no pixel to read, or tiles that would allocate gigabytes
        problem = None
        if min(side for shape in shapes for side in shape) < 1:
            problem = f"level sizes {shapes} include an empty one"
        for (height, width), (tile_h, tile_w) in zip(shapes, tiles, strict=True):
            if tile_h * tile_w > max(_MAX_TILE_PIXELS, height * width):
                problem = f"tiles of {tile_w} x {tile_h} px in a {width} x {height} px level"
        if problem is not None:
            self._tif.close()  # no reader is returned to close it
            raise ValueError(
                f"Could not read TIFF file {self.path}: it looks truncated or corrupt ({problem})."
            )
        self.shape = shapes[0]
        self._shapes = shapes
        self.level_downsamples = tuple(shapes[0][1] / s[1] for s in shapes)
        self.mpp = mpp if mpp is not None else _tiff_mpp(self._tif)
        self._cache = _ChunkCache(int(cache_bytes))
        # One lock for every seek and read on the file handle, the zarr store's included: the
        # store and the chunk reader share it, and a seek between another thread's seek and read
        # would return the wrong bytes.
        self._file_lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None  # decoding threads, started when needed
        self._pid = os.getpid()

    def _level_shape(self, level: int) -> tuple[int, int]:
        # the file's own level sizes: pyramids round odd sizes down or up, so they are not
        # always the full-resolution size over the downsample
        return self._shapes[level]

    def cache_info(self) -> ChunkCacheInfo:
        """Hits, misses and size of the decoded-chunk cache."""
        return self._cache.info()

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._after_fork()
        grid = self._grids[level]
        if grid is None:
            with self._file_lock, reading_file(self.path, "TIFF file", _TIFF_READ_ERRORS):
                return self._read_zarr(level, x, y, width, height)
        try:
            return self._read_chunks(grid, level, x, y, width, height)
        except Exception as err:
            # tifffile's store reads these pixels, or raises its own error (a truncated or
            # corrupt chunk), named after the file
            with self._file_lock, reading_file(self.path, "TIFF file", _TIFF_READ_ERRORS):
                pixels = self._read_zarr(level, x, y, width, height)
            # The store could and the chunk reader could not: the level is one the chunk reader
            # gets wrong, so it is read through the store from now on. (Where the store fails too,
            # the file is at fault, e.g. one corrupt tile, and the rest of the level stays fast.)
            logger.debug(f"{self.path} level {level}: chunk reader failed ({err!r}); using zarr")
            self._grids[level] = None
            return pixels

    def _read_chunks(
        self, grid: _ChunkGrid, level: int, x: int, y: int, width: int, height: int
    ) -> np.ndarray:
        """The box from the chunks it overlaps, decoding only those not in the cache."""
        ch, cw = grid.chunk_shape
        rows = range(y // ch, (y + height - 1) // ch + 1)
        cols = range(x // cw, (x + width - 1) // cw + 1)
        shape = (height, width) if grid.samples == 1 else (height, width, grid.samples)
        # chunks that decode short (the last strip, JPEG edge tiles) leave the fill value, as
        # tifffile's store pads them
        out = np.full(shape, grid.nodata, dtype=np.uint8)
        missing = []
        for row in rows:
            for col in cols:
                index = row * grid.n_across + col
                chunk = self._cache.get((level, index))
                if chunk is None:
                    missing.append(index)
                else:
                    _paste(out, chunk, row * ch - y, col * cw - x)
        if not missing:
            return out
        # A read larger than half the cache (a thumbnail band) would evict every chunk worth
        # keeping and then be evicted itself: decode it without caching.
        keep = len(missing) * grid.chunk_nbytes <= self._cache.max_bytes // 2
        for index, chunk in self._decode(grid, self._read_bytes(grid, missing)):
            if chunk is None:
                continue  # an empty chunk: the fill value, as tifffile's store gives
            if keep:
                self._cache.put((level, index), chunk)
            row, col = divmod(index, grid.n_across)
            _paste(out, chunk, row * ch - y, col * cw - x)
        return out

    def _read_bytes(self, grid: _ChunkGrid, indices: list[int]) -> list[tuple[bytes | None, int]]:
        offsets = [grid.offsets[i] for i in indices]
        bytecounts = [grid.bytecounts[i] for i in indices]
        fh = self._tif.filehandle
        # in file order, so that neighbouring chunks are read in one pass
        segments = fh.read_segments(offsets, bytecounts, indices, sort=True, lock=self._file_lock)
        return cast(list[tuple[bytes | None, int]], list(segments))

    def _decode(
        self, grid: _ChunkGrid, segments: list[tuple[bytes | None, int]]
    ) -> Iterator[tuple[int, np.ndarray | None]]:
        """Each segment's index and decoded chunk, on threads where there are several."""

        def decode(segment: tuple[bytes | None, int]) -> tuple[int, np.ndarray | None]:
            return segment[1], grid.decode(*segment)

        if grid.maxworkers < 2 or len(segments) < 2:
            return map(decode, segments)
        if self._executor is None:
            # kept for the reader's life: starting threads for every tile would cost more than
            # decoding it (imagecodecs releases the GIL, so the threads decode in parallel)
            self._executor = ThreadPoolExecutor(grid.maxworkers, thread_name_prefix="TiffImage")
        return self._executor.map(decode, segments)

    def _after_fork(self) -> None:
        # The child inherits the locks as another thread of the parent may have held them, and
        # an executor whose threads did not survive the fork: new ones, so it cannot hang.
        self._pid = os.getpid()
        self._file_lock = threading.RLock()
        self._cache.reset_lock()
        self._executor = None

    def _read_zarr(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        arr = self._arrays[level]
        index: list[Any] = []
        for ax in self._axes:
            if ax == "Y":
                index.append(slice(y, y + height))
            elif ax == "X":
                index.append(slice(x, x + width))
            elif ax in "SC" and arr.ndim == len(self._axes):
                index.append(slice(None))
            else:
                index.append(0)
        out = np.asarray(arr[tuple(index)])
        # planar files, (C, Y, X) or, with separate colour planes, (S, Y, X)
        channel = next((ax for ax in "CS" if ax in self._axes), None)
        if channel is not None and self._axes.index(channel) < self._axes.index("Y"):
            out = np.moveaxis(out, 0, -1)
        return out

    def close(self) -> None:
        if self._executor is not None and self._pid == os.getpid():
            self._executor.shutdown(wait=False)
        self._executor = None
        self._cache.clear()
        self._tif.close()


class ChunkCacheInfo(NamedTuple):
    """State of a :class:`TiffImage`'s decoded-chunk cache.

    Attributes
    ----------
    hits
        Chunks found in the cache.
    misses
        Chunks looked for and not found (decoded, then cached unless the read was too large).
    nbytes
        Bytes of the chunks held now.
    max_bytes
        The bound on ``nbytes``.
    n_chunks
        Chunks held now.
    """

    hits: int
    misses: int
    nbytes: int
    max_bytes: int
    n_chunks: int


class _ChunkCache:
    """Decoded chunks by key, least recently used evicted first, at most ``max_bytes`` held."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._nbytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is None:
                self._misses += 1
                return None
            self._chunks.move_to_end(key)
            self._hits += 1
            return chunk

    def put(self, key: Hashable, chunk: np.ndarray) -> None:
        if chunk.nbytes > self.max_bytes:
            return  # would not fit even alone
        # shared between reads: a caller writing into one would corrupt the next read
        chunk.flags.writeable = False
        with self._lock:
            previous = self._chunks.pop(key, None)
            if previous is not None:  # another thread decoded it meanwhile
                self._nbytes -= previous.nbytes
            self._chunks[key] = chunk
            self._nbytes += chunk.nbytes
            while self._nbytes > self.max_bytes:
                _, evicted = self._chunks.popitem(last=False)
                self._nbytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._nbytes = 0

    def reset_lock(self) -> None:
        self._lock = threading.Lock()

    def info(self) -> ChunkCacheInfo:
        with self._lock:
            return ChunkCacheInfo(
                self._hits, self._misses, self._nbytes, self.max_bytes, len(self._chunks)
            )


class _ChunkGrid:
    """How one pyramid level is cut into chunks, and how to decode one.

    Only built for the layout the chunk reader covers: a single page of 8-bit unsigned samples,
    1, 3 or 4 of them interleaved per pixel, tiled or in strips, no depth.
    """

    def __init__(self, page: Any) -> None:
        keyframe = page.keyframe  # the page itself, or the page whose tags a frame shares
        self.height, self.width = int(keyframe.imagelength), int(keyframe.imagewidth)
        self.samples = int(keyframe.samplesperpixel)
        if keyframe.is_tiled:
            self.chunk_shape = (int(keyframe.tilelength), int(keyframe.tilewidth))
        else:
            # strips span the width; rowsperstrip may exceed the height (one strip)
            self.chunk_shape = (min(int(keyframe.rowsperstrip), self.height), self.width)
        self.n_across = -(-self.width // self.chunk_shape[1])
        n_down = -(-self.height // self.chunk_shape[0])
        self.chunk_nbytes = self.chunk_shape[0] * self.chunk_shape[1] * self.samples
        self.offsets = tuple(int(o) for o in page.dataoffsets)
        self.bytecounts = tuple(int(b) for b in page.databytecounts)
        if len(self.offsets) != n_down * self.n_across or len(self.bytecounts) != len(self.offsets):
            raise ValueError("chunk count does not match the image size")
        self.nodata = int(keyframe.nodata)
        self._decode = keyframe.decode  # tifffile's decoder for this page's compression
        # the threads tifffile's zarr store decodes with (it takes fewer than 3 as 1)
        self.maxworkers = int(keyframe.maxworkers) if keyframe.maxworkers >= 3 else 1
        # what tifffile's store passes: SVS keep JPEG tables in the page, NDPI a JPEG header
        self._decode_args: dict[str, Any] = {}
        if page.jpegtables is not None:
            self._decode_args["jpegtables"] = page.jpegtables
        if keyframe.jpegheader is not None:
            self._decode_args["jpegheader"] = keyframe.jpegheader

    @classmethod
    def of(cls, level: Any) -> _ChunkGrid | None:
        """The grid of a pyramid level (a tifffile series), or ``None`` to read it through zarr."""
        try:
            pages = list(level.pages)
            if len(pages) != 1 or pages[0] is None or level.axes not in ("YX", "YXS"):
                return None
            page = pages[0]
            keyframe = page.keyframe
            if (
                keyframe.dtype != np.uint8
                or keyframe.bitspersample != 8
                or keyframe.samplesperpixel not in (1, 3, 4)
                or (keyframe.samplesperpixel > 1 and keyframe.planarconfig != 1)
                or keyframe.imagedepth != 1
                or keyframe.tiledepth != 1
                or (keyframe.is_subsampled and keyframe.compression not in _JPEG_COMPRESSIONS)
            ):
                return None
            return cls(page)
        except Exception:  # an unusual page: the zarr store knows what to do with it
            return None

    def decode(self, data: bytes | None, index: int) -> np.ndarray | None:
        """Chunk ``index`` as ``(rows, columns)`` or ``(rows, columns, samples)``, or ``None``."""
        if data is None:
            return None
        chunk = self._decode(data, index, **self._decode_args)[0]
        if chunk is None:
            return None
        chunk = chunk[0]  # tifffile's (depth, rows, columns, samples), depth 1
        if self.samples == 1:
            chunk = chunk[..., 0]
        if chunk.dtype != np.uint8:
            raise ValueError(f"chunk {index} decoded as {chunk.dtype}, not uint8")
        return chunk


def _paste(out: np.ndarray, chunk: np.ndarray, top: int, left: int) -> None:
    """Copy ``chunk``, whose top-left corner lies at ``(top, left)`` in ``out``, where they meet."""
    r0, c0 = max(top, 0), max(left, 0)
    r1 = min(top + chunk.shape[0], out.shape[0])
    c1 = min(left + chunk.shape[1], out.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = chunk[r0 - top : r1 - top, c0 - left : c1 - left]


def _tiff_hw(shape: Sequence[int], axes: str) -> tuple[int, int]:
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def _tiff_mpp(tif: Any) -> float | None:
    """Microns per pixel from an SVS description or the TIFF resolution tags."""
    page = tif.pages[0]
    description = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
    if match:
        return float(match.group(1))
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if match:
            return float(match.group(1))
    tag = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if tag is None or unit is None:
        return None
    numerator, denominator = tag.value
    if not numerator or not denominator:
        return None
    pixels_per_unit = numerator / denominator
    microns = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre
    if microns is None:
        return None
    return microns / pixels_per_unit
