"""Survival from slide features: penalised Cox proportional hazards (lifelines), cross-validated."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from rankbygene._logging import logger
from rankbygene.tl._cv import (
    CrossValidationResult,
    align,
    as_table,
    cross_validate,
    make_folds,
    slide_matrix,
    summarize_folds,
)

__all__ = ["CoxModel", "fit_survival"]


class CoxModel:
    """Standardisation, optional PCA and a penalised Cox model (lifelines ``CoxPHFitter``).

    Parameters
    ----------
    penalizer
        Strength of the coefficient penalty (lifelines' ``penalizer``).
    l1_ratio
        Share of L1 in the penalty (0: ridge; lifelines' ``l1_ratio``).
    n_components
        Principal components of the standardised features kept before the Cox model
        (``None``: all features).

    Attributes
    ----------
    cph
        The fitted ``lifelines.CoxPHFitter`` (``cph.summary`` has the coefficients).

    Examples
    --------
    >>> from rankbygene.tl import CoxModel
    >>> model = CoxModel(penalizer=0.1).fit(features, time, event)  # doctest: +SKIP
    >>> risk = model.predict_risk(features)  # higher: shorter survival  # doctest: +SKIP
    """

    def __init__(
        self, penalizer: float = 0.1, l1_ratio: float = 0.0, n_components: int | None = None
    ) -> None:
        self.penalizer = penalizer
        self.l1_ratio = l1_ratio
        self.n_components = n_components
        self.cph: Any = None
        self._scaler: Any = None
        self._pca: Any = None

    def fit(self, matrix: np.ndarray, time: np.ndarray, event: np.ndarray) -> CoxModel:
        """Fit on a slides x features matrix, times and events (0/1)."""
        from lifelines import CoxPHFitter
        from lifelines.exceptions import ConvergenceError
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        self._scaler = StandardScaler().fit(matrix)
        x = self._scaler.transform(matrix)
        if self.n_components is not None:
            n = min(self.n_components, x.shape[0] - 1, x.shape[1])
            self._pca = PCA(n_components=n, random_state=0).fit(x)
            x = self._pca.transform(x)
        frame = self._frame(x)
        frame["time"] = time
        frame["event"] = event
        self.cph = CoxPHFitter(penalizer=self.penalizer, l1_ratio=self.l1_ratio)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # lifelines' convergence hints; failures raise
                self.cph.fit(frame, duration_col="time", event_col="event")
        except ConvergenceError as err:
            raise ValueError(
                f"The Cox model did not converge ({err}): raise penalizer (now "
                f"{self.penalizer}) or set n_components."
            ) from err
        return self

    def predict_risk(self, matrix: np.ndarray) -> np.ndarray:
        """Log partial hazard of each slide (higher: higher risk, shorter survival)."""
        if self.cph is None:
            raise RuntimeError("This CoxModel is not fitted: call fit() first.")
        x = self._scaler.transform(matrix)
        if self._pca is not None:
            x = self._pca.transform(x)
        return np.asarray(self.cph.predict_log_partial_hazard(self._frame(x)), dtype=np.float64)

    @staticmethod
    def _frame(x: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(x, columns=[f"x{j}" for j in range(x.shape[1])])


def fit_survival(
    features: Any,
    time: Any,
    event: Any,
    cv: int | Any = 5,
    penalizer: float = 0.1,
    l1_ratio: float = 0.0,
    n_components: int | None = None,
    seed: int = 0,
    refit: bool = True,
) -> CrossValidationResult:
    """Cross-validated Cox proportional hazards on slide features: concordance index per fold.

    Folds are stratified by event, so that each has deaths. In each fold, features are
    standardised (and optionally reduced by PCA) on the training slides, a penalised Cox model
    is fitted (lifelines), and the test slides get a risk score and a risk group (``"high"``
    when the score is above the training slides' median).

    Parameters
    ----------
    features
        Slides x features (e.g. :func:`~rankbygene.tl.slide_features`), or bags (mean-pooled).
    time
        Survival or censoring time of each slide (non-negative); a Series/dict is aligned by
        slide id.
    event
        1 (or ``True``) when death was observed, 0 when censored.
    cv
        Number of folds (stratified by event, shuffled with ``seed``) or a scikit-learn
        splitter.
    penalizer, l1_ratio, n_components
        See :class:`CoxModel`.
    seed
        Seed of the folds.
    refit
        Also fit on all slides (``result.model``).

    Returns
    -------
    :class:`~rankbygene.tl.CrossValidationResult`: ``folds`` (``c_index``, ``n_events`` per
    fold), ``summary`` (mean, std over folds and ``pooled``, the C-index of all out-of-fold risks
    together), ``predictions`` (per slide: ``fold``, ``time``, ``event``, ``risk``,
    ``risk_group``), ready for :func:`rankbygene.pl.km_curves`.

    Raises
    ------
    ValueError
        Negative, missing or infinite times; events other than 0/1; no event; fewer events
        than folds.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> result = rbg.tl.fit_survival(features, cohort["time"], cohort["event"])  # doctest: +SKIP
    >>> result.summary.loc["c_index"]  # doctest: +SKIP
    >>> rbg.pl.km_curves(result)  # doctest: +SKIP
    """
    from lifelines.utils import concordance_index

    ids, matrix, bags = as_table(features)
    matrix = slide_matrix(matrix, bags)
    times = _check_time(align(time, ids, "time"), ids)
    events = _check_event(align(event, ids, "event"), ids)
    n_events, n_censored = int(events.sum()), int(len(events) - events.sum())
    if isinstance(cv, int) and n_events < cv:
        raise ValueError(
            f"Only {n_events} events among {len(events)} slides, fewer than cv={cv} folds; "
            "lower cv."
        )
    # stratify by event when both kinds fill every fold; else plain shuffled folds
    splitter = make_folds(cv, seed, stratify=isinstance(cv, int) and n_censored >= cv)

    def fit_fold(
        k: int, train: np.ndarray, test: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        if events[train].sum() == 0:
            raise ValueError(f"Fold {k}'s training slides have no event; use fewer folds.")
        model = CoxModel(penalizer, l1_ratio, n_components).fit(
            matrix[train], times[train], events[train]
        )
        threshold = float(np.median(model.predict_risk(matrix[train])))
        risk = model.predict_risk(matrix[test])
        metrics = {
            "n_events": int(events[test].sum()),
            "c_index": _c_index(concordance_index, times[test], risk, events[test]),
        }
        return {"risk": risk, "risk_group": np.where(risk > threshold, "high", "low")}, metrics

    folds, fold_of, out_of_fold = cross_validate(splitter, len(ids), events, fit_fold, x=matrix)
    risk, group = out_of_fold["risk"], out_of_fold["risk_group"]
    pooled = {"c_index": _c_index(concordance_index, times, risk, events)}
    summary = summarize_folds(folds[["c_index"]].dropna(), pooled)
    predictions = pd.DataFrame(
        {"fold": fold_of, "time": times, "event": events, "risk": risk, "risk_group": group},
        index=pd.Index(ids, name="slide_id"),
    )
    final = (
        CoxModel(penalizer, l1_ratio, n_components).fit(matrix, times, events) if refit else None
    )
    logger.info(
        f"Cox model, {len(folds)}-fold C-index {summary.loc['c_index', 'mean']:.3f} ± "
        f"{summary.loc['c_index', 'std']:.3f}"
    )
    params = {"penalizer": penalizer, "l1_ratio": l1_ratio, "n_components": n_components}
    return CrossValidationResult(folds, summary, predictions, final, params)


def _c_index(
    concordance_index: Any, times: np.ndarray, risk: np.ndarray, events: np.ndarray
) -> float:
    try:
        # lifelines scores agree with longer survival: the negated risk
        return float(concordance_index(times, -risk, events))
    except ZeroDivisionError:
        return float("nan")  # no comparable pair in this fold


def _check_time(values: np.ndarray, ids: list[str]) -> np.ndarray:
    try:
        times = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"time must be numeric: {err}") from err
    bad = ~np.isfinite(times)
    if bad.any():
        first = [ids[i] for i in np.flatnonzero(bad)[:3]]
        raise ValueError(f"time is missing or infinite for {int(bad.sum())} slides (e.g. {first}).")
    negative = times < 0
    if negative.any():
        examples = {ids[i]: float(times[i]) for i in np.flatnonzero(negative)[:3]}
        raise ValueError(
            f"time must be non-negative; {int(negative.sum())} slides have negative times "
            f"(e.g. {examples})."
        )
    return times


def _check_event(values: np.ndarray, ids: list[str]) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == bool:
        return values.astype(np.int64)
    try:
        numeric = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        numeric = np.full(len(values), np.nan)
    bad = ~np.isin(numeric, (0.0, 1.0))
    if bad.any():
        found = sorted({str(values[i]) for i in np.flatnonzero(bad)})[:5]
        first = [ids[i] for i in np.flatnonzero(bad)[:3]]
        raise ValueError(
            f"event must be 0 (censored) or 1 (observed); {int(bad.sum())} slides have other "
            f"values {found} (e.g. {first})."
        )
    events = numeric.astype(np.int64)
    if events.sum() == 0:
        raise ValueError("event has no observed event (all 0): a Cox model cannot be fitted.")
    return events
