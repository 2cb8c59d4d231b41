"""Cross-validation of slide-level models: inputs aligned by slide id, folds, out-of-fold results.

:func:`~rankbygene.tl.fit_slide_classifier` and :func:`~rankbygene.tl.fit_survival` read their
inputs with :func:`as_table` and :func:`align`, choose folds with :func:`make_folds`, fit one
model per fold through :func:`cross_validate` and summarise the folds with
:func:`summarize_folds` into a :class:`CrossValidationResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rankbygene.tl._slide import Bags, check_bag, mean_pool

__all__ = ["CrossValidationResult"]

#: ``fit_fold(k, train, test)``: fits on the ``train`` rows, predicts the ``test`` rows and
#: returns the predictions (name -> values of the test rows) and the fold's metrics.
FoldFit = Callable[
    [int, np.ndarray, np.ndarray], tuple[Mapping[str, np.ndarray], Mapping[str, float]]
]


@dataclass
class CrossValidationResult:
    """Cross-validated slide-level model: per-fold scores, their summary, out-of-fold predictions.

    Attributes
    ----------
    folds
        One row per fold: ``fold``, ``n_train``, ``n_test`` and the metric(s).
    summary
        One row per metric: ``mean`` and ``std`` over folds, and ``pooled`` (the metric of all
        out-of-fold predictions together).
    predictions
        One row per slide (index: slide id): its ``fold`` and out-of-fold prediction, with the
        targets.
    model
        The model refitted on all slides (``None`` with ``refit=False``).
    """

    folds: pd.DataFrame
    summary: pd.DataFrame
    predictions: pd.DataFrame
    model: Any = None
    params: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        metrics = ", ".join(
            f"{name} {row['mean']:.3f} ± {row['std']:.3f}" for name, row in self.summary.iterrows()
        )
        n_folds, n_slides = len(self.folds), len(self.predictions)
        return f"CrossValidationResult({n_folds} folds, {n_slides} slides: {metrics})"


# ------------------------------------------------------------------------------ inputs


def as_table(
    features: pd.DataFrame | np.ndarray | Bags | Sequence[np.ndarray],
) -> tuple[list[str], np.ndarray | None, Bags | None]:
    """Slide ids and either a ``(n_slides, d)`` matrix or bags, from any accepted input.

    Parameters
    ----------
    features
        Slides x features (DataFrame, ids from its index; or 2-D array, ids ``"0"``,
        ``"1"``, ...), or bags of tile features (dict of slide id to ``(n_tiles, d)`` array, or a
        list of them).

    Returns
    -------
    ``(ids, matrix, bags)``: the slide ids, and the float64 matrix (``bags`` is ``None``) or the
    float32 bags keyed by ``ids`` (``matrix`` is ``None``).

    Raises
    ------
    TypeError
        ``features`` is of another type.
    ValueError
        Empty, non-finite or ragged features, or repeated slide ids.
    """
    if isinstance(features, pd.DataFrame):
        matrix = features.to_numpy(dtype=np.float64)
        ids = [str(i) for i in features.index]
        bags = None
    elif isinstance(features, Mapping):
        bags = {str(k): np.asarray(v, dtype=np.float32) for k, v in features.items()}
        ids, matrix = list(bags), None
    elif isinstance(features, np.ndarray) and features.dtype != object and features.ndim == 2:
        matrix = np.asarray(features, dtype=np.float64)
        ids = [str(i) for i in range(len(matrix))]
        bags = None
    elif isinstance(features, Sequence | np.ndarray):
        bags = {str(i): np.asarray(v, dtype=np.float32) for i, v in enumerate(features)}
        ids, matrix = list(bags), None
    else:
        raise TypeError(
            "features must be a slides x features DataFrame or array, or bags (a dict or list of "
            f"(n_tiles, d) arrays); got {type(features).__name__}."
        )
    if matrix is not None:
        if matrix.ndim != 2 or matrix.shape[0] == 0:
            raise ValueError(f"features must be a non-empty 2-D table; got shape {matrix.shape}.")
        if not np.isfinite(matrix).all():
            raise ValueError("features have NaN or infinite values.")
    elif bags is not None:
        for slide_id, bag in bags.items():
            check_bag(bag, f"bag of slide {slide_id!r}")
        if len({b.shape[1] for b in bags.values()}) > 1:
            raise ValueError("bags have different numbers of features.")
    if len(set(ids)) != len(ids):
        raise ValueError("Slide ids of features are not unique.")
    return ids, matrix, bags


def slide_matrix(matrix: np.ndarray | None, bags: Bags | None) -> np.ndarray:
    """The slides x features matrix of :func:`as_table`'s output: the matrix, or pooled bags.

    Bags are mean-pooled (``mean_pool``, as ``slide_features``); their rows follow the ids of
    :func:`as_table`, which are the bags' keys in order.
    """
    if matrix is not None:
        return matrix
    if bags is None:
        raise ValueError("Give a slides x features matrix or bags of tile features.")
    return mean_pool(bags).to_numpy()


def align(target: Any, ids: list[str], name: str) -> np.ndarray:
    """``target`` per slide, in the order of ``ids`` (by index for a Series, else by position).

    Parameters
    ----------
    target
        One value per slide: a Series or mapping (aligned by slide id), or an array-like in the
        order of ``ids``.
    ids
        Slide ids, as returned by :func:`as_table`.
    name
        Name of ``target`` in error messages.

    Returns
    -------
    The values of ``target``, one per id.

    Raises
    ------
    KeyError
        A Series or mapping lacks some ids.
    ValueError
        An array-like is not 1-D of one value per slide.
    """
    if isinstance(target, pd.Series | Mapping):
        series = pd.Series(target) if isinstance(target, Mapping) else target
        series = series.copy()
        series.index = series.index.astype(str)
        missing = [s for s in ids if s not in series.index]
        if missing:
            raise KeyError(
                f"{name} has no value for {len(missing)} slides (e.g. {missing[:3]}); its index "
                "must hold the slide ids of features."
            )
        return series.loc[ids].to_numpy()
    values = np.asarray(target)
    if values.ndim != 1 or len(values) != len(ids):
        raise ValueError(
            f"{name} must have one value per slide ({len(ids)}); got shape {values.shape}."
        )
    return values


# ------------------------------------------------------------------------------ folds


def make_folds(cv: int | Any, seed: int, stratify: bool = True) -> Any:
    """The splitter of ``cv``: ``cv`` shuffled folds, or ``cv`` itself when it is a splitter.

    Parameters
    ----------
    cv
        Number of folds, or a scikit-learn splitter (returned unchanged).
    seed
        Seed of the shuffle.
    stratify
        Folds stratified by the ``y`` passed to ``split`` (``StratifiedKFold``), else
        ``KFold``.

    Raises
    ------
    ValueError
        ``cv`` is a number below 2.
    """
    if not isinstance(cv, int):
        return cv
    if cv < 2:
        raise ValueError(f"cv must be at least 2 folds; got {cv}.")
    from sklearn.model_selection import KFold, StratifiedKFold

    kind = StratifiedKFold if stratify else KFold
    return kind(n_splits=cv, shuffle=True, random_state=seed)


def cross_validate(
    splitter: Any,
    n_slides: int,
    y: np.ndarray,
    fit_fold: FoldFit,
    x: np.ndarray | None = None,
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """Fit and predict each fold; collect the fold metrics and the out-of-fold predictions.

    Parameters
    ----------
    splitter
        A scikit-learn splitter (e.g. from :func:`make_folds`).
    n_slides
        Number of slides.
    y
        What ``splitter.split`` stratifies by (class codes, events).
    fit_fold
        ``fit_fold(k, train, test)`` fits fold ``k`` on the ``train`` rows and returns the
        predictions of the ``test`` rows (name -> values, first axis the test rows) and the
        fold's metrics (name -> value).
    x
        The ``X`` of ``splitter.split``; default zeros (scikit-learn's splitters read only its
        length).

    Returns
    -------
    ``(folds, fold_of, predictions)``: one row per fold (``fold``, ``n_train``, ``n_test`` and
    the metrics); the fold of each slide; each prediction for every slide, from the fold that
    held it out (float64 where the fold's values are numeric, else object).

    Raises
    ------
    ValueError
        The splitter left a slide out of every test fold.
    """
    fold_of = np.full(n_slides, -1, dtype=np.int64)
    predictions: dict[str, np.ndarray] = {}
    rows = []
    x = np.zeros(n_slides) if x is None else x
    for k, (train, test) in enumerate(splitter.split(x, y)):
        predicted, metrics = fit_fold(k, train, test)
        for name, values in predicted.items():
            values = np.asarray(values)
            if name not in predictions:
                shape = (n_slides, *values.shape[1:])
                predictions[name] = (
                    np.full(shape, np.nan)
                    if np.issubdtype(values.dtype, np.number)
                    else np.empty(shape, dtype=object)
                )
            predictions[name][test] = values
        fold_of[test] = k
        rows.append({"fold": k, "n_train": len(train), "n_test": len(test), **metrics})
    if (fold_of < 0).any():
        raise ValueError("The splitter left some slides out of every test fold.")
    return pd.DataFrame(rows), fold_of, predictions


def summarize_folds(folds: pd.DataFrame, pooled: Mapping[str, float]) -> pd.DataFrame:
    """One row per metric of ``pooled``: ``mean`` and ``std`` over ``folds``, and ``pooled``.

    ``std`` is the sample standard deviation (0 for a single fold); ``pooled`` is the metric of
    all out-of-fold predictions together.
    """
    metrics = list(pooled)
    return pd.DataFrame(
        {
            "mean": [folds[m].mean() for m in metrics],
            "std": [folds[m].std(ddof=1) if len(folds) > 1 else 0.0 for m in metrics],
            "pooled": [pooled[m] for m in metrics],
        },
        index=pd.Index(metrics, name="metric"),
    )
