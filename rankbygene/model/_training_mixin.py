"""Training of the RankByGene model: patches or frozen features, Lightning, interruption."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData
from lightning.pytorch.utilities import rank_zero_info
from scvi import settings
from scvi.train import TrainRunner

from rankbygene._logging import (
    QUIET_RUN_WARNINGS,
    logger,
    quiet_lightning_tips,
    quiet_scvi_training_exception,
)
from rankbygene._precision import autocast_dtype, default_precision
from rankbygene.data import PatchExtractor
from rankbygene.model._constants import REGISTRY_KEYS
from rankbygene.model._data import (
    SpotDataModule,
    training_loader_settings,
)
from rankbygene.model._model_attributes import ModelAttributes


class TrainingMixin(ModelAttributes):
    """``train`` of :class:`~rankbygene.model.RankByGene` (Lightning through scvi-tools)."""

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        lr_backbone: float | None = None,
        weight_decay: float = 1e-4,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        num_workers: int | None = None,
        precision: str | int | None = None,
        augmentation: Literal["loader", "device"] | None = None,
        cache: Literal["memory", "disk"] | None = "memory",
        cache_dir: str | Path | None = None,
        out_of_bounds: Literal["raise", "pad", "drop"] = "pad",
        n_views: int = 8,
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Train with Lightning (progress bar; ``accelerator``/``devices``/``strategy``).

        Parameters
        ----------
        max_epochs
            Epochs; default 50.
        batch_size
            Spots per mini-batch (in-batch negatives and rankings need tens of spots at least).
        lr, lr_backbone
            Learning rates of the heads and of the image backbone; ``lr_backbone`` defaults to
            ``lr / 10`` for a pretrained backbone (fine-tuning) and ``lr`` for one trained from
            scratch.
        weight_decay
            AdamW weight decay.
        accelerator, devices
            Lightning's; ``strategy="ddp"`` (in ``trainer_kwargs``) trains on several processes,
            gathering embeddings across them for the losses.
        train_size, validation_size
            Random split of the spots; validation defaults to the rest.
        early_stopping
            Stop when ``validation_loss`` stops improving (patience ``early_stopping_patience``)
            and keep the best weights.
        num_workers
            DataLoader workers decoding and augmenting patches; default: on a GPU, one per CPU
            core but one (at most 16), with pinned memory; on the CPU, none (the forward and
            backward passes use the cores).
        precision
            Lightning's: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"``; default
            ``"bf16-mixed"`` on GPUs with bf16, else ``"32-true"``. Losses, similarities and
            colour statistics are computed in float32 in every case. On a GPU the image
            backbones also train in ``channels_last`` memory format. The choice is logged with
            Lightning's lines on the device.
        augmentation
            Where the student's and teacher's views of each patch are made: ``"loader"``, per
            patch in the DataLoader (torchvision), or ``"device"``, per batch on the training
            device (:class:`~rankbygene.data.DeviceAugmentation`, the same augmentations);
            default: ``"device"`` on a GPU, ``"loader"`` on the CPU.
        cache
            Decoded patches kept in ``"memory"`` or on ``"disk"`` (under ``cache_dir``, reused by
            later runs) so each image is decoded once; ``None`` reads every patch from the image.
        out_of_bounds
            Spots whose patch misses pixels (beyond the image, NaN or infinite pixels):
            ``"pad"`` them with white, with a warning counting them (the default, as
            everywhere), ``"raise"`` or ``"drop"``.
        n_views
            With ``freeze_backbone``: backbone features are computed for the plain patch and
            ``n_views - 1`` stain-jittered, flipped and rotated views of it
            (:func:`~rankbygene.data.stain_transform`); the student learns from a random
            augmented view, the teacher from the plain one.
        plan_kwargs
            Passed to :class:`~rankbygene.model.RankByGeneTrainingPlan`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` / :class:`lightning.pytorch.Trainer`.

        Notes
        -----
        Interrupting (Ctrl+C, the notebook's stop button) ends training gracefully and keeps the
        weights of the best epoch so far; the model stays usable.
        """
        quiet_lightning_tips()  # notebooks too: no cloud-service advertisements in the log
        max_epochs = 50 if max_epochs is None else int(max_epochs)
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1; got {max_epochs}.")
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1; got {n_views}.")
        on_gpu = trains_on_gpu(accelerator)
        if precision is None:
            precision = default_precision("cuda" if on_gpu else "cpu")
        autocast_dtype(precision)  # an unknown precision fails before any work
        if augmentation is None:
            augmentation = "device" if on_gpu else "loader"
        if augmentation not in ("loader", "device"):
            raise ValueError(f"augmentation must be 'loader' or 'device'; got {augmentation!r}.")
        adata = self.adata
        image_settings = self.image_settings
        expression = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        patches = None
        features = None
        valid = None
        if self.features_key is not None:
            features = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.FEATURES_KEY))
            plain = features[:, 0] if features.ndim == 3 else features
            self.module.set_feature_scaling(torch.as_tensor(plain, dtype=torch.float32))
        elif self.module.freeze_backbone:
            features, valid = self._frozen_features(adata, out_of_bounds, n_views, precision)
        else:
            patches = PatchExtractor.from_settings(
                adata,
                image_settings,
                cache=cache,
                cache_dir=cache_dir,
                out_of_bounds=out_of_bounds,
            )
            valid = patches.valid
        loader_settings = training_loader_settings(num_workers, on_gpu, patches is not None)
        data_module = SpotDataModule(
            n_obs=adata.n_obs,
            expression=expression,
            patches=patches,
            features=features,
            mean=image_settings.mean,
            std=image_settings.std,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            seed=settings.seed,
            valid=valid,
            augment_on_device=augmentation == "device",
            **loader_settings,
        )
        if patches is not None and cache is not None:
            patches.materialize(progress=trainer_kwargs.get("enable_progress_bar", True))
        plan_kwargs = {
            "lr": lr,
            "lr_backbone": lr_backbone
            if lr_backbone is not None
            else self._default_lr_backbone(lr),
            "weight_decay": weight_decay,
            "ema": self.ema,
            **(plan_kwargs or {}),
        }
        plan = self._training_plan_cls(self.module, **plan_kwargs)
        if data_module.n_val > 0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        where = "on the device" if augmentation == "device" else "in the DataLoader"
        augmented = "" if patches is None else f", views augmented {where}"
        rank_zero_info(
            f"Training on {'the GPU' if on_gpu else 'the CPU'}: {precision} precision, "
            f"{loader_settings['num_workers']} DataLoader workers"
            f"{', pinned memory, channels_last' if on_gpu else ''}{augmented}"
        )
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=data_module,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            precision=precision,
            **trainer_kwargs,
        )
        try:
            with warnings.catch_warnings(), quiet_scvi_training_exception(type(runner)):
                # the EMA teacher is in eval mode on purpose; losses are logged per epoch
                warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
                warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
                for category, module in QUIET_RUN_WARNINGS:  # nothing a user can act on
                    warnings.filterwarnings("ignore", category=category, module=module)
                runner()
        except (KeyboardInterrupt, SystemExit):
            epoch = plan.restore_best()
            self._finish_interrupted(runner, data_module)
            logger.warning("Training interrupted; kept the weights of epoch %s.", epoch)
            warnings.warn(
                f"Training interrupted; the model keeps the weights of epoch {epoch}.",
                UserWarning,
                stacklevel=2,
            )
            return
        if early_stopping:
            plan.restore_best()

    def _frozen_features(
        self, adata: AnnData, out_of_bounds: str, n_views: int, precision: str | int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Backbone features of every usable spot, plain and augmented views, computed once."""
        patches = PatchExtractor.from_settings(
            adata, self.image_settings, out_of_bounds=out_of_bounds
        )
        valid = patches.valid
        spots = np.flatnonzero(valid)
        features = np.zeros((adata.n_obs, n_views, self.module.n_features), dtype=np.float32)
        for view in range(n_views):
            features[spots, view] = self.get_image_representation(
                adata,
                indices=spots,
                kind="backbone",
                out_of_bounds="pad",
                augmented=view > 0,
                precision=precision,
            )
        self.module.set_feature_scaling(torch.as_tensor(features[spots, 0]))
        return features, valid

    def _default_lr_backbone(self, lr: float) -> float:
        pretrained = self.init_params_["non_kwargs"].get("pretrained", False)
        return lr / 10 if pretrained else lr

    def _finish_interrupted(self, runner: TrainRunner, data_module: SpotDataModule) -> None:
        runner._update_history()
        self.train_indices = data_module.train_idx
        self.validation_indices = data_module.val_idx
        self.test_indices = data_module.test_idx
        self.module.eval()
        self.is_trained_ = True
        self.to_device(runner.device)


def trains_on_gpu(accelerator: Any) -> bool:
    """Whether Lightning trains on a CUDA GPU with this ``accelerator`` (``"auto"`` picks one)."""
    if not torch.cuda.is_available():
        return False
    if not isinstance(accelerator, str):  # a Lightning Accelerator instance
        return type(accelerator).__name__ == "CUDAAccelerator"
    return accelerator.lower() in ("auto", "gpu", "cuda")
