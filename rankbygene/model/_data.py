"""Data plumbing of the model: patches or features plus expression, split into loaders."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from anndata import AnnData
from torch.utils.data import DataLoader

from rankbygene.data import (
    BATCH_KEYS,
    DeviceAugmentation,
    ImageSettings,
    PatchExtractor,
    PatchTransform,
    SpotPatchDataset,
    eval_transform,
    stain_transform,
    strong_transform,
    weak_transform,
)


class SpotDataModule(pl.LightningDataModule):
    """Random split of spots into train/validation loaders (scvi-tools' DataSplitter contract).

    The training loader gives the strong and weak views of each patch; validation gives the
    un-augmented patch once (the module uses it for student and teacher). Batches drop their
    last incomplete batch in training, because in-batch negatives and rankings need full
    batches (and DDP equal ones). ``num_workers``, ``pin_memory`` and
    ``multiprocessing_context`` are the DataLoaders' (see :func:`training_loader_settings`);
    workers persist across epochs.

    With ``augment_on_device``, the loaders give uint8 patches and the views are made for the
    whole batch after its transfer to the training device (:class:`DeviceAugmentation`), so a
    GPU does not wait for the CPU's per-patch augmentation.
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
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        augment_on_device: bool = False,
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
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context if num_workers else None
        self.expression = expression
        self.patches = patches
        self.features = features
        self.device_augmentation = None
        if patches is not None and augment_on_device:
            self.device_augmentation = DeviceAugmentation(mean, std)
            self.train_transforms = self.eval_transforms = [PatchTransform([], normalize=False)]
        elif patches is not None:
            self.train_transforms = [strong_transform(mean, std), weak_transform(mean, std)]
            self.eval_transforms = [eval_transform(mean, std)]

    def _loader(self, indices: np.ndarray, train: bool) -> DataLoader:
        source: dict[str, Any]
        if self.features is not None:
            # in training the student gets a random augmented view of the features
            source = {"features": self.features, "random_views": train}
        else:
            transforms = self.train_transforms if train else self.eval_transforms
            source = {"patches": self.patches, "transform": transforms, "n_views": len(transforms)}
        dataset = SpotPatchDataset(indices=indices, expression=self.expression, **source)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            multiprocessing_context=self.multiprocessing_context,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict:
        if self.device_augmentation is not None:
            batch = self._augment(batch)
        # on a GPU, patches in NHWC (channels_last), the layout the backbone trains in
        return {
            key: value.contiguous(memory_format=torch.channels_last)
            if isinstance(value, torch.Tensor) and value.is_cuda and value.ndim == 4
            else value
            for key, value in batch.items()
        }

    def _augment(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The views of a batch of uint8 patches, made where the batch now is."""
        patches = batch[BATCH_KEYS.image]
        augmentation = self.device_augmentation
        assert augmentation is not None
        training = self.trainer is None or self.trainer.training
        with torch.no_grad():
            if training:
                strong, weak = augmentation(patches)
                return {**batch, BATCH_KEYS.image: strong, BATCH_KEYS.image_weak: weak}
            return {**batch, BATCH_KEYS.image: augmentation.plain(patches)}

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.n_val == 0:
            return []
        return self._loader(self.val_idx, train=False)


# Below this many batches, starting a worker process costs more than it saves.
MIN_BATCHES_FOR_WORKERS = 3
#: At most this many chosen workers beside a CPU's forward pass, and beside a GPU (which reads
#: patches faster than a few cores cut them).
MAX_AUTO_WORKERS = 8
MAX_GPU_WORKERS = 16
GPU_INFERENCE_BATCH_SIZE = 256


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask in containers and batch jobs)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def spare_cores(on_gpu: bool) -> int:
    """Worker processes chosen beside the main process: its cores but one, capped."""
    cap = MAX_GPU_WORKERS if on_gpu else MAX_AUTO_WORKERS
    return max(0, min(available_cpus() - 1, cap))


def inference_loader_settings(
    n_items: int,
    batch_size: int | None,
    num_workers: int | None,
    device: str | torch.device,
    reads_images: bool = True,
) -> dict[str, Any]:
    """DataLoader settings of an inference pass, chosen from the machine where ``None``.

    Batch size: ``scvi.settings.batch_size`` on the CPU, at least 256 on a GPU. Workers: one per
    core but one (kept for the main process), at most 8 on the CPU and 16 beside a GPU; none for
    precomputed features or for loaders of fewer than 3 batches. Chosen workers start by
    ``fork`` (Linux): elsewhere, and in Python versions whose default start method re-imports
    the caller's script in each worker, no workers are chosen unless asked for.

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
            num_workers = spare_cores(on_gpu)
            context = "fork" if num_workers else None
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}.")
    return {
        "batch_size": int(batch_size),
        "num_workers": int(num_workers),
        "multiprocessing_context": context,
    }


def training_loader_settings(
    num_workers: int | None, on_gpu: bool, reads_images: bool = True
) -> dict[str, Any]:
    """DataLoader settings of training, chosen from the machine where ``num_workers`` is None.

    On a GPU, reading patches in the main process leaves the GPU waiting: one worker per core
    but one (kept for the main process), at most 16, started by ``fork`` on Linux (as
    :func:`inference_loader_settings`), with pinned memory for asynchronous copies. On the CPU
    the forward and backward passes need the cores: no workers. Precomputed features need no
    workers.

    Returns
    -------
    ``num_workers``, ``pin_memory`` and ``multiprocessing_context`` for :class:`SpotDataModule`.

    Examples
    --------
    >>> training_loader_settings(None, on_gpu=False)
    {'num_workers': 0, 'pin_memory': False, 'multiprocessing_context': None}
    """
    context = None
    if num_workers is None:
        num_workers = 0
        if on_gpu and reads_images and sys.platform.startswith("linux"):
            num_workers = spare_cores(on_gpu=True)
            context = "fork" if num_workers else None
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}.")
    return {
        "num_workers": int(num_workers),
        "pin_memory": bool(on_gpu),
        "multiprocessing_context": context,
    }


def image_loader(
    settings: ImageSettings,
    adata: AnnData,
    indices: Sequence[int] | None,
    batch_size: int | None,
    library_key: str | None,
    num_workers: int | None,
    out_of_bounds: str,
    device: str | torch.device,
    n_features: int,
    augmented: bool = False,
) -> DataLoader:
    """Loader of uint8 patches (plain or a stain view), or plain features, for the image getter.

    ``settings`` are the model's image settings; ``n_features`` is the feature size that its
    encoder takes (checked against ``obsm[settings.features_key]``). ``batch_size`` and
    ``num_workers`` of ``None`` are chosen by :func:`inference_loader_settings` for ``device``.
    """
    idx = np.arange(adata.n_obs) if indices is None else np.asarray(indices, dtype=np.int64)
    loader_settings = inference_loader_settings(
        len(idx), batch_size, num_workers, device, reads_images=not settings.uses_features
    )
    if idx.size and (idx.min() < 0 or idx.max() >= adata.n_obs):
        raise IndexError(f"indices must lie in [0, {adata.n_obs}); got {idx.min()}..{idx.max()}.")
    key = settings.features_key
    if key is not None:
        if key not in adata.obsm:
            raise KeyError(f"The model was trained on adata.obsm[{key!r}], missing here.")
        features = np.asarray(adata.obsm[key], dtype=np.float32)
        if features.ndim == 3:  # views: the plain one
            features = features[:, 0]
        if features.shape[1] != n_features:
            raise ValueError(
                f"adata.obsm[{key!r}] has {features.shape[1]} features; the model takes "
                f"{n_features}."
            )
        if not np.isfinite(features[idx]).all():
            raise ValueError(f"adata.obsm[{key!r}] has NaN or infinite values.")
        dataset = SpotPatchDataset(features=features, indices=idx)
    else:
        # the extractor warns about whole-slide tiles that it would upsample
        patches = PatchExtractor.from_settings(
            adata, settings, library_key=library_key, out_of_bounds=out_of_bounds
        )
        # uint8 to the model's device, normalised there (normalize_batch): a quarter of the bytes
        # to collate, pin and copy
        transform = (
            stain_transform(normalize=False) if augmented else PatchTransform([], normalize=False)
        )
        dataset = SpotPatchDataset(patches, indices=idx, transform=transform)
    on_gpu = torch.device(device).type == "cuda"
    return DataLoader(dataset, shuffle=False, pin_memory=on_gpu, **loader_settings)
