"""Expression from image representations: ridge, k-nearest-neighbour retrieval, MLP head.

Each predictor is fitted on reference spots (image representation -> log-normalised expression)
and applied to query spots that have only images.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

PredictionMethod = Literal["ridge", "knn", "mlp"]


class RidgePredictor:
    """Standardised features, ridge regression with the penalty chosen by efficient LOO-CV.

    The closed-form protocol of the HEST benchmark: frozen features, linear read-out.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(50, 4)); y = x @ rng.normal(size=(4, 3))
    >>> RidgePredictor().fit(x, y).predict(x).shape
    (50, 3)
    """

    def __init__(self, alphas: np.ndarray | None = None) -> None:
        self.alphas = np.logspace(-2, 4, 13) if alphas is None else np.asarray(alphas)

    def fit(self, features: np.ndarray, expression: np.ndarray) -> RidgePredictor:
        from sklearn.linear_model import RidgeCV

        self.mean_ = features.mean(axis=0)
        self.scale_ = features.std(axis=0) + 1e-6
        self.model_ = RidgeCV(alphas=self.alphas).fit(self._scale(features), expression)
        self.alpha_ = float(self.model_.alpha_)
        return self

    def _scale(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean_) / self.scale_

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model_.predict(self._scale(features)).astype(np.float32)


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
        # callers may be inside torch.inference_mode (the model's getters)
        with torch.inference_mode(False), torch.enable_grad():
            self._train(
                torch.as_tensor((features - self.mean_) / self.scale_, dtype=torch.float32),
                torch.as_tensor(expression, dtype=torch.float32),
            )
        self.net_.eval()
        return self

    def _train(self, x: torch.Tensor, y: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
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
        with torch.no_grad():
            return self.net_(x).numpy().astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
