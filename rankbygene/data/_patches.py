"""Per-spot image patches of an AnnData, read lazily from each library's image, maybe cached."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from rankbygene._docs import d
from rankbygene._image import BACKGROUND, ArrayImage, PatchFile, is_lazy_array, open_image
from rankbygene._layout import image_sources, spatial_coordinates, spot_libraries
from rankbygene._layout._keys import SPATIAL_KEY
from rankbygene._logging import logger
from rankbygene._progress import progress_bar
from rankbygene.data._patch_cache import CACHE_FORMAT, PatchCache
from rankbygene.data._patch_geometry import OUT_OF_BOUNDS, PatchGeometry, check_resolution
from rankbygene.data._settings import ImageSettings

__all__ = ["PatchExtractor"]

_CACHES = (None, "memory", "disk")


@d.dedent
class PatchExtractor:
    """Image patches centred on the spots of an AnnData, one or several libraries.

    The patch of a spot is the square of side ``spot_diameter_fullres * patch_scale``
    full-resolution pixels centred on ``obsm[spatial_key]``, read from the library's image (the
    ``metadata["source_image_path"]`` file, lazily, else the sharpest in-memory image in ``uns``,
    with its scale factor) and resized to ``patch_size``. Libraries with no image but a
    ``metadata["patches_path"]`` HDF5 of precomputed patches (HEST-1k) read the row whose
    ``barcode`` is the spot's obs name, resized to ``patch_size``.

    Everything is validated at construction, before any pixel is decoded. At most
    ``max_open_images`` images are open at a time (least recently used closed first), so a cohort
    of full-resolution slides is never in memory at once; open images are not pickled, so the
    extractor travels into DataLoader workers, which reopen images as needed.

    Parameters
    ----------
    adata
        AnnData in the scanpy/squidpy spatial layout. Only what is needed is kept (coordinates,
        library of each spot, image sources, references to in-memory images); it is not modified.
    %(library_key)s
    spatial_key
        Key in ``obsm`` of the spot centres ``(x, y)`` in full-resolution pixels.
    image_key
        Use this in-memory image (e.g. ``"hires"``) of each library instead of its source file.
    patch_scale
        Patch side in spot diameters (more than 1 adds context around the spot).
    patch_size
        Side in pixels of the returned patches (the encoder's input size).
    out_of_bounds
        Spots whose patch misses pixels: it extends beyond the image, holds NaN or infinite
        pixels (of an in-memory float image), or, for precomputed patches, the spot has no row
        in the file. ``"pad"`` the missing pixels with white, with a warning counting them
        per library (the default, throughout the package), ``"raise"`` an error counting
        them, or ``"drop"`` them (see :attr:`valid` and :attr:`indices`).
    cache
        Keep decoded patches: ``"memory"`` (a uint8 array of all kept patches) or ``"disk"`` (a
        ``.npy`` memory map under ``cache_dir``, reused by later runs on the same inputs).
        :meth:`materialize` fills it. ``None`` decodes on every access.
    cache_dir
        Folder of the disk cache; by default ``rankbygene_patches`` in the system temporary folder.
    max_open_images
        Images kept open (decoded, for JPEG/PNG) at once.

    Attributes
    ----------
    n_obs
        Number of spots in the AnnData.
    valid
        Boolean mask over ``adata.obs`` of the spots that have a patch (all but the dropped ones).
    indices
        Positions in the AnnData of those spots (``np.flatnonzero(valid)``).
    libraries
        Library ids, in order of first appearance.
    sources
        Library id to :class:`~rankbygene._layout.ImageSource`.

    Notes
    -----
    Indexing is by position in the AnnData: ``extractor[i]`` is the patch of ``adata.obs_names[i]``
    and ``len(extractor) == adata.n_obs``; a dropped spot raises ``ValueError``, so iterate over
    :attr:`indices`. Random access across libraries reopens (and, for JPEG/PNG, fully decodes)
    images; for training, use a cache and call :meth:`materialize` first (in the main process, so
    that DataLoader workers share it).

    Examples
    --------
    >>> import numpy as np
    >>> from anndata import AnnData
    >>> from rankbygene.data import PatchExtractor
    >>> adata = AnnData(np.zeros((2, 1)), obsm={"spatial": np.array([[20.0, 20.0], [60.0, 30.0]])})
    >>> adata.uns["spatial"] = {"lib": {
    ...     "images": {"hires": np.zeros((50, 100, 3), np.uint8)},
    ...     "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 16.0}}}
    >>> patches = PatchExtractor(adata, patch_size=32)
    >>> patches[1].shape, patches[1].dtype
    ((32, 32, 3), dtype('uint8'))
    """

    def __init__(
        self,
        adata: AnnData,
        library_key: str | None = None,
        spatial_key: str = SPATIAL_KEY,
        image_key: str | None = None,
        patch_scale: float = 1.0,
        patch_size: int = 224,
        out_of_bounds: Literal["raise", "pad", "drop"] = "pad",
        cache: Literal["memory", "disk"] | None = None,
        cache_dir: str | Path | None = None,
        max_open_images: int = 1,
    ) -> None:
        _check_options(patch_scale, patch_size, out_of_bounds, cache, max_open_images)
        if adata.n_obs == 0:
            raise ValueError("adata has no spots (n_obs == 0).")
        coords = spatial_coordinates(adata, spatial_key)
        spot_library = spot_libraries(adata, library_key)
        libraries = list(dict.fromkeys(str(lib) for lib in spot_library))
        sources = image_sources(adata, libraries, image_key=image_key)

        self.n_obs = adata.n_obs
        self.patch_scale = float(patch_scale)
        self.patch_size = int(patch_size)
        self.out_of_bounds = out_of_bounds
        self.max_open_images = int(max_open_images)
        self.libraries = libraries
        self.sources = sources
        # codes in order of first appearance, so they index self.libraries
        order = {lib: i for i, lib in enumerate(libraries)}
        self._library_code = np.array([order[str(lib)] for lib in spot_library], dtype=np.int32)
        self._coords = coords
        geometry = PatchGeometry(
            adata, sources, libraries, self._library_code, coords, self.patch_scale
        )
        self._arrays, self._shapes = geometry.arrays, geometry.shapes
        self._rows = geometry.rows  # row in a patches file
        self._boxes = geometry.boxes  # x0, y0, side in image pixels
        self.check_resolution(sources, self.patch_scale, self.patch_size)
        if self.patch_scale != 1.0:
            fixed = [lib for lib in libraries if sources[lib].kind == "patches"]
            if fixed:
                logger.warning(f"patch_scale is ignored for precomputed patches of {fixed}.")
        self.valid = geometry.kept(out_of_bounds)
        self.indices = np.flatnonzero(self.valid)
        self._slot = np.full(self.n_obs, -1, dtype=np.int64)  # position in the cache
        self._slot[self.indices] = np.arange(len(self.indices))

        self.cache = cache
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._cache: PatchCache | None = None  # one slot per kept spot
        if cache == "disk":
            directory = self.cache_dir or Path(tempfile.gettempdir()) / "rankbygene_patches"
            path = directory / f"patches_{self._cache_digest()}.npy"
            self._cache = PatchCache(len(self.indices), self.patch_size, path)
        elif cache == "memory":
            self._cache = PatchCache(len(self.indices), self.patch_size)

        self._readers: OrderedDict[str, Any] = OrderedDict()
        self._inherited: list[Any] = []
        self._pid = os.getpid()
        self._opened: set[str] = set()
        self._reopens = 0
        self._warned_thrash = False

    @classmethod
    @d.dedent
    def from_settings(
        cls,
        adata: AnnData,
        settings: ImageSettings,
        library_key: str | None = None,
        out_of_bounds: Literal["raise", "pad", "drop"] = "pad",
        cache: Literal["memory", "disk"] | None = None,
        cache_dir: str | Path | None = None,
    ) -> PatchExtractor:
        """Patches of ``adata`` with a model's geometry: its keys, patch scale and input size.

        Parameters
        ----------
        adata
            AnnData in the scanpy/squidpy spatial layout.
        settings
            The model's :class:`~rankbygene.data.ImageSettings` (``model.image_settings``).
        %(library_key_model)s
        out_of_bounds, cache, cache_dir
            As for the constructor.

        Examples
        --------
        >>> patches = PatchExtractor.from_settings(adata, model.image_settings)  # doctest: +SKIP
        """
        return cls(
            adata,
            library_key=settings.library_column(adata, library_key),
            spatial_key=settings.spatial_key,
            image_key=settings.image_key,
            patch_scale=settings.patch_scale,
            patch_size=settings.patch_size,
            out_of_bounds=out_of_bounds,
            cache=cache,
            cache_dir=cache_dir,
        )

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return self.n_obs

    def __getitem__(self, index: int) -> np.ndarray:
        """The uint8 ``(patch_size, patch_size, 3)`` patch of the spot at AnnData position ``i``."""
        if isinstance(index, slice | np.ndarray | list | tuple):
            raise TypeError("Index one spot at a time (an int position in the AnnData).")
        i = int(index)
        if i < 0:
            i += self.n_obs
        if not 0 <= i < self.n_obs:
            raise IndexError(f"Spot {index} is out of range for {self.n_obs} spots.")
        slot = self._slot[i]
        if slot < 0:
            raise ValueError(
                f"Spot {i} was dropped (out_of_bounds='drop'): its patch leaves the image. "
                "Iterate over .indices, the spots kept."
            )
        if self._cache is None:
            return self._read(i)
        patch = self._cache.get(slot, spot=i)
        if patch is None:  # not cached yet, or damaged on disk: read, and cached again
            patch = self._read(i)
            self._cache.put(slot, patch)
        return patch

    def __iter__(self) -> Iterator[np.ndarray]:
        """Patches of the kept spots, in AnnData order."""
        for i in self.indices:
            yield self[int(i)]

    @property
    def n_cached(self) -> int:
        """Number of kept spots whose patch is in the cache."""
        return 0 if self._cache is None else self._cache.n_cached

    @property
    def cache_path(self) -> Path | None:
        """The ``.npy`` file of the disk cache (its checksums are beside it), else ``None``."""
        return None if self._cache is None else self._cache.path

    @property
    def open_libraries(self) -> tuple[str, ...]:
        """Libraries whose image is open in this process, least recently used first."""
        self._check_process()
        return tuple(self._readers)

    def materialize(self, progress: bool = True) -> PatchExtractor:
        """Fill the cache, library by library, one image open at a time.

        Spots already cached (e.g. by an earlier run with the disk cache) are skipped; an
        interrupted run keeps what it filled.

        Parameters
        ----------
        progress
            Show a progress bar.

        Returns
        -------
        The extractor itself.

        Examples
        --------
        >>> patches = PatchExtractor(adata, cache="disk").materialize()  # doctest: +SKIP
        """
        if self._cache is None:
            raise ValueError("materialize() needs a cache: pass cache='memory' or cache='disk'.")
        todo = self._cache.missing()
        n_before = len(self.indices) - len(todo)
        bar = progress_bar(
            total=len(todo), disable=not progress, desc="Extracting patches", unit="patch"
        )
        try:
            codes = self._library_code[self.indices[todo]]
            for code, lib in enumerate(self.libraries):
                slots = todo[codes == code]
                if not len(slots):
                    continue
                bar.set_postfix_str(lib, refresh=False)
                for slot in slots:
                    self._cache.put(slot, self._read(int(self.indices[slot])))
                    bar.update()
                self._release(lib)  # one decoded image at a time
                self._cache.flush()
        finally:
            bar.close()
            self._cache.flush()
        where = f"in {self._cache.path}" if self.cache == "disk" else "in memory"
        logger.info(
            f"cached {len(todo)} patches {where} ({n_before} were already cached; "
            f"{len(self.indices)} in all)"
        )
        return self

    def close(self) -> None:
        """Close open images and flush the disk cache."""
        self._check_process()
        for lib in list(self._readers):
            self._release(lib)
        if self._cache is not None:
            self._cache.flush()

    def __enter__(self) -> PatchExtractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Open files and decoded images stay behind; the receiver reopens what it needs.
        state["_readers"] = OrderedDict()
        state["_inherited"] = []
        state["_pid"] = None
        return state  # the cache pickles itself: a disk cache as its files' path

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        kept = f"{len(self.indices)}/{self.n_obs} spots"
        return (
            f"PatchExtractor({kept}, {len(self.libraries)} libraries, "
            f"patch_size={self.patch_size}, patch_scale={self.patch_scale}, cache={self.cache!r})"
        )

    # a check of the geometry alone: tl.embed_slides also runs it on slides before tiling them
    check_resolution = staticmethod(check_resolution)

    # ------------------------------------------------------------------ reading

    def _read(self, i: int) -> np.ndarray:
        lib = self.libraries[self._library_code[i]]
        handle = self._handle(lib)
        if self.sources[lib].kind == "patches":
            row = self._rows[i]
            if row < 0:
                return np.full((self.patch_size, self.patch_size, 3), BACKGROUND, dtype=np.uint8)
            return handle.read(int(row), self.patch_size)
        x0, y0, side = self._boxes[i]
        downsample = self.sources[lib].read_downsample  # a LazySlide tile spec's level
        return handle.read_region(x0, y0, side, side, self.patch_size, downsample)

    def _handle(self, lib: str) -> Any:
        self._check_process()
        reader = self._readers.get(lib)
        if reader is not None:
            self._readers.move_to_end(lib)
            return reader
        source = self.sources[lib]
        if source.kind == "memory":
            array = self._arrays[lib]
            if array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3:
                return ArrayImage(array)  # a view: costs nothing, so not counted as open
        # close before opening, so that no more than max_open_images are ever open
        while len(self._readers) >= self.max_open_images:
            self._release(next(iter(self._readers)))
        if source.kind == "memory":
            reader = open_image(self._arrays[lib])  # a converted copy
        elif source.kind == "patches":
            reader = PatchFile(source.file)
        else:
            reader = open_image(source.file)
        if lib in self._opened and source.kind != "memory":
            self._reopens += 1
            self._warn_thrash()
        self._opened.add(lib)
        self._readers[lib] = reader
        return reader

    def _release(self, lib: str) -> None:
        reader = self._readers.pop(lib, None)
        if reader is not None:
            reader.close()

    def _check_process(self) -> None:
        # A forked DataLoader worker inherits the parent's open files: sharing a file offset
        # with the parent is unsafe, so it opens its own and leaves the inherited ones untouched.
        if self._pid != os.getpid():
            self._inherited.extend(self._readers.values())
            self._readers = OrderedDict()
            self._pid = os.getpid()

    def _warn_thrash(self) -> None:
        if self._warned_thrash or self._reopens < max(3, len(self.libraries)):
            return
        self._warned_thrash = True
        logger.warning(
            f"Images were reopened {self._reopens} times: spots are read across libraries in an "
            f"order that defeats max_open_images={self.max_open_images}. Use cache='memory' or "
            "'disk' with materialize(), or raise max_open_images."
        )

    # ------------------------------------------------------------------ cache

    def _cache_digest(self) -> str:
        """Hash of everything that determines the cached pixels and their order."""
        h = hashlib.blake2b(digest_size=16)

        def add(*parts: Any) -> None:
            for part in parts:
                h.update(part if isinstance(part, bytes | memoryview) else repr(part).encode())
                h.update(b"\x00")

        add(CACHE_FORMAT, self.patch_scale, self.patch_size, len(self.indices))
        add(self.indices.astype(np.int64).tobytes(), self._coords.tobytes())
        add(self._library_code.tobytes(), tuple(self.libraries))
        for lib in self.libraries:
            source = self.sources[lib]
            add(lib, source.kind, source.scale, source.spot_diameter_fullres, self._shapes[lib])
            if source.kind == "memory" and is_lazy_array(self._arrays[lib]):
                # a dask array's name is a token of its source and graph: no pixel is read
                array = self._arrays[lib]
                add(type(array).__name__, getattr(array, "name", None), str(array.dtype))
            elif source.kind == "memory":
                add(np.ascontiguousarray(self._arrays[lib]).data.cast("B"))
            else:
                path = source.file
                stat = path.stat()
                add(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
                if source.kind == "patches":
                    add(self._rows[self._library_code == self.libraries.index(lib)].tobytes())
        return h.hexdigest()


def _check_options(
    patch_scale: float,
    patch_size: int,
    out_of_bounds: str,
    cache: str | None,
    max_open_images: int,
) -> None:
    if not (isinstance(patch_scale, int | float) and np.isfinite(patch_scale) and patch_scale > 0):
        raise ValueError(f"patch_scale must be a positive number; got {patch_scale!r}.")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int | np.integer):
        raise ValueError(f"patch_size must be a positive int; got {patch_size!r}.")
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive int; got {patch_size!r}.")
    if out_of_bounds not in OUT_OF_BOUNDS:
        raise ValueError(f"out_of_bounds must be one of {OUT_OF_BOUNDS}; got {out_of_bounds!r}.")
    if cache not in _CACHES:
        raise ValueError(f"cache must be None, 'memory' or 'disk'; got {cache!r}.")
    if isinstance(max_open_images, bool) or not isinstance(max_open_images, int | np.integer):
        raise ValueError(f"max_open_images must be a positive int; got {max_open_images!r}.")
    if max_open_images < 1:
        raise ValueError(f"max_open_images must be at least 1; got {max_open_images}.")
