"""evaluate_expression: numbers equal a hand computation; bad input fails clearly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy.stats import pearsonr, spearmanr

import rankbygene as rbg


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    counts = rng.poisson(5.0, size=(12, 3)).astype(np.float32)
    counts[:, 2] += np.arange(12)  # one gene with a trend
    adata = AnnData(counts.copy(), obs=pd.DataFrame(index=[f"s{i}" for i in range(12)]))
    adata.var_names = ["A", "B", "C"]
    adata.layers["counts"] = counts
    adata.obs["library_id"] = ["x"] * 6 + ["y"] * 6
    predicted = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4) + rng.normal(0, 0.3, (12, 3))
    adata.layers["rankbygene_predicted"] = predicted.astype(np.float32)
    return adata


def test_matches_hand_computation(small):
    scores = rbg.tl.evaluate_expression(small, library_key="library_id")
    assert list(scores.columns) == ["library", "gene", "pearson", "spearman", "mae", "mse"]
    assert len(scores) == 6  # 2 libraries x 3 genes
    counts = small.layers["counts"]
    truth = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    pred = small.layers["rankbygene_predicted"]
    for library, rows in (("x", slice(0, 6)), ("y", slice(6, 12))):
        for j, gene in enumerate("ABC"):
            row = scores[(scores.library == library) & (scores.gene == gene)].iloc[0]
            y, p = truth[rows, j], pred[rows, j]
            assert row.pearson == pytest.approx(pearsonr(y, p)[0], abs=1e-5)
            assert row.spearman == pytest.approx(spearmanr(y, p)[0], abs=1e-5)
            assert row.mae == pytest.approx(np.abs(y - p).mean(), abs=1e-5)
            assert row.mse == pytest.approx(((y - p) ** 2).mean(), abs=1e-5)


def test_summary_means_over_genes_then_libraries(small):
    scores = rbg.tl.evaluate_expression(small, library_key="library_id")
    summary = rbg.tl.summarize_expression_scores(scores)
    assert list(summary.index) == ["x", "y", "mean"]
    x_mean = scores[scores.library == "x"].pearson.mean()
    y_mean = scores[scores.library == "y"].pearson.mean()
    assert summary.loc["mean", "pearson"] == pytest.approx((x_mean + y_mean) / 2)
    assert summary.loc["x", "n_genes"] == 3


def test_constant_gene_is_left_out(small):
    small.layers["rankbygene_predicted"][:, 0] = 1.0
    scores = rbg.tl.evaluate_expression(small)
    assert np.isnan(scores.loc[scores.gene == "A", "pearson"]).all()
    summary = rbg.tl.summarize_expression_scores(scores)
    assert summary.loc["all", "n_genes"] == 2


def test_gene_subset_and_log_normalised_truth(small):
    small.layers["lognorm"] = rbg.tl.log_normalize(small.layers["counts"])
    scores = rbg.tl.evaluate_expression(
        small, layer_true="lognorm", true_is_counts=False, genes=["C"]
    )
    assert list(scores.gene) == ["C"]


def test_bad_input(small):
    with pytest.raises(KeyError, match="predict_expression"):
        rbg.tl.evaluate_expression(small, layer_pred="missing")
    with pytest.raises(ValueError, match="None of the 2 genes"):
        rbg.tl.evaluate_expression(small, genes=["Q", "R"])
    with pytest.raises(KeyError, match="library_key"):
        rbg.tl.evaluate_expression(small, library_key="nope")
    small.layers["counts"][0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        rbg.tl.evaluate_expression(small)
