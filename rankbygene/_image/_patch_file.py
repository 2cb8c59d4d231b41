"""Files of precomputed patches (HEST-1k's ``patches/<id>.h5``): the one reader of their schema.

Such a file holds the patches ``img`` ``(N, h, w, 3)``, the spot of each, ``barcode`` ``(N,)``
or ``(N, 1)`` (bytes or strings), and their positions ``coords`` ``(N, 2)``; some files name
them ``imgs``/``images`` and ``barcodes``. ``read_hest`` checks a file against the spots, the
layout checks decode its first patch, and :class:`~rankbygene.data.PatchExtractor` reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import h5py

from rankbygene._image._base import as_rgb_uint8, resize

__all__ = ["PATCH_BARCODE_KEYS", "PATCH_COORDS_KEY", "PATCH_IMAGE_KEYS", "PatchFile"]

#: Names of the dataset of patches, of their barcodes (the spots' obs names) and positions.
PATCH_IMAGE_KEYS = ("img", "imgs", "images")
PATCH_BARCODE_KEYS = ("barcode", "barcodes")
PATCH_COORDS_KEY = "coords"


class PatchFile:
    """An HDF5 file of precomputed patches, open for reading.

    Parameters
    ----------
    path
        The file.

    Attributes
    ----------
    path
        The file.
    image_key, barcode_key
        Name of its dataset of patches, and of barcodes; ``None`` where it has none.

    Raises
    ------
    OSError
        The file is missing or not HDF5 (h5py's error).

    Examples
    --------
    >>> with PatchFile("patches/TENX95.h5") as patches:  # doctest: +SKIP
    ...     first = patches.read(0, size=224)
    """

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        self.image_key = next((k for k in PATCH_IMAGE_KEYS if k in self._file), None)
        self.barcode_key = next((k for k in PATCH_BARCODE_KEYS if k in self._file), None)
        self._images = None if self.image_key is None else self._file[self.image_key]

    @property
    def datasets(self) -> list[str]:
        """Names of the file's top-level datasets and groups."""
        return list(self._file.keys())

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of the dataset of patches, ``(N, h, w, 3)`` in a valid file."""
        return tuple(self._patch_dataset().shape)

    @property
    def n_coords(self) -> int | None:
        """Number of rows of ``coords``; ``None`` where the file has none."""
        return self._file[PATCH_COORDS_KEY].shape[0] if PATCH_COORDS_KEY in self._file else None

    def _patch_dataset(self) -> h5py.Dataset:
        if self._images is None:
            raise KeyError(
                f"{self.path} holds no dataset of patches (looked for {list(PATCH_IMAGE_KEYS)})."
            )
        return self._images

    def barcodes(self) -> list[str]:
        """The barcode of each row, as strings."""
        values = np.asarray(self._file[self.barcode_key][()]).reshape(-1)
        return [b.decode() if isinstance(b, bytes) else str(b) for b in values]

    def read(self, row: int, size: int | None = None) -> np.ndarray:
        """Row ``row``'s patch as RGB uint8, resized to ``size`` x ``size`` when given."""
        name = f"{self.path}[{self.image_key!r}][{row}]"
        patch = as_rgb_uint8(np.asarray(self._patch_dataset()[row]), name=name)
        return resize(np.ascontiguousarray(patch), size)

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> PatchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
