"""What every plot shares: a figure or the caller's axes, then show and/or save, as scanpy does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from rankbygene._logging import logger


def new_axes(
    n_panels: int,
    ncols: int,
    panel_size: tuple[float, float] = (4.0, 3.2),
    ax: Axes | None = None,
) -> tuple[Figure, list[Axes]]:
    """A grid of ``n_panels`` axes (unused cells hidden), or ``[ax]`` when one is given."""
    if ax is not None:
        if n_panels != 1:
            raise ValueError(f"ax= takes one panel; this plot draws {n_panels}. Leave ax=None.")
        return cast(Figure, ax.figure), [ax]
    ncols = max(1, min(ncols, n_panels))
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
    )
    flat = list(axes.ravel())
    for extra in flat[n_panels:]:
        extra.set_visible(False)
    return fig, flat[:n_panels]


def show_or_save(
    fig: Figure, show: bool | None, save: str | Path | None, axes: Sequence[Axes], own_figure: bool
) -> Sequence[Axes] | None:
    """Save to ``save``, then show (default: when the figure is ours and nothing was saved).

    Returns the axes when they are not shown, so that the caller can keep drawing on them.
    """
    if save is not None:
        fig.savefig(save, bbox_inches="tight", dpi=150)
        logger.info("saved figure to %s", save)
    if show is None:
        show = own_figure and save is None and plt.isinteractive()
    if show:
        plt.show()
        return None
    return axes
