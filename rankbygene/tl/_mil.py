"""Slide classification: mean pooling + logistic regression, or gated attention MIL (ABMIL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

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
from rankbygene.tl._slide import Bags

__all__ = ["GatedAttentionMIL", "SlideClassifier", "fit_slide_classifier"]


class GatedAttentionMIL(nn.Module):
    """Gated attention multiple-instance learning (ABMIL; Ilse, Tomczak & Welling, ICML 2018).

    Tiles ``x_i`` are embedded, ``h_i = ReLU(W x_i)``; the slide is the attention-weighted mean
    ``z = sum_i a_i h_i`` with ``a = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``; a linear
    layer classifies ``z``.

    Parameters
    ----------
    n_features
        Tile feature size.
    n_classes
        Number of classes.
    hidden
        Size of the tile embedding ``h``.
    attention_dim
        Size of the attention network's hidden layer.
    dropout
        Dropout on ``h``.

    Examples
    --------
    >>> import torch
    >>> from rankbygene.tl import GatedAttentionMIL
    >>> net = GatedAttentionMIL(n_features=16, n_classes=2)
    >>> logits, attention = net(torch.randn(3, 50, 16))  # 3 slides of 50 tiles
    >>> logits.shape, attention.shape
    (torch.Size([3, 2]), torch.Size([3, 50]))
    """

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        hidden: int = 64,
        attention_dim: int = 32,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention_dim)
        self.attention_u = nn.Linear(hidden, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, n_classes)`` and attention ``(B, N)`` of bags ``x`` ``(B, N, d)``.

        ``mask`` ``(B, N)`` marks real tiles (``True``) in padded bags.
        """
        h = self.embed(x)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        scores = self.attention_w(gate).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        pooled = torch.bmm(attention.unsqueeze(1), h).squeeze(1)
        return self.classifier(pooled), attention


class SlideClassifier:
    """Slide-level classifier on tile features (scikit-learn style ``fit``/``predict_proba``).

    Parameters
    ----------
    method
        ``"logistic"``: standardised mean-pooled features, L2-penalised logistic regression
        (scikit-learn); bags are mean-pooled first. ``"abmil"``: gated attention MIL
        (:class:`GatedAttentionMIL`) on the tiles of each slide (bags).
    C
        Inverse regularisation strength of the logistic regression.
    hidden, attention_dim, dropout
        Of the attention network.
    epochs, lr, weight_decay
        Training of the attention network (Adam, class-balanced cross-entropy).
    bag_batch_size
        Slides per optimisation step (bags padded to the longest; padded tiles masked).
    max_tiles
        Tiles sampled per slide and step during training (all tiles are used to predict).
    device
        Torch device of the attention network (default: CUDA when available).
    seed
        Seed of the network's initialisation and tile sampling (the global RNG is untouched).

    Attributes
    ----------
    classes_
        The class labels, in the column order of :meth:`predict_proba`.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> bags = rbg.tl.slide_features(done, method="attention")  # doctest: +SKIP
    >>> clf = rbg.tl.SlideClassifier("abmil").fit(bags, labels)  # doctest: +SKIP
    >>> clf.predict_proba(new_bags)[:, 1]  # doctest: +SKIP
    >>> clf.attention(new_bags["slide_7"])  # weight of each tile  # doctest: +SKIP
    """

    #: Set by fit: the classes, and for method="abmil" the network and the feature scaling.
    classes_: np.ndarray
    _net: GatedAttentionMIL
    _mean: np.ndarray
    _std: np.ndarray

    def __init__(
        self,
        method: Literal["logistic", "abmil"] = "logistic",
        C: float = 1.0,
        hidden: int = 64,
        attention_dim: int = 32,
        dropout: float = 0.25,
        epochs: int = 60,
        lr: float = 2e-3,
        weight_decay: float = 1e-3,
        bag_batch_size: int = 8,
        max_tiles: int = 1024,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> None:
        if method not in ("logistic", "abmil"):
            raise ValueError(f"method must be 'logistic' or 'abmil'; got {method!r}.")
        self.method = method
        self.C = C
        self.hidden = hidden
        self.attention_dim = attention_dim
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.bag_batch_size = bag_batch_size
        self.max_tiles = max_tiles
        self.device = device
        self.seed = seed
        self._estimator: Any = None

    def __repr__(self) -> str:
        return f"SlideClassifier(method={self.method!r}, fitted={self._is_fitted()})"

    # ------------------------------------------------------------------ API

    def fit(self, features: Any, labels: Any) -> SlideClassifier:
        """Fit on slide features (DataFrame/array) or bags (dict/list of arrays) and labels.

        Labels are aligned by slide id when they are a Series (or dict), else by position.
        """
        ids, matrix, bags = as_table(features)
        y = _check_labels(align(labels, ids, "labels"), ids, n_splits=None)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if self.method == "logistic":
            self._fit_logistic(slide_matrix(matrix, bags), codes)
        else:
            if bags is None:
                raise ValueError(
                    "method='abmil' needs the tiles of each slide (bags): use "
                    "slide_features(..., method='attention')."
                )
            self._fit_abmil([bags[s] for s in ids], codes)
        return self

    def predict_proba(self, features: Any) -> np.ndarray:
        """Class probabilities, ``(n_slides, n_classes)``, columns in the order of ``classes_``."""
        self._check_fitted()
        ids, matrix, bags = as_table(features)
        if self.method == "logistic":
            return self._estimator.predict_proba(slide_matrix(matrix, bags))
        if bags is None:
            raise ValueError("method='abmil' predicts from bags (the tiles of each slide).")
        return self._predict_abmil([bags[s] for s in ids])[0]

    def predict(self, features: Any) -> np.ndarray:
        """The most probable class of each slide."""
        return self.classes_[self.predict_proba(features).argmax(axis=1)]

    def attention(self, bag: np.ndarray) -> np.ndarray:
        """Attention weight of each tile of one slide (``method="abmil"``), summing to 1.

        Store it in the tiles' AnnData (e.g. ``tiles.obs["attention"]``) to map it with squidpy.
        """
        self._check_fitted()
        if self.method != "abmil":
            raise ValueError("attention weights exist for method='abmil' only.")
        bag = np.asarray(bag, dtype=np.float32)
        return self._predict_abmil([bag])[1][0]

    # ------------------------------------------------------------------ logistic

    def _fit_logistic(self, matrix: np.ndarray, codes: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self._estimator = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, max_iter=2000)
        ).fit(matrix, codes)

    # ------------------------------------------------------------------ ABMIL

    def _torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _fit_abmil(self, bags: list[np.ndarray], codes: np.ndarray) -> None:
        device = self._torch_device()
        stacked = np.concatenate(bags)
        self._mean = stacked.mean(axis=0)
        self._std = stacked.std(axis=0) + 1e-6
        bags = [(b - self._mean) / self._std for b in bags]
        n_classes = len(self.classes_)
        counts = np.bincount(codes, minlength=n_classes)
        weight = torch.as_tensor(len(codes) / (n_classes * counts), dtype=torch.float32)
        generator = np.random.default_rng(self.seed)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            net = GatedAttentionMIL(
                bags[0].shape[1], n_classes, self.hidden, self.attention_dim, self.dropout
            ).to(device)
            optimizer = torch.optim.Adam(
                net.parameters(), lr=self.lr, weight_decay=self.weight_decay
            )
            loss_fn = nn.CrossEntropyLoss(weight=weight.to(device))
            net.train()
            for _ in range(self.epochs):
                order = generator.permutation(len(bags))
                for start in range(0, len(order), self.bag_batch_size):
                    batch = order[start : start + self.bag_batch_size]
                    sampled = [_sample(bags[i], self.max_tiles, generator) for i in batch]
                    x, mask = _pad(sampled, device)
                    logits, _ = net(x, mask)
                    target = torch.as_tensor(codes[batch], device=device)
                    loss = loss_fn(logits, target)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        net.eval()
        self._net = net

    @torch.inference_mode()
    def _predict_abmil(self, bags: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        device = self._torch_device()
        self._net.to(device).eval()
        probabilities, attentions = [], []
        for bag in bags:  # one slide at a time: all its tiles, no padding
            if bag.shape[1] != len(self._mean):
                raise ValueError(
                    f"bags have {bag.shape[1]} features; the classifier was fit on "
                    f"{len(self._mean)}."
                )
            x = torch.as_tensor((bag - self._mean) / self._std, dtype=torch.float32)
            logits, attention = self._net(x.unsqueeze(0).to(device))
            probabilities.append(torch.softmax(logits, dim=-1)[0].cpu().numpy())
            attentions.append(attention[0].cpu().numpy())
        return np.stack(probabilities).astype(np.float64), attentions

    def _is_fitted(self) -> bool:
        # as scikit-learn: the fitted attributes (trailing underscore) exist only after fit
        return hasattr(self, "classes_")

    def _check_fitted(self) -> None:
        if not self._is_fitted():
            raise RuntimeError("This SlideClassifier is not fitted: call fit() first.")


def fit_slide_classifier(
    features: Any,
    labels: Any,
    cv: int | Any = 5,
    method: Literal["auto", "logistic", "abmil"] = "auto",
    seed: int = 0,
    refit: bool = True,
    **classifier_kwargs: Any,
) -> CrossValidationResult:
    """Cross-validated slide classification from tile features: AUC per fold and overall.

    Parameters
    ----------
    features
        Slides x features (a DataFrame from :func:`~rankbygene.tl.slide_features`, or an array),
        or bags of tile features (``slide_features(..., method="attention")``).
    labels
        One label per slide (two or more classes); a Series or dict is aligned by slide id.
    cv
        Number of stratified folds (shuffled with ``seed``), or a scikit-learn splitter.
    method
        ``"logistic"`` (mean pooling + logistic regression), ``"abmil"`` (gated attention MIL)
        or ``"auto"``: ``"abmil"`` for bags, ``"logistic"`` for a table.
    seed
        Seed of the folds and of the classifier.
    refit
        Also fit a classifier on all slides (``result.model``).
    **classifier_kwargs
        Passed to :class:`SlideClassifier` (``C``, ``epochs``, ``hidden``, ...).

    Returns
    -------
    :class:`~rankbygene.tl.CrossValidationResult`: ``folds`` (``auc``, ``accuracy``,
    ``balanced_accuracy`` per fold), ``summary`` (mean, std over folds and pooled over all
    out-of-fold predictions), ``predictions`` (per slide: ``fold``, ``label``, ``score``, the
    out-of-fold probability of the positive class, or ``proba_<class>`` for several classes).
    AUC is one-vs-rest, macro-averaged, with more than two classes.

    Raises
    ------
    ValueError
        The labels have a single class, missing values, or a class with fewer slides than folds.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> features = rbg.tl.slide_features(done)  # doctest: +SKIP
    >>> result = rbg.tl.fit_slide_classifier(features, cohort["label"], cv=5)  # doctest: +SKIP
    >>> result.summary.loc["auc"]  # doctest: +SKIP
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    ids, matrix, bags = as_table(features)
    if method == "auto":
        method = "abmil" if bags is not None else "logistic"
    if method not in ("logistic", "abmil"):
        raise ValueError(f"method must be 'auto', 'logistic' or 'abmil'; got {method!r}.")
    if method == "abmil" and bags is None:
        raise ValueError(
            "method='abmil' needs the tiles of each slide (bags): use "
            "slide_features(..., method='attention')."
        )
    n_splits = cv if isinstance(cv, int) else None
    y = _check_labels(align(labels, ids, "labels"), ids, n_splits=n_splits)
    classes, codes = np.unique(y, return_inverse=True)
    splitter = make_folds(cv, seed)
    data = {s: bags[s] for s in ids} if bags is not None else pd.DataFrame(matrix, index=ids)

    def fit_fold(
        k: int, train: np.ndarray, test: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        model = SlideClassifier(method, seed=seed, **classifier_kwargs)
        model.fit(_subset(data, ids, train), y[train])
        if len(model.classes_) != len(classes):
            raise ValueError(f"Fold {k}'s training slides lack a class; use fewer folds.")
        proba = model.predict_proba(_subset(data, ids, test))
        predicted = proba.argmax(axis=1)
        metrics = {
            "auc": _auc(codes[test], proba, len(classes)),
            "accuracy": accuracy_score(codes[test], predicted),
            "balanced_accuracy": balanced_accuracy_score(codes[test], predicted),
        }
        return {"proba": proba}, metrics

    folds, fold_of, out_of_fold = cross_validate(splitter, len(ids), codes, fit_fold)
    probabilities = out_of_fold["proba"]
    pooled = {
        "auc": _auc(codes, probabilities, len(classes)),
        "accuracy": accuracy_score(codes, probabilities.argmax(axis=1)),
        "balanced_accuracy": balanced_accuracy_score(codes, probabilities.argmax(axis=1)),
    }
    summary = summarize_folds(folds, pooled)
    predictions = pd.DataFrame({"fold": fold_of, "label": y}, index=pd.Index(ids, name="slide_id"))
    if len(classes) == 2:
        predictions["score"] = probabilities[:, 1]
    else:
        for j, c in enumerate(classes):
            predictions[f"proba_{c}"] = probabilities[:, j]
    final = SlideClassifier(method, seed=seed, **classifier_kwargs).fit(data, y) if refit else None
    logger.info(
        f"slide classifier ({method}), {len(folds)}-fold AUC {summary.loc['auc', 'mean']:.3f} "
        f"± {summary.loc['auc', 'std']:.3f}"
    )
    return CrossValidationResult(
        folds, summary, predictions, final, {"method": method, "classes": list(classes)}
    )


# ---------------------------------------------------------------------------------- helpers


def _check_labels(values: np.ndarray, ids: list[str], n_splits: int | None) -> np.ndarray:
    values = np.asarray(values)
    missing = pd.isna(values)
    if missing.any():
        first = [ids[i] for i in np.flatnonzero(missing)[:3]]
        raise ValueError(f"labels are missing for {int(missing.sum())} slides (e.g. {first}).")
    classes, counts = np.unique(values, return_counts=True)
    if len(classes) < 2:
        only = classes[0].item() if isinstance(classes[0], np.generic) else classes[0]
        raise ValueError(
            f"labels have a single class {only!r} over {len(values)} slides: "
            "classification needs at least two."
        )
    if n_splits is not None:
        small = {
            c.item() if isinstance(c, np.generic) else c: int(n)
            for c, n in zip(classes, counts, strict=True)
            if n < n_splits
        }
        if small:
            raise ValueError(
                f"Classes {small} have fewer slides than cv={n_splits} folds: every test fold "
                "needs each class; lower cv."
            )
    return values


def _subset(data: Bags | pd.DataFrame, ids: list[str], rows: np.ndarray) -> Bags | pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data.iloc[rows]
    return {ids[i]: data[ids[i]] for i in rows}


def _auc(codes: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(codes)) < 2:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(codes, proba[:, 1]))
    present = np.unique(codes)
    if len(present) < n_classes:
        return float("nan")
    return float(roc_auc_score(codes, proba, multi_class="ovr", average="macro"))


def _sample(bag: np.ndarray, max_tiles: int, rng: np.random.Generator) -> np.ndarray:
    if len(bag) <= max_tiles:
        return bag
    return bag[rng.choice(len(bag), max_tiles, replace=False)]


def _pad(bags: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(b) for b in bags)
    x = torch.zeros((len(bags), longest, bags[0].shape[1]), dtype=torch.float32)
    mask = torch.zeros((len(bags), longest), dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = torch.from_numpy(np.ascontiguousarray(bag, dtype=np.float32))
        mask[i, : len(bag)] = True
    return x.to(device), mask.to(device)
