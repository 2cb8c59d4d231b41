"""Training runner: scvi-tools' TrainRunner with a per-epoch progress bar on stderr."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ProgressBar
from scvi.train import TrainRunner

from rankbygene._progress import progress_bar

__all__ = ["EpochProgressBar", "RankByGeneTrainRunner"]


class EpochProgressBar(ProgressBar):
    """One bar over the epochs with the logged losses, from ``rankbygene._progress``.

    scvi-tools' own epoch bar (``simple_progress_bar``) writes to stdout, where a command's
    results go, and redraws there; this one writes to stderr, and only once to a file or a
    notebook without ipywidgets.

    Examples
    --------
    >>> model.train(max_epochs=5)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.bar = None

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bar": None}  # a bar holds a stream: not picklable

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.bar = progress_bar(
            total=trainer.max_epochs, desc="Training", unit="epoch", disable=not self._enabled
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.bar is not None:
            self.bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.bar is not None:
            self.bar.update()
            metrics = self.get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            self.bar.set_postfix(metrics, refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RankByGeneTrainRunner(TrainRunner):
    """scvi-tools' TrainRunner with :class:`EpochProgressBar` in place of scvi-tools' bar.

    ``enable_progress_bar=False`` shows none; ``simple_progress_bar=False`` keeps Lightning's
    own per-batch bar, as in scvi-tools.
    """

    def __init__(self, *args: Any, **trainer_kwargs: Any) -> None:
        if trainer_kwargs.get("enable_progress_bar", True) and trainer_kwargs.get(
            "simple_progress_bar", True
        ):
            trainer_kwargs["simple_progress_bar"] = False
            callbacks = list(trainer_kwargs.get("callbacks") or [])
            trainer_kwargs["callbacks"] = [*callbacks, EpochProgressBar()]
        super().__init__(*args, **trainer_kwargs)
