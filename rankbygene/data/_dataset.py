"""A torch Dataset of spots: image patches (one or two views) or features, expression, extras."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch.utils.data import Dataset

from rankbygene.data._constants import BATCH_KEYS
from rankbygene.data._patches import PatchExtractor
from rankbygene.data._transforms import eval_transform, strong_transform, weak_transform

__all__ = ["SpotPatchDataset"]

_RESERVED = (
    BATCH_KEYS.image,
    BATCH_KEYS.image_weak,
    BATCH_KEYS.features,
    BATCH_KEYS.features_weak,
    BATCH_KEYS.expression,
    BATCH_KEYS.index,
)

Transform = Callable[[np.ndarray], torch.Tensor]


class SpotPatchDataset(Dataset):
    """Per spot: its image patch (one or two views) or features, expression and extra values.

    Each item is a dict of tensors, ready for :class:`torch.utils.data.DataLoader` and its default
    collate:

    - ``"image"``: float32 ``(3, S, S)``, the first view (patches);
    - ``"image_weak"``: the second view, when ``n_views=2``;
    - ``"features"``: float32 ``(n_features,)``, in place of the image with ``features``;
    - ``"features_weak"``: float32 ``(n_features,)``, the plain view, with features with views;
    - ``"expression"``: float32 ``(n_genes,)``, when ``expression`` is given;
    - ``"index"``: int64, the spot's position in the AnnData;
    - one entry per key of ``extra``.

    Precomputed features (e.g. of a frozen or foundation-model encoder) replace the patches when
    ``features`` is given instead of ``patches``. Features with views, ``(n_obs, n_views,
    n_features)``, hold the plain patch's features at view 0 and augmented views after it: with
    ``random_views`` the student (``"features"``) gets a random augmented view and the teacher
    (``"features_weak"``) view 0; otherwise both get view 0.

    Parameters
    ----------
    patches
        The patch extractor of the AnnData; ``None`` with ``features``.
    expression
        ``(n_obs, n_genes)`` dense array or scipy sparse matrix, rows in AnnData order (e.g.
        ``adata.X`` or ``adata.layers["counts"]``); sparse rows are densified per item.
    indices
        Positions in the AnnData of the spots to serve (or a boolean mask over ``obs``); the
        extractor's kept spots (:attr:`PatchExtractor.indices`), or all spots with
        ``features``, by default.
    transform
        uint8 ``(H, W, 3)`` patch -> tensor. One callable (applied independently to each view)
        or one per view. Default: :func:`eval_transform` for one view; (:func:`strong_transform`,
        :func:`weak_transform`) for two. Patches only.
    n_views
        1, or 2 for the student/teacher pair. Patches only (features carry their views).
    extra
        Name -> ``(n_obs, ...)`` per-spot numeric arrays, added to each item.
    features
        ``(n_obs, n_features)`` or ``(n_obs, n_views, n_features)`` numeric array of
        precomputed image features, rows in AnnData order, served as float32 instead of patches.
    random_views
        With features with views: the student gets a random augmented view (training).

    Examples
    --------
    >>> from torch.utils.data import DataLoader
    >>> from rankbygene.data import PatchExtractor, SpotPatchDataset
    >>> dataset = SpotPatchDataset(PatchExtractor(adata), expression=adata.X)  # doctest: +SKIP
    >>> batch = next(iter(DataLoader(dataset, batch_size=32, num_workers=2)))  # doctest: +SKIP
    >>> batch["image"].shape  # doctest: +SKIP
    torch.Size([32, 3, 224, 224])

    Precomputed features, a plain view and three augmented ones per spot:

    >>> import numpy as np
    >>> features = np.zeros((100, 4, 512), dtype=np.float32)
    >>> dataset = SpotPatchDataset(features=features, random_views=True)
    >>> item = dataset[0]
    >>> item["features"].shape, item["features_weak"].shape
    (torch.Size([512]), torch.Size([512]))
    """

    def __init__(
        self,
        patches: PatchExtractor | None = None,
        expression: Any = None,
        indices: Sequence[int] | np.ndarray | None = None,
        transform: Transform | Sequence[Transform] | None = None,
        n_views: int = 1,
        extra: Mapping[str, Any] | None = None,
        features: Any = None,
        random_views: bool = False,
    ) -> None:
        if n_views not in (1, 2):
            raise ValueError(f"n_views must be 1 or 2; got {n_views!r}.")
        if features is None:
            if not isinstance(patches, PatchExtractor):
                raise TypeError(f"patches must be a PatchExtractor; got {type(patches).__name__}.")
            if random_views:
                raise ValueError(
                    "random_views is for features with views; patches get random views from "
                    "transform."
                )
            self.features = None
            n_obs = patches.n_obs
            self.indices = _check_indices(indices, n_obs, patches)
            self.transforms = _check_transforms(transform, n_views)
        else:
            if patches is not None:
                raise ValueError("Pass patches or features, not both.")
            if transform is not None or n_views != 1:
                raise ValueError(
                    "transform and n_views are for patches; features carry their views as "
                    "(n_obs, n_views, n_features)."
                )
            self.features = _check_features(features)
            n_obs = self.features.shape[0]
            self.indices = _check_indices(indices, n_obs)
            self.transforms = []
        self.patches = patches
        self.n_obs = n_obs
        self.n_views = n_views
        self.random_views = bool(random_views)
        self.expression = _check_expression(expression, n_obs)
        self.extra = _check_extra(extra, n_obs)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        i = int(self.indices[item])
        if self.features is not None:
            out = self._features_item(i)
        else:
            assert self.patches is not None  # one of the two, checked in __init__
            patch = self.patches[i]
            out = {BATCH_KEYS.image: self.transforms[0](patch)}
            if self.n_views == 2:
                out[BATCH_KEYS.image_weak] = self.transforms[1](patch)
        if self.expression is not None:
            out[BATCH_KEYS.expression] = torch.from_numpy(self._expression_row(i))
        out[BATCH_KEYS.index] = torch.tensor(i, dtype=torch.int64)
        for name, values in self.extra.items():
            out[name] = torch.as_tensor(np.asarray(values[i]))
        return out

    def _features_item(self, i: int) -> dict[str, torch.Tensor]:
        features = self.features
        assert features is not None
        if features.ndim == 2:
            return {BATCH_KEYS.features: torch.from_numpy(features[i])}
        n_views = features.shape[1]
        # view 0 is the plain patch's; the augmented views follow it
        view = int(torch.randint(1, n_views, ())) if self.random_views and n_views > 1 else 0
        return {
            BATCH_KEYS.features: torch.from_numpy(features[i, view]),
            BATCH_KEYS.features_weak: torch.from_numpy(features[i, 0]),
        }

    def _expression_row(self, i: int) -> np.ndarray:
        matrix = self.expression
        if isinstance(matrix, sparse.csr_matrix | sparse.csr_array):
            # slicing the CSR buffers is much cheaper than matrix[i].toarray()
            row = np.zeros(matrix.shape[1], dtype=np.float32)
            start, stop = matrix.indptr[i], matrix.indptr[i + 1]
            row[matrix.indices[start:stop]] = matrix.data[start:stop]
            return row
        return np.asarray(matrix[i], dtype=np.float32).reshape(-1)

    def __repr__(self) -> str:
        genes = "" if self.expression is None else f", {self.expression.shape[1]} genes"
        if self.features is not None:
            shape = "x".join(str(n) for n in self.features.shape[1:])
            return f"SpotPatchDataset({len(self)} spots, features {shape}{genes})"
        return f"SpotPatchDataset({len(self)} spots, n_views={self.n_views}{genes})"


def _check_indices(indices: Any, n_obs: int, patches: PatchExtractor | None = None) -> np.ndarray:
    if indices is None:
        return np.arange(n_obs, dtype=np.int64) if patches is None else patches.indices.copy()
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n_obs,):
            raise ValueError(
                f"A boolean indices mask must have n_obs = {n_obs} entries; got {idx.shape}."
            )
        idx = np.flatnonzero(idx)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(
            f"indices must be a 1-d array of int positions; got {idx.dtype} {idx.shape}."
        )
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_obs):
        raise IndexError(f"indices must lie in [0, {n_obs}); got {idx.min()}..{idx.max()}.")
    dropped = np.zeros(len(idx), dtype=bool) if patches is None else ~patches.valid[idx]
    if dropped.any():
        raise ValueError(
            f"{int(dropped.sum())} of the indices are spots the extractor dropped (first: "
            f"{int(idx[dropped][0])}); keep to patches.indices."
        )
    return idx


def _check_features(features: Any) -> np.ndarray:
    array = np.asarray(features)
    if array.ndim not in (2, 3) or 0 in array.shape[1:]:
        raise ValueError(
            "features must be (n_obs, n_features) or (n_obs, n_views, n_features) with at "
            f"least one feature and view; got shape {array.shape}."
        )
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"features must be numeric; got dtype {array.dtype}.")
    return np.asarray(array, dtype=np.float32)


def _check_transforms(transform: Any, n_views: int) -> list[Transform]:
    if transform is None:
        return [eval_transform()] if n_views == 1 else [strong_transform(), weak_transform()]
    if callable(transform):
        return [transform] * n_views
    transforms = list(transform)
    if len(transforms) != n_views or not all(callable(t) for t in transforms):
        raise ValueError(
            f"transform must be a callable or {n_views} callables (one per view); got "
            f"{len(transforms)} items."
        )
    return transforms


def _check_expression(expression: Any, n_obs: int) -> Any:
    if expression is None:
        return None
    if sparse.issparse(expression):
        matrix = sparse.csr_matrix(expression)
        if not matrix.has_canonical_format:
            matrix = matrix.copy()  # never touch the caller's matrix
            matrix.sum_duplicates()
    else:
        matrix = np.asarray(expression)
        if matrix.ndim != 2:
            raise ValueError(f"expression must be (n_obs, n_genes); got shape {matrix.shape}.")
    if matrix.shape[0] != n_obs:
        raise ValueError(
            f"expression has {matrix.shape[0]} rows; the AnnData has n_obs = {n_obs} spots."
        )
    values = matrix.data if sparse.issparse(matrix) else matrix
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"expression must be numeric; got dtype {values.dtype}.")
    return matrix


def _check_extra(extra: Mapping[str, Any] | None, n_obs: int) -> dict[str, np.ndarray]:
    checked = {}
    for name, values in (extra or {}).items():
        if name in _RESERVED:
            raise ValueError(f"extra key {name!r} is reserved (reserved: {_RESERVED}).")
        array = np.asarray(values.to_numpy() if hasattr(values, "to_numpy") else values)
        if array.ndim == 0 or array.shape[0] != n_obs:
            raise ValueError(
                f"extra[{name!r}] must have one entry per spot (n_obs = {n_obs}); got shape "
                f"{array.shape}."
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise ValueError(f"extra[{name!r}] must be numeric; got dtype {array.dtype}.")
        checked[name] = array
    return checked
