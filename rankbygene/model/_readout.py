"""Expression from image representations: ridge, k-nearest-neighbour retrieval, MLP head.

Each predictor is fitted on reference spots (image representation -> log-normalised expression)
and applied to query spots that have only images.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch
from torch import nn

from rankbygene._metrics import pearson_per_gene
from rankbygene._precision import float32_region

PredictionMethod = Literal["ridge", "knn", "mlp"]


#: Ridge penalties searched on standardised features. Wide on purpose: with ~1,000 features and
#: a few hundred spots per section the best penalty for a new section lies at 1e4-1e7.
RIDGE_ALPHAS = np.logspace(-1, 7, 17)


class RidgePredictor:
    """Standardised features -> expression by ridge regression, the penalty chosen by CV.

    The closed-form read-out of the HEST benchmark: frozen features, linear model. The penalty
    is chosen on the grid ``alphas`` by **leave-one-library-out** cross-validation when the
    reference spans several libraries (``groups``), scored by the mean Pearson r over genes, as
    the read-out is judged. Neighbouring spots of one slide share their expression, so holding
    out single spots (the fallback for one library: scikit-learn's efficient leave-one-out)
    rewards fitting the slide and picks too small a penalty for a new slide.

    Parameters
    ----------
    alphas
        Penalties to choose from (default :data:`RIDGE_ALPHAS`).
    alpha
        A fixed penalty: no selection.
    n_components
        Project the standardised features on their first principal components first (the HEST
        protocol uses 256).

    Attributes
    ----------
    alpha_
        The penalty used.
    selection_
        How it was chosen: ``"leave-one-library-out"``, ``"leave-one-spot-out"`` or ``"fixed"``.
    cv_scores_
        Mean Pearson r per penalty in leave-one-library-out selection (else ``None``).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(60, 4)); y = x @ rng.normal(size=(4, 3))
    >>> groups = np.repeat(["a", "b", "c"], 20)
    >>> ridge = RidgePredictor().fit(x, y, groups=groups)
    >>> ridge.predict(x).shape, ridge.selection_
    ((60, 3), 'leave-one-library-out')
    """

    def __init__(
        self,
        alphas: np.ndarray | None = None,
        alpha: float | None = None,
        n_components: int | None = None,
    ) -> None:
        self.alphas = RIDGE_ALPHAS if alphas is None else np.asarray(alphas, dtype=np.float64)
        if alpha is not None and alpha < 0:
            raise ValueError(f"alpha must be >= 0; got {alpha}.")
        if n_components is not None and n_components < 1:
            raise ValueError(f"n_components must be >= 1; got {n_components}.")
        self.alpha = alpha
        self.n_components = n_components

    @classmethod
    def hest(cls, n_genes: int, n_components: int = 256) -> RidgePredictor:
        """The HEST-benchmark read-out: PCA to 256 components, ``alpha = 100 / (256 * n_genes)``.

        For comparison with published HEST numbers; the model keeps an intercept (HEST's has
        none), which leaves Pearson r unchanged and makes MAE meaningful.
        """
        return cls(alpha=100.0 / (n_components * n_genes), n_components=n_components)

    def fit(
        self, features: np.ndarray, expression: np.ndarray, groups: np.ndarray | None = None
    ) -> RidgePredictor:
        """Fit on reference spots; ``groups`` (each spot's library) enables library-wise CV."""
        features = np.asarray(features, dtype=np.float64)
        expression = np.asarray(expression, dtype=np.float64)
        if len(features) != len(expression):
            raise ValueError(
                f"features ({len(features)} spots) and expression ({len(expression)} spots) "
                "differ in length."
            )
        self.mean_ = features.mean(axis=0)
        self.scale_ = features.std(axis=0) + 1e-6
        x = self._scale(features)
        self.components_ = None
        if self.n_components is not None and self.n_components < min(x.shape):
            _, _, vt = np.linalg.svd(x, full_matrices=False)
            self.components_ = vt[: self.n_components].T
            x = x @ self.components_
        self.cv_scores_ = None
        groups = None if groups is None else np.asarray(groups)
        if self.alpha is not None:
            self.alpha_, self.selection_ = float(self.alpha), "fixed"
        elif groups is not None and len(np.unique(groups)) >= 2:
            self.cv_scores_ = _library_cv_scores(x, expression, groups, self.alphas)
            self.alpha_ = float(self.alphas[int(np.nanargmax(self.cv_scores_))])
            self.selection_ = "leave-one-library-out"
        else:
            from sklearn.linear_model import RidgeCV

            self.alpha_ = float(RidgeCV(alphas=self.alphas).fit(x, expression).alpha_)
            self.selection_ = "leave-one-spot-out"
        self.intercept_ = expression.mean(axis=0)
        self.coef_ = _ridge_path(x, expression - self.intercept_, [self.alpha_])[0]
        return self

    def _scale(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean_) / self.scale_

    def _project(self, features: np.ndarray) -> np.ndarray:
        x = self._scale(features)
        return x if self.components_ is None else x @ self.components_

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (self._project(features) @ self.coef_ + self.intercept_).astype(np.float32)


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas) -> list[np.ndarray]:
    """Ridge coefficients of centred ``x`` (standardised) and ``y`` for each penalty (one SVD)."""
    u, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    uty = u.T @ (y - y.mean(axis=0))
    return [vt.T @ ((s / (s**2 + alpha))[:, None] * uty) for alpha in alphas]


def _library_cv_scores(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas: np.ndarray
) -> np.ndarray:
    """Mean over held-out libraries of the mean Pearson r over genes, per penalty."""
    scores = []
    for group in np.unique(groups):
        held = groups == group
        fit_x, fit_y = x[~held], y[~held]
        x_mean, y_mean = fit_x.mean(axis=0), fit_y.mean(axis=0)
        coefs = _ridge_path(fit_x, fit_y, alphas)
        query = x[held] - x_mean
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # genes constant in one library
            scores.append(
                [np.nanmean(pearson_per_gene(y[held], query @ c + y_mean)) for c in coefs]
            )
    return np.nanmean(np.asarray(scores, dtype=np.float64), axis=0)


class KnnPredictor:
    """BLEEP-style retrieval: the ``k`` reference spots whose gene embeddings are most similar to
    the query's image embedding, averaged with softmax(similarity / temperature) weights.

    Examples
    --------
    >>> ref = np.eye(3, dtype=np.float32); expr = np.arange(9.0).reshape(3, 3)
    >>> KnnPredictor(k=1).fit(ref, expr).predict(ref[[2]])
    array([[6., 7., 8.]], dtype=float32)
    """

    def __init__(self, k: int = 50, temperature: float = 0.07) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}.")
        self.k = int(k)
        self.temperature = float(temperature)

    def fit(self, reference_embedding: np.ndarray, expression: np.ndarray) -> KnnPredictor:
        if self.k > len(reference_embedding):
            raise ValueError(
                f"k={self.k} is larger than the reference ({len(reference_embedding)} spots)."
            )
        self.reference_ = _unit(reference_embedding)
        self.expression_ = np.asarray(expression, dtype=np.float32)
        return self

    def predict(self, query_embedding: np.ndarray, chunk: int = 4096) -> np.ndarray:
        query = _unit(query_embedding)
        out = np.empty((len(query), self.expression_.shape[1]), dtype=np.float32)
        for start in range(0, len(query), chunk):
            sim = query[start : start + chunk] @ self.reference_.T
            top = np.argpartition(-sim, self.k - 1, axis=1)[:, : self.k]
            top_sim = np.take_along_axis(sim, top, axis=1) / self.temperature
            weights = np.exp(top_sim - top_sim.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            out[start : start + chunk] = np.einsum("qk,qkg->qg", weights, self.expression_[top])
        return out


class MlpPredictor:
    """A small MLP head (features -> hidden -> genes) trained with MSE on frozen features.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(64, 8)).astype("float32"); y = np.tanh(x[:, :2])
    >>> MlpPredictor(max_epochs=50).fit(x, y).predict(x).shape
    (64, 2)
    """

    def __init__(
        self,
        hidden: int = 256,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 200,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.seed = seed

    def fit(self, features: np.ndarray, expression: np.ndarray) -> MlpPredictor:
        self.mean_ = features.mean(axis=0)
        self.scale_ = features.std(axis=0) + 1e-6
        # callers may be inside torch.inference_mode (the model's getters) or autocast
        with torch.inference_mode(False), torch.enable_grad(), float32_region("cpu"):
            self._train(
                torch.as_tensor((features - self.mean_) / self.scale_, dtype=torch.float32),
                torch.as_tensor(expression, dtype=torch.float32),
            )
        self.net_.eval()
        return self

    def _train(self, x: torch.Tensor, y: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        # seeded initialisation and dropout without touching the caller's global RNG state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._fit_net(x, y, generator)

    def _fit_net(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        self.net_ = nn.Sequential(
            nn.Linear(x.shape[1], self.hidden),
            nn.GELU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden, y.shape[1]),
        )
        optimizer = torch.optim.AdamW(
            self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        self.net_.train()
        for _ in range(self.max_epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), self.batch_size):
                idx = order[start : start + self.batch_size]
                loss = nn.functional.mse_loss(self.net_(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = torch.as_tensor((features - self.mean_) / self.scale_, dtype=torch.float32)
        with torch.no_grad(), float32_region("cpu"):
            return self.net_(x).numpy().astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def with_neighbor_context(
    features: np.ndarray, coords: np.ndarray, libraries: np.ndarray, n_neighbors: int
) -> np.ndarray:
    """Each spot's features beside the mean features of its nearest spots on the same slide.

    Image-only neighbourhood context, as TRIPLEX uses it: expression varies smoothly over tissue,
    and the surrounding patches tell a linear read-out what the spot's own patch misses.

    Parameters
    ----------
    features
        ``(n_spots, n_features)``.
    coords
        ``(n_spots, 2)`` spot centres.
    libraries
        Each spot's library; neighbours are taken within a library only.
    n_neighbors
        Spots averaged (fewer when a library has fewer other spots).

    Returns
    -------
    ``(n_spots, 2 * n_features)``.

    Examples
    --------
    >>> f = np.array([[0.0], [1.0], [5.0]]); xy = np.array([[0, 0], [1, 0], [9, 0]])
    >>> with_neighbor_context(f, xy, np.array(["a", "a", "a"]), 1)[:, 1]
    array([1., 0., 1.])
    """
    from sklearn.neighbors import NearestNeighbors

    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1; got {n_neighbors}.")
    features = np.asarray(features)
    context = features.copy()  # a spot alone on its slide is its own context
    for library in np.unique(libraries):
        spots = np.flatnonzero(libraries == library)
        k = min(n_neighbors, len(spots) - 1)
        if k < 1:
            continue
        index = NearestNeighbors(n_neighbors=k + 1).fit(coords[spots])
        _, nearest = index.kneighbors(coords[spots])
        context[spots] = features[spots][nearest[:, 1:]].mean(axis=1)
    return np.hstack([features, context])
