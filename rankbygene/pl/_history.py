"""Training curves of every loss term."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes

from rankbygene.pl._utils import new_axes, show_or_save

_DEFAULT_TERMS = ("loss", "contrastive", "rank", "distill", "rank_agreement")
_TITLES = {
    "loss": "total loss",
    "contrastive": "gene-image contrastive",
    "rank": "ranking consistency",
    "distill": "self-distillation",
    "regression": "regression (MSE)",
    "rank_agreement": "rank agreement (Spearman)",
}


def history(
    model: Any,
    terms: Sequence[str] | None = None,
    ncols: int = 5,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Sequence[Axes] | None:
    """Every loss term per epoch, for training and validation (``model.history``).

    Parameters
    ----------
    model
        A trained :class:`~rankbygene.RankByGene`.
    terms
        Terms to draw (default: total, contrastive, rank, distill and rank agreement; terms
        switched off in the model, always 0, are left out).
    ncols
        Panels per row.
    ax
        Draw one term on these axes.
    show, save
        Show the figure; save it to this path (as scanpy's ``show``/``save``).

    Returns
    -------
    The axes, unless the figure was shown.

    Examples
    --------
    >>> model.train(max_epochs=20)
    >>> rbg.pl.history(model)
    """
    recorded = getattr(model, "history", None) or {}
    if not recorded:
        raise ValueError("The model has no training history: train it first (model.train()).")
    if terms is None:
        terms = [t for t in _DEFAULT_TERMS if _is_informative(recorded, t)]
    missing = [t for t in terms if f"train_{t}" not in recorded]
    if missing:
        known = sorted({k.split("_", 1)[1] for k in recorded if k.startswith("train_")})
        raise KeyError(f"No history of {missing}; recorded terms: {known}.")
    fig, axes = new_axes(len(terms), ncols, (3.4, 2.8), ax=ax)
    for panel, term in zip(axes, terms, strict=True):
        for split, style in (("train", "-"), ("validation", "--")):
            key = f"{split}_{term}"
            if key in recorded:
                frame = recorded[key]
                panel.plot(frame.index, frame[key].astype(float), style, label=split, marker=".")
        panel.set_title(_TITLES.get(term, term))
        panel.set_xlabel("epoch")
        panel.grid(alpha=0.3)
    axes[0].legend(frameon=False)
    fig.tight_layout()
    return show_or_save(fig, show, save, axes, own_figure=ax is None)


def _is_informative(recorded: dict, term: str) -> bool:
    key = f"train_{term}"
    return key in recorded and bool((recorded[key][key].astype(float) != 0).any())
