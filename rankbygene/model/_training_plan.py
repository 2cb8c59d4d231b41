"""Lightning training plan: optimiser, per-term logging and the EMA teacher step."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch

from rankbygene.model._ema import cosine_momentum
from rankbygene.model._module import RankByGeneModule

LOSS_TERMS = ("loss", "contrastive", "rank", "distill", "regression", "rank_agreement")


class RankByGeneTrainingPlan(pl.LightningModule):
    """Trains a :class:`RankByGeneModule`.

    Logs, per epoch, ``train_<term>`` and ``validation_<term>`` for the total loss and each term
    (``contrastive``, ``rank``, ``distill``) and the within-batch ``rank_agreement`` (Spearman
    correlation of image- and gene-side similarity orderings); they land in ``model.history``.
    The teacher follows the student by EMA after every optimiser step, its momentum on a cosine
    schedule from ``ema[0]`` to ``ema[1]`` over the run. Keeps the module weights of the best
    validation loss (or the last finished epoch) in memory for a graceful interruption.

    Parameters
    ----------
    module
        The network.
    lr
        Learning rate of the projection heads.
    lr_backbone
        Learning rate of the image backbone (fine-tuning wants it lower).
    weight_decay
        AdamW weight decay.
    ema
        Teacher momentum at the start and end of training.
    adapt_ema
        Lower the start momentum to ``1 - 10 / total_steps`` when that is smaller, so that the
        teacher keeps less than 1% of its initialisation even in a short run (a slide has a few
        hundred spots: tens of steps per run); long runs use ``ema[0]`` as given.
    """

    def __init__(
        self,
        module: RankByGeneModule,
        lr: float = 1e-3,
        lr_backbone: float = 1e-4,
        weight_decay: float = 1e-4,
        ema: tuple[float, float] = (0.99, 1.0),
        adapt_ema: bool = True,
    ) -> None:
        super().__init__()
        self.module = module
        self.lr = lr
        self.lr_backbone = lr_backbone
        self.weight_decay = weight_decay
        self.ema = tuple(ema)
        self.adapt_ema = adapt_ema
        self._channels_last = False
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None
        self._best_loss = float("inf")

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.module(batch)

    def _step(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        _, _, output = self.module(batch)
        values = {"loss": output.loss, **output.extra_metrics}
        distributed = self.trainer is not None and self.trainer.world_size > 1
        for term in LOSS_TERMS:
            self.log(
                f"{prefix}_{term}",
                values[term],
                on_step=False,
                on_epoch=True,
                prog_bar=term == "loss",
                batch_size=output.n_obs_minibatch,
                sync_dist=distributed,
            )
        return output.loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "validation")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        momentum = cosine_momentum(self.global_step, total, self.ema_start(total), self.ema[1])
        self.module.update_teacher(momentum)

    def ema_start(self, total_steps: int) -> float:
        """Start momentum of the run: ``ema[0]``, lowered for short runs when ``adapt_ema``."""
        start = self.ema[0]
        if self.adapt_ema and start < 1.0:
            # prod(m_t) ~ exp(-(1 - m0) * T / 2) <= exp(-5): the initial weights fade out
            start = min(start, max(0.5, 1.0 - 10.0 / total_steps))
        return start

    def on_fit_start(self) -> None:
        # NHWC is what cuDNN's tensor-core convolutions read without transposing; weights in
        # it make the activations follow (SpotDataModule converts the batches on the GPU)
        self._channels_last = self.device.type == "cuda" and not self.module.uses_features
        if self._channels_last:
            self.module.student_backbone.to(memory_format=torch.channels_last)
            self.module.teacher_backbone.to(memory_format=torch.channels_last)

    def on_train_epoch_start(self) -> None:
        # Lightning's .train() reaches the teacher too; its targets should be dropout-free.
        self.module.teacher_backbone.eval()
        self.module.teacher_head.eval()

    def on_train_epoch_end(self) -> None:
        # Remember the weights to fall back on when training is interrupted.
        metrics = self.trainer.callback_metrics
        logged = metrics.get("validation_loss", metrics.get("train_loss"))
        current = float(logged) if logged is not None else float("inf")
        if current <= self._best_loss or self.best_state is None:
            self._best_loss = current
            self.best_epoch = self.current_epoch
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()
            }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        backbone = [p for p in self.module.student_backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        heads = [
            p for p in self.module.parameters() if p.requires_grad and id(p) not in backbone_ids
        ]
        groups = [{"params": heads, "lr": self.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": self.lr_backbone})
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    def restore_best(self) -> int | None:
        """Load the kept weights into the module; returns their epoch."""
        if self.best_state is not None:
            self.module.load_state_dict(copy.deepcopy(self.best_state))
        return self.best_epoch
