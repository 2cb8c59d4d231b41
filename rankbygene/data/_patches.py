"""Per-spot image patches of an AnnData, read lazily from each library's image, maybe cached."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from rankbygene._constants import IMAGES_KEY, MAX_SPOT_UPSAMPLING, SPATIAL_KEY
from rankbygene._docs import d
from rankbygene._image import (
    BACKGROUND,
    PATCH_BARCODE_KEYS,
    PATCH_IMAGE_KEYS,
    ArrayImage,
    PatchFile,
    as_rgb_uint8,
    is_lazy_array,
    open_image,
)
from rankbygene._layout import ImageSource, image_sources, spatial_coordinates, spot_libraries
from rankbygene._logging import logger
from rankbygene._progress import progress_bar
from rankbygene.data._settings import ImageSettings

__all__ = ["PatchExtractor"]

_CACHE_FORMAT = 2  # bump when the pixels produced for the same inputs, or the files, change
# A cached patch's entry in the checksum array: this bit, so that no entry of a patch is 0
# (not cached), and the CRC-32 of its pixels, which finds any flipped byte of the patch.
_CACHED = np.uint64(1 << 32)
_OUT_OF_BOUNDS = ("raise", "pad", "drop")
_CACHES = (None, "memory", "disk")
# (image, patch pixels, input size) already reported by check_resolution in this process
_RESOLUTION_REPORTED: set[tuple[Any, ...]] = set()


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
        self._arrays: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        self._rows = np.full(self.n_obs, -1, dtype=np.int64)  # row in a patches file
        self._boxes = np.zeros((self.n_obs, 3), dtype=np.float64)  # x0, y0, side in image pixels
        inside = np.ones(self.n_obs, dtype=bool)
        finite = np.ones(self.n_obs, dtype=bool)  # no NaN or infinite pixel in the patch
        self._nonfinite: dict[str, int] = {}  # library to its image's NaN or infinite pixels
        obs_names = adata.obs_names.astype(str).to_numpy()
        for code, lib in enumerate(libraries):
            source = sources[lib]
            spots = np.flatnonzero(self._library_code == code)
            if source.kind == "patches":
                self._shapes[lib], rows = _match_patch_rows(source, obs_names[spots])
                self._rows[spots] = rows
                inside[spots] = rows >= 0
                continue
            missing = None
            if source.kind == "memory":
                array = _memory_image(adata, source)
                missing = _nonfinite_pixels(array)
                if missing is not None:
                    # NaN and inf have no colour: white, as the glass beyond the image
                    self._nonfinite[lib] = int(np.count_nonzero(missing))
                    array = as_rgb_uint8(array)
                    array[missing] = BACKGROUND
                self._arrays[lib] = array
                self._shapes[lib] = tuple(array.shape[:2])
            else:
                with open_image(source.path) as reader:  # the header only, nothing decoded
                    self._shapes[lib] = tuple(reader.shape)
            side = source.spot_diameter_fullres * self.patch_scale * source.scale
            centres = coords[spots] * source.scale
            self._boxes[spots, 0] = centres[:, 0] - side / 2
            self._boxes[spots, 1] = centres[:, 1] - side / 2
            self._boxes[spots, 2] = side
            inside[spots] = _inside(self._boxes[spots], self._shapes[lib])
            if missing is not None:
                finite[spots] = _pixels_in_boxes(missing, self._boxes[spots]) == 0
        self.check_resolution(sources, self.patch_scale, self.patch_size)
        if self.patch_scale != 1.0:
            fixed = [lib for lib in libraries if sources[lib].kind == "patches"]
            if fixed:
                logger.warning(f"patch_scale is ignored for precomputed patches of {fixed}.")
        self.valid = self._resolve_out_of_bounds(inside, finite)
        self.indices = np.flatnonzero(self.valid)
        self._slot = np.full(self.n_obs, -1, dtype=np.int64)  # position in the cache
        self._slot[self.indices] = np.arange(len(self.indices))

        self.cache = cache
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._store: np.ndarray | None = None  # cached patches, one row per kept spot
        self._sums: np.ndarray | None = None  # per kept spot: 0, or _CACHED | CRC-32 of its patch
        self._repaired = 0  # cached patches found damaged, in this process
        self._cache_path: Path | None = None
        if cache == "disk":
            directory = self.cache_dir or Path(tempfile.gettempdir()) / "rankbygene_patches"
            self._cache_path = directory / f"patches_{self._cache_digest()}.npy"
            self._open_disk_cache(create=True)
        elif cache == "memory":
            self._allocate_memory_cache()

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
        if self._store is None and self.cache == "disk":
            self._open_disk_cache(create=False)
        if self._sums is not None and self._sums[slot]:
            patch = np.array(self._store[slot])
            if self.cache != "disk" or self._sums[slot] == _patch_sum(patch):
                return patch
            self._report_damage(i)  # changed on disk: read again, and cached again
        patch = self._read(i)
        if self._store is not None:
            self._cache_patch(slot, patch)
        return patch

    def __iter__(self) -> Iterator[np.ndarray]:
        """Patches of the kept spots, in AnnData order."""
        for i in self.indices:
            yield self[i]

    @property
    def n_cached(self) -> int:
        """Number of kept spots whose patch is in the cache."""
        if self.cache is None:
            return 0
        if self._sums is None and self.cache == "disk":
            self._open_disk_cache(create=False)
        return int(np.count_nonzero(self._sums))

    @property
    def cache_path(self) -> Path | None:
        """The ``.npy`` file of the disk cache (its checksums are beside it), else ``None``."""
        return self._cache_path

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
        if self.cache is None:
            raise ValueError("materialize() needs a cache: pass cache='memory' or cache='disk'.")
        if self._store is None:
            self._open_disk_cache(create=True)
        todo = np.flatnonzero(self._sums == 0)
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
                    self._cache_patch(slot, self._read(int(self.indices[slot])))
                    bar.update()
                self._release(lib)  # one decoded image at a time
                self._flush()
        finally:
            bar.close()
            self._flush()
        where = f"in {self._cache_path}" if self.cache == "disk" else "in memory"
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
        self._flush()

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
        if self.cache == "disk":
            state["_store"] = state["_sums"] = None  # reopened as a shared memory map
        elif self._sums is not None and not self._sums.any():
            state["_store"] = state["_sums"] = None  # nothing worth shipping
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
        if self.cache == "memory" and self._store is None:
            self._allocate_memory_cache()

    def __repr__(self) -> str:
        kept = f"{len(self.indices)}/{self.n_obs} spots"
        return (
            f"PatchExtractor({kept}, {len(self.libraries)} libraries, "
            f"patch_size={self.patch_size}, patch_scale={self.patch_scale}, cache={self.cache!r})"
        )

    @staticmethod
    def check_resolution(
        sources: Mapping[str, ImageSource],
        patch_scale: float,
        input_size: int,
        action: Literal["warn", "raise"] = "warn",
    ) -> list[str]:
        """Report the libraries whose patches are upsampled more than their kind allows.

        A patch spans ``spot_diameter_fullres * patch_scale * scale`` pixels of its image and is
        resized to ``input_size``. Tiles of a whole slide (libraries with a ``tile_size_um``,
        written by :func:`~rankbygene.pp.tile_slide`) have the size the user chose: tiles that
        span fewer pixels than ``input_size`` are upsampled (blurry, and not the scale the
        encoder learnt), a :class:`UserWarning`. A spot's diameter is fixed by the assay and
        some upsampling is the norm: beyond ``MAX_SPOT_UPSAMPLING`` times, a logged warning.
        Each library's image is reported once per process at a given geometry: an extractor
        checks its libraries when it is built, and :func:`~rankbygene.tl.embed_slides` each
        slide before tiling it. Precomputed patches are not checked.

        Parameters
        ----------
        sources
            Library id to :class:`~rankbygene._layout.ImageSource` (an extractor's
            :attr:`sources`).
        patch_scale
            Patch side in spot (or tile) diameters.
        input_size
            Side in pixels that patches are resized to (the encoder's input).
        action
            For tiles: ``"warn"``, or ``"raise"`` a :class:`ValueError` (every time).

        Returns
        -------
        The library ids whose patches are upsampled more than allowed.

        Examples
        --------
        >>> patches = PatchExtractor(tiles, patch_size=224)  # doctest: +SKIP
        >>> PatchExtractor.check_resolution(patches.sources, 1.0, 224)  # doctest: +SKIP
        []
        """
        faults, tiles = [], []
        for lib, source in sources.items():
            if source.kind == "patches":
                continue
            pixels = source.spot_diameter_fullres * patch_scale * source.scale
            is_tile = source.tile_size_um is not None
            if pixels >= (input_size if is_tile else input_size / MAX_SPOT_UPSAMPLING):
                continue
            faults.append(lib)
            image = source.path if source.path is not None else (lib, source.image_key)
            reported = (str(image), round(pixels, 3), int(input_size))
            if action == "warn" and reported in _RESOLUTION_REPORTED:
                continue
            if is_tile:
                where = source.path or "in memory"
                tiles.append(
                    f"{lib!r} ({where}): tiles of {source.tile_size_um:g} um span {pixels:.0f} px"
                )
            else:
                logger.warning(
                    f"Library {lib!r}: a patch spans {pixels:.1f} pixels of its {source.kind} "
                    f"image, upsampled to {input_size}: patches will be blurry (use a "
                    "higher-resolution image)."
                )
            if action == "warn":
                _RESOLUTION_REPORTED.add(reported)
        if tiles:
            message = (
                f"Tiles smaller than the encoder's input of {input_size} px are upsampled "
                f"(blurry): {'; '.join(tiles)}. Tile with a larger tile_size_um, or use a model "
                "with a smaller input_size."
            )
            if action == "raise":
                raise ValueError(message)
            warnings.warn(message, UserWarning, stacklevel=2)
        return faults

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
            reader = PatchFile(source.patches_path)
        else:
            reader = open_image(source.path)
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

    # ------------------------------------------------------------------ validation

    def _resolve_out_of_bounds(self, inside: np.ndarray, finite: np.ndarray) -> np.ndarray:
        """Spots kept; spots whose patch leaves the image or holds NaN pixels counted first.

        ``"raise"`` names them in an error, ``"pad"`` in a warning, ``"drop"`` in the log.
        """
        outside = ~inside
        nonfinite = ~finite & inside
        lacking = outside | nonfinite  # spots whose patch misses some of its pixels
        if not lacking.any():
            return np.ones(self.n_obs, dtype=bool)
        precomputed = np.array([self.sources[lib].kind == "patches" for lib in self.libraries])
        no_row = outside & precomputed[self._library_code]
        beyond = outside & ~no_row
        found = []
        if beyond.any():
            away = beyond & self._entirely_outside()
            found.append(
                f"{int(beyond.sum())} spots whose patch extends beyond the image "
                f"({self._per_library(beyond)})"
                + (f", {int(away.sum())} of them entirely outside it" if away.any() else "")
            )
        if no_row.any():
            found.append(
                f"{int(no_row.sum())} spots that have no row in the patches file "
                f"({self._per_library(no_row)})"
            )
        if nonfinite.any():
            pixels = ", ".join(f"{lib!r}: {n}" for lib, n in self._nonfinite.items())
            found.append(
                f"{int(nonfinite.sum())} spots whose patch holds NaN or infinite pixels "
                f"({self._per_library(nonfinite)}; such pixels per image: {pixels})"
            )
        found = " and ".join(found)
        if outside.all():
            hint = (
                " None has a patch: are obsm coordinates in full-resolution pixels, and is the "
                "image the one they refer to?"
            )
        else:
            hint = ""
        if self.out_of_bounds == "pad":
            warnings.warn(
                f"{found}: their missing pixels are white (out_of_bounds='pad').{hint}",
                UserWarning,
                stacklevel=3,
            )
            return np.ones(self.n_obs, dtype=bool)
        if self.out_of_bounds == "drop":
            if lacking.all():
                raise ValueError(f"All {self.n_obs} spots would be dropped: {found}.{hint}")
            logger.info(f"dropped {found}")
            return ~lacking
        raise ValueError(
            f"{found}. Pass out_of_bounds='pad' to fill the missing pixels with white, or "
            f"out_of_bounds='drop' to exclude them.{hint}"
        )

    def _per_library(self, spots: np.ndarray) -> str:
        """``'lib': n of total`` for each library with some of ``spots``."""
        counts = []
        for code, lib in enumerate(self.libraries):
            of_library = self._library_code == code
            n = int(np.count_nonzero(spots & of_library))
            if n:
                counts.append(f"{lib!r}: {n} of {int(np.count_nonzero(of_library))}")
        return ", ".join(counts)

    def _entirely_outside(self) -> np.ndarray:
        """Spots whose patch box does not meet its image at all (precomputed patches: none)."""
        away = np.zeros(self.n_obs, dtype=bool)
        for code, lib in enumerate(self.libraries):
            if self.sources[lib].kind == "patches":
                continue
            spots = self._library_code == code
            x0, y0, side = self._boxes[spots].T
            height, width = self._shapes[lib]
            away[spots] = (x0 + side <= 0) | (y0 + side <= 0) | (x0 >= width) | (y0 >= height)
        return away

    # ------------------------------------------------------------------ caches

    def _allocate_memory_cache(self) -> None:
        size = self.patch_size
        # np.empty commits no memory until a patch is written
        self._store = np.empty((len(self.indices), size, size, 3), dtype=np.uint8)
        self._sums = np.zeros(len(self.indices), dtype=np.uint64)

    def _cache_patch(self, slot: int, patch: np.ndarray) -> None:
        self._store[slot] = patch
        self._sums[slot] = _patch_sum(patch)  # after the pixels: a reader never sees half a patch

    def _report_damage(self, i: int) -> None:
        self._repaired += 1
        if self._repaired == 1:
            logger.warning(
                f"Patch cache {self._cache_path}: the patch of spot {i} does not match its "
                "checksum (the file changed on disk): it is read again from the image. Other "
                "damaged patches are read again without a message."
            )

    def _open_disk_cache(self, create: bool) -> None:
        """Map the cache's pixels and their checksums, rebuilding a file that is damaged.

        ``create=False`` (a process that received the extractor) requires both files to exist.
        """
        path = self._cache_path
        sums_path = path.with_suffix(".sums.npy")
        shape = (len(self.indices), self.patch_size, self.patch_size, 3)
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

    def _flush(self) -> None:
        if self.cache == "disk" and self._store is not None:
            self._store.flush()
            self._sums.flush()

    def _cache_digest(self) -> str:
        """Hash of everything that determines the cached pixels and their order."""
        h = hashlib.blake2b(digest_size=16)

        def add(*parts: Any) -> None:
            for part in parts:
                h.update(part if isinstance(part, bytes | memoryview) else repr(part).encode())
                h.update(b"\x00")

        add(_CACHE_FORMAT, self.patch_scale, self.patch_size, len(self.indices))
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
                add(memoryview(np.ascontiguousarray(self._arrays[lib])).cast("B"))
            else:
                path = source.path if source.kind == "file" else source.patches_path
                stat = path.stat()
                add(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
                if source.kind == "patches":
                    add(self._rows[self._library_code == self.libraries.index(lib)].tobytes())
        return h.hexdigest()


def _match_patch_rows(source: ImageSource, names: np.ndarray) -> tuple[tuple[int, int], np.ndarray]:
    """Shape of the stored patches and, per spot, its row in the file (-1 when absent)."""
    path = source.patches_path
    try:
        with PatchFile(path) as patches:
            for key, candidates in (
                (patches.image_key, PATCH_IMAGE_KEYS),
                (patches.barcode_key, PATCH_BARCODE_KEYS),
            ):
                if key is None:
                    raise KeyError(
                        f"Patches file {path} (library {source.library_id!r}) has no dataset "
                        f"{candidates[0]!r} (datasets: {patches.datasets})."
                    )
            shape = patches.image_shape
            barcodes = patches.barcodes()
    except OSError as err:
        raise ValueError(f"Could not read patches file {path}: {err}") from err
    if len(shape) != 4 or shape[-1] not in (3, 4) or shape[0] != len(barcodes):
        raise ValueError(
            f"Patches file {path}: {PATCH_IMAGE_KEYS[0]!r} must be (N, h, w, 3) with one barcode "
            f"per row; got {shape} and {len(barcodes)} barcodes."
        )
    row_of = {barcode: row for row, barcode in enumerate(barcodes)}
    rows = np.array([row_of.get(str(name), -1) for name in names], dtype=np.int64)
    return (int(shape[1]), int(shape[2])), rows


def _memory_image(adata: AnnData, source: ImageSource) -> np.ndarray:
    image = adata.uns[SPATIAL_KEY][source.library_id][IMAGES_KEY][source.image_key]
    # a lazy (dask) image, e.g. a SpatialData element, stays lazy: patches read their regions
    array = image if is_lazy_array(image) else np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"adata.uns[{SPATIAL_KEY!r}][{source.library_id!r}][{IMAGES_KEY!r}]"
            f"[{source.image_key!r}] must be "
            f"(H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}."
        )
    return array


def _inside(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Whether each box lies in the image, with the rounding that ``read_region`` applies."""
    height, width = shape
    x0 = np.floor(boxes[:, 0])
    y0 = np.floor(boxes[:, 1])
    side = np.maximum(1, np.round(boxes[:, 2]))
    return (x0 >= 0) & (y0 >= 0) & (x0 + side <= width) & (y0 + side <= height)


def _patch_sum(patch: np.ndarray) -> np.uint64:
    """A cached patch's checksum entry: ``_CACHED`` with the CRC-32 of its pixels."""
    return _CACHED | np.uint64(zlib.crc32(np.ascontiguousarray(patch).data))


def _nonfinite_pixels(array: Any) -> np.ndarray | None:
    """``(H, W)`` mask of an in-memory float image's NaN or infinite pixels; ``None`` if none.

    Lazy arrays are not read whole for this; their pixels are converted as they are read.
    """
    if is_lazy_array(array) or array.dtype.kind != "f":
        return None
    missing = ~np.isfinite(array)
    if missing.ndim == 3:
        missing = missing.any(axis=-1)
    return missing if missing.any() else None


def _pixels_in_boxes(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` in each box, with the rounding that ``read_region`` applies."""
    height, width = mask.shape
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    side = np.maximum(1, np.round(boxes[:, 2])).astype(np.int64)
    x0 = np.floor(boxes[:, 0]).astype(np.int64)
    y0 = np.floor(boxes[:, 1]).astype(np.int64)
    c0, c1 = np.clip(x0, 0, width), np.clip(x0 + side, 0, width)
    r0, r1 = np.clip(y0, 0, height), np.clip(y0 + side, 0, height)
    return table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]


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
    if out_of_bounds not in _OUT_OF_BOUNDS:
        raise ValueError(f"out_of_bounds must be one of {_OUT_OF_BOUNDS}; got {out_of_bounds!r}.")
    if cache not in _CACHES:
        raise ValueError(f"cache must be None, 'memory' or 'disk'; got {cache!r}.")
    if isinstance(max_open_images, bool) or not isinstance(max_open_images, int | np.integer):
        raise ValueError(f"max_open_images must be a positive int; got {max_open_images!r}.")
    if max_open_images < 1:
        raise ValueError(f"max_open_images must be at least 1; got {max_open_images}.")
