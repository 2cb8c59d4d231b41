"""Data plumbing of the model: patches or features plus expression, split into loaders."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from anndata import AnnData
from scipy import sparse
from torch.utils.data import DataLoader, Dataset

from rankbygene._constants import BATCH_KEYS
from rankbygene.data import (
    PatchExtractor,
    eval_transform,
    stain_transform,
    strong_transform,
    weak_transform,
)

if TYPE_CHECKING:
    from rankbygene.model._model import RankByGene

SPATIAL_REGISTRY_KEY = "spatial"
FEATURES_REGISTRY_KEY = "features"


class SpotViews(Dataset):
    """Per spot: an image view per transform (or features), expression, and the spot index.

    Features may carry views, ``(n_spots, n_views, n_features)``: view 0 of the plain patch and
    augmented ones after it. With ``random_views`` the student gets a random augmented view and
    the teacher view 0 (their strong and weak views); otherwise both get view 0.
    """

    def __init__(
        self,
        indices: np.ndarray,
        patches: PatchExtractor | None = None,
        features: np.ndarray | None = None,
        expression: Any = None,
        transforms: Sequence | None = None,
        random_views: bool = False,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.patches = patches
        self.features = None if features is None else np.asarray(features, dtype=np.float32)
        self.expression = expression
        self.transforms = list(transforms or [])
        self.random_views = random_views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        i = int(self.indices[item])
        out: dict[str, torch.Tensor] = {BATCH_KEYS.index: torch.tensor(i)}
        if self.features is not None and self.features.ndim == 3:
            n_views = self.features.shape[1]
            view = int(torch.randint(1, n_views, ())) if self.random_views and n_views > 1 else 0
            out[BATCH_KEYS.features] = torch.from_numpy(self.features[i, view])
            out[BATCH_KEYS.features_weak] = torch.from_numpy(self.features[i, 0])
        elif self.features is not None:
            out[BATCH_KEYS.features] = torch.from_numpy(self.features[i])
        else:
            patch = self.patches[i]
            keys = (BATCH_KEYS.image, BATCH_KEYS.image_weak)
            for key, transform in zip(keys, self.transforms, strict=False):
                out[key] = transform(patch)
        if self.expression is not None:
            row = self.expression[i]
            row = row.toarray().ravel() if sparse.issparse(row) else np.asarray(row).ravel()
            out[BATCH_KEYS.expression] = torch.as_tensor(row, dtype=torch.float32)
        return out


class SpotDataModule(pl.LightningDataModule):
    """Random split of spots into train/validation loaders (scvi-tools' DataSplitter contract).

    The training loader gives the strong and weak views of each patch; validation gives the
    un-augmented patch twice. Batches drop their last incomplete batch in training, because
    in-batch negatives and rankings need full batches (and DDP equal ones).
    """

    def __init__(
        self,
        n_obs: int,
        expression: Any,
        patches: PatchExtractor | None = None,
        features: np.ndarray | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int | None = 0,
        valid: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must be in (0, 1]; got {train_size}.")
        validation_size = 1.0 - train_size if validation_size is None else validation_size
        if validation_size < 0 or train_size + validation_size > 1.0 + 1e-9:
            raise ValueError(
                f"train_size + validation_size must be <= 1; got {train_size} + {validation_size}."
            )
        usable = np.arange(n_obs) if valid is None else np.flatnonzero(valid)
        rng = np.random.default_rng(seed)
        order = rng.permutation(usable)
        n_train = int(np.ceil(train_size * len(order)))
        n_val = int(np.floor(validation_size * len(order)))
        n_val = min(n_val, len(order) - n_train)
        if batch_size > n_train:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {n_train} training spots; lower it."
            )
        if batch_size < 2:
            raise ValueError("batch_size must be at least 2 (in-batch negatives).")
        self.train_idx = np.sort(order[:n_train])
        self.val_idx = np.sort(order[n_train : n_train + n_val])
        self.test_idx = np.sort(order[n_train + n_val :])
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.expression = expression
        self.patches = patches
        self.features = features
        if patches is not None:
            self.train_transforms = [strong_transform(mean, std), weak_transform(mean, std)]
            self.eval_transforms = [eval_transform(mean, std)]
        else:
            self.train_transforms = self.eval_transforms = []

    def _loader(self, indices: np.ndarray, train: bool) -> DataLoader:
        dataset = SpotViews(
            indices,
            patches=self.patches,
            features=self.features,
            expression=self.expression,
            transforms=self.train_transforms if train else self.eval_transforms,
            random_views=train,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.n_val == 0:
            return []
        return self._loader(self.val_idx, train=False)


def make_patch_extractor(
    model: RankByGene,
    adata: AnnData,
    library_key: str | None = None,
    cache: str | None = None,
    cache_dir: str | Path | None = None,
    out_of_bounds: str = "raise",
) -> PatchExtractor:
    """Patches of ``adata`` with the model's geometry (patch scale, input size, image key)."""
    if library_key is None and model.library_key is not None and model.library_key in adata.obs:
        library_key = model.library_key
    return PatchExtractor(
        adata,
        library_key=library_key,
        spatial_key=model.spatial_key,
        image_key=model.image_key,
        patch_scale=model.patch_scale,
        patch_size=model.input_size,
        out_of_bounds=out_of_bounds,
        cache=cache,
        cache_dir=cache_dir,
    )


# Below this many batches, starting a worker process costs more than it saves.
MIN_BATCHES_FOR_WORKERS = 3
MAX_AUTO_WORKERS = 8
GPU_INFERENCE_BATCH_SIZE = 256


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask in containers and batch jobs)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def inference_loader_settings(
    n_items: int,
    batch_size: int | None,
    num_workers: int | None,
    device: str | torch.device,
    reads_images: bool = True,
) -> dict[str, Any]:
    """DataLoader settings of an inference pass, chosen from the machine where ``None``.

    Batch size: ``scvi.settings.batch_size`` on the CPU, at least 256 on a GPU. Workers: one per
    spare core on the CPU (the forward pass keeps the main process busy), one per core next to a
    GPU, at most 8; none for precomputed features or for loaders of fewer than 3 batches. Chosen
    workers start by ``fork`` (Linux): elsewhere, and in Python versions whose default start
    method re-imports the caller's script in each worker, no workers are chosen unless asked for.

    Returns
    -------
    ``batch_size``, ``num_workers`` and ``multiprocessing_context`` for :class:`DataLoader`.

    Examples
    --------
    >>> inference_loader_settings(10_000, None, None, "cpu")  # doctest: +SKIP
    {'batch_size': 128, 'num_workers': 1, 'multiprocessing_context': 'fork'}
    """
    from scvi import settings

    on_gpu = torch.device(device).type == "cuda"
    if batch_size is None:
        batch_size = max(settings.batch_size, GPU_INFERENCE_BATCH_SIZE if on_gpu else 0)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    context = None
    if num_workers is None:
        n_batches = -(-n_items // batch_size)
        can_fork = sys.platform.startswith("linux")
        num_workers = 0
        if reads_images and can_fork and n_batches >= MIN_BATCHES_FOR_WORKERS:
            spare = available_cpus() - (0 if on_gpu else 1)
            num_workers = max(0, min(spare, MAX_AUTO_WORKERS))
            context = "fork" if num_workers else None
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}.")
    return {
        "batch_size": int(batch_size),
        "num_workers": int(num_workers),
        "multiprocessing_context": context,
    }


def image_loader(
    model: RankByGene,
    adata: AnnData,
    indices: Sequence[int] | None,
    batch_size: int | None,
    library_key: str | None,
    num_workers: int | None,
    out_of_bounds: str,
    augmented: bool = False,
) -> DataLoader:
    """Loader of patches (plain or a stain view), or plain features, for the image getter.

    ``batch_size``/``num_workers`` of ``None`` are chosen by :func:`inference_loader_settings`.
    """
    idx = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    loader_settings = inference_loader_settings(
        len(idx), batch_size, num_workers, model.device, reads_images=model.features_key is None
    )
    if idx.size and (idx.min() < 0 or idx.max() >= adata.n_obs):
        raise IndexError(f"indices must lie in [0, {adata.n_obs}); got {idx.min()}..{idx.max()}.")
    if model.features_key is not None:
        if model.features_key not in adata.obsm:
            raise KeyError(
                f"The model was trained on adata.obsm[{model.features_key!r}], missing here."
            )
        features = np.asarray(adata.obsm[model.features_key], dtype=np.float32)
        if features.ndim == 3:  # views: the plain one
            features = features[:, 0]
        if features.shape[1] != model.module.n_features:
            raise ValueError(
                f"adata.obsm[{model.features_key!r}] has {features.shape[1]} features; the model "
                f"takes {model.module.n_features}."
            )
        if not np.isfinite(features[idx]).all():
            raise ValueError(f"adata.obsm[{model.features_key!r}] has NaN or infinite values.")
        dataset = SpotViews(idx, features=features)
    else:
        # the extractor warns about whole-slide tiles that it would upsample
        patches = make_patch_extractor(
            model, adata, library_key=library_key, out_of_bounds=out_of_bounds
        )
        make = stain_transform if augmented else eval_transform
        dataset = SpotViews(
            idx, patches=patches, transforms=[make(model.image_mean, model.image_std)]
        )
    return DataLoader(
        dataset, shuffle=False, pin_memory=torch.cuda.is_available(), **loader_settings
    )
