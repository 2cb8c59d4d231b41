"""Kaplan-Meier curves of risk groups, with the log-rank test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from rankbygene.pl._utils import new_axes, show_or_save

__all__ = ["km_curves"]


def km_curves(
    data: Any = None,
    time: str | Sequence[float] | np.ndarray = "time",
    event: str | Sequence[int] | np.ndarray = "event",
    groups: str | Sequence[Any] | np.ndarray | None = None,
    risk: str | Sequence[float] | np.ndarray | None = None,
    n_groups: int = 2,
    ci_show: bool = True,
    title: str | None = None,
    xlabel: str = "time",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes | None:
    """Kaplan-Meier survival curves of groups of slides, with the log-rank p-value in the title.

    Parameters
    ----------
    data
        A DataFrame holding the columns named below, or the result of
        :func:`rankbygene.tl.fit_survival` (its out-of-fold ``predictions``: ``time``, ``event``
        and ``risk_group``, high or low risk by each fold's training median); ``None`` when the
        arguments below are arrays.
    time, event
        Column names in ``data``, or arrays: survival/censoring times and events (1 observed,
        0 censored).
    groups
        Column name or array of each slide's group. Default: ``risk_group`` when ``data`` has
        it, else groups of ``risk``.
    risk
        Column name or array of risk scores, split at its quantiles into ``n_groups`` groups
        (``"low"``/``"high"`` for two), when ``groups`` is not given.
    n_groups
        Number of risk groups made from ``risk``.
    ci_show
        Draw the 95% confidence bands.
    title
        Title before the log-rank p-value.
    xlabel
        Label of the time axis (e.g. ``"months"``).
    ax
        Draw on these axes.
    show, save
        Show the figure; save it to this path (as scanpy's ``show``/``save``).

    Returns
    -------
    The axes, unless the figure was shown.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> result = rbg.tl.fit_survival(features, cohort["time"], cohort["event"])  # doctest: +SKIP
    >>> rbg.pl.km_curves(result, xlabel="months")  # doctest: +SKIP
    >>> rbg.pl.km_curves(cohort, groups="label", show=False)  # doctest: +SKIP
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    frame = getattr(data, "predictions", data)
    if frame is not None and not isinstance(frame, pd.DataFrame):
        raise TypeError(
            f"data must be a DataFrame or a fit_survival result; got {type(data).__name__}."
        )
    if groups is None and risk is None:
        if frame is not None and "risk_group" in frame.columns:
            groups = "risk_group"
        else:
            raise ValueError("Pass groups= (a group per slide) or risk= (scores to split).")
    times = np.asarray(_column(frame, time, "time"), dtype=np.float64)
    events = np.asarray(_column(frame, event, "event"), dtype=np.float64)
    n = len(times)
    if len(events) != n:
        raise ValueError(f"time and event differ in length ({n} and {len(events)}).")
    if not np.isfinite(times).all() or (times < 0).any():
        raise ValueError("time must be finite and non-negative.")
    if not np.isin(events, (0.0, 1.0)).all():
        raise ValueError("event must be 0 (censored) or 1 (observed).")
    if groups is not None:
        labels = pd.Series(np.asarray(_column(frame, groups, "groups"), dtype=object))
    else:
        scores = np.asarray(_column(frame, risk, "risk"), dtype=np.float64)
        labels = _risk_groups(scores, n_groups)
    if len(labels) != n:
        raise ValueError(f"groups have {len(labels)} values for {n} slides.")
    if labels.isna().any():
        raise ValueError("groups have missing values.")
    order = _group_order(labels)
    if len(order) < 2:
        raise ValueError(f"Kaplan-Meier comparison needs at least two groups; got {order}.")

    fig, axes = new_axes(1, 1, panel_size=(5.0, 4.0), ax=ax)
    target = axes[0]
    for name in order:
        keep = (labels == name).to_numpy()
        fitter = KaplanMeierFitter().fit(
            times[keep], events[keep], label=f"{name} (n={int(keep.sum())})"
        )
        fitter.plot_survival_function(ax=target, ci_show=ci_show)
    test = multivariate_logrank_test(times, labels.to_numpy(), events)
    p = f"log-rank p = {test.p_value:.2g}"
    target.set_title(f"{title}\n{p}" if title else p)
    target.set_xlabel(xlabel)
    target.set_ylabel("survival probability")
    target.set_ylim(0, 1.05)
    shown = show_or_save(fig, show, save, axes, own_figure=ax is None)
    return None if shown is None else shown[0]


def _column(frame: pd.DataFrame | None, value: Any, name: str) -> Any:
    if isinstance(value, str):
        if frame is None:
            raise ValueError(f"{name}={value!r} names a column, but no data was given.")
        if value not in frame.columns:
            raise KeyError(f"data has no column {value!r} (columns: {list(frame.columns)}).")
        return frame[value].to_numpy()
    return np.asarray(value)


def _risk_groups(scores: np.ndarray, n_groups: int) -> pd.Series:
    if n_groups < 2:
        raise ValueError(f"n_groups must be at least 2; got {n_groups}.")
    if not np.isfinite(scores).all():
        raise ValueError("risk has NaN or infinite values.")
    names = ["low", "high"] if n_groups == 2 else [f"Q{i + 1}" for i in range(n_groups)]
    codes = pd.qcut(pd.Series(scores).rank(method="first"), n_groups, labels=False)
    return pd.Series(np.asarray(names, dtype=object)[codes.to_numpy()])


def _group_order(labels: pd.Series) -> list[Any]:
    present = list(dict.fromkeys(labels))
    preferred = ["low", "high"]
    if set(present) <= set(preferred):
        return [p for p in preferred if p in present]
    try:
        return sorted(present)
    except TypeError:
        return present
