"""Plots render (Agg) and draw what they promise: panels, titles, labels; bad input fails."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import rankbygene as rbg


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def predicted(predicted_heldout):
    return predicted_heldout.copy()


def test_history_draws_each_term(trained_synthetic, tmp_path):
    axes = rbg.pl.history(trained_synthetic.model, show=False, save=tmp_path / "history.png")
    titles = [ax.get_title() for ax in axes]
    assert titles == [
        "total loss",
        "gene-image contrastive",
        "ranking consistency",
        "self-distillation",
        "rank agreement (Spearman)",
    ]
    for ax in axes:
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == ["train", "validation"]
        assert len(ax.get_lines()[0].get_xdata()) == trained_synthetic.epochs
    assert (tmp_path / "history.png").stat().st_size > 0
    with pytest.raises(KeyError, match="recorded terms"):
        rbg.pl.history(trained_synthetic.model, terms=["nonsense"], show=False)


def test_history_needs_a_trained_model(small_model):
    with pytest.raises(ValueError, match="train it first"):
        rbg.pl.history(small_model, show=False)


@pytest.fixture(scope="module")
def small_model():
    adata = rbg.datasets.synthetic(n_slides=1, n_spots=30, n_genes=12, seed=2)
    rbg.RankByGene.setup_anndata(adata, layer="counts")
    return rbg.RankByGene(adata, input_size=16, n_latent=4)


def test_expression_maps_observed_and_predicted_per_gene(predicted):
    genes = list(predicted.var_names[:2])
    axes = rbg.pl.expression_maps(predicted, genes, show=False)
    assert len(axes) == 4
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == f"{genes[0]} observed"
    assert titles[1].startswith(f"{genes[0]} predicted (r = ")
    assert titles[3].startswith(f"{genes[1]} predicted (r = ")
    r = float(titles[1].split("r = ")[1].rstrip(")"))
    assert np.isfinite(r)
    assert all(ax.images for ax in axes)  # the H&E is underneath
    assert all(ax.collections for ax in axes)  # and the spots on it
    assert "observed" not in predicted.layers


def test_expression_maps_without_counts_draws_predictions_only(trained_synthetic):
    image_only = trained_synthetic.test[:, :0].copy()
    out = trained_synthetic.model.predict_expression(image_only, copy=True)
    axes = rbg.pl.expression_maps(out, [out.var_names[0]], show=False)
    assert len(axes) == 1
    assert axes[0].get_title() == f"{out.var_names[0]} predicted"


def test_expression_maps_bad_input(predicted):
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        rbg.pl.expression_maps(predicted, ["NOT_A_GENE"], show=False)
    with pytest.raises(KeyError, match="predict_expression"):
        rbg.pl.expression_maps(predicted, ["HK_1"], layer_pred="missing", show=False)
    with pytest.raises(KeyError, match="slide_7"):
        rbg.pl.expression_maps(predicted, ["HK_1"], library_id="slide_7", show=False)


def test_gene_scores_names_best_and_worst_genes(predicted):
    scores = rbg.tl.evaluate_expression(predicted)
    ax = rbg.pl.gene_scores(scores, n_label=3, show=False)
    per_gene = scores.groupby("gene")["pearson"].mean().sort_values(ascending=False)
    named = [text.get_text() for text in ax.texts]
    assert named[:3] == list(per_gene.index[:3])
    assert named[3:] == list(per_gene.index[-3:])
    assert len(ax.get_lines()[0].get_ydata()) == per_gene.notna().sum()
    assert ax.get_ylabel() == "pearson"


def test_gene_scores_several_methods_and_benchmark_table(predicted):
    scores = rbg.tl.evaluate_expression(predicted)
    worse = scores.assign(pearson=scores["pearson"] - 0.2)
    ax = rbg.pl.gene_scores({"rankbygene": scores, "baseline": worse}, show=False)
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [label.split(" ")[0] for label in labels] == ["rankbygene", "baseline"]
    table = pd.DataFrame(
        {
            "method": ["rankbygene", "rankbygene", "regression", "regression"],
            "held_out": ["A", "B", "A", "B"],
            "pearson": [0.3, 0.2, 0.1, 0.15],
        }
    )
    ax = rbg.pl.gene_scores(table, show=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rankbygene", "regression"]
    assert len(ax.patches) == 6  # two methods x (A, B, overall)
    with pytest.raises(KeyError, match="spearman_r"):
        rbg.pl.gene_scores(scores, metric="spearman_r", show=False)


def test_embedding_umap_panels_leave_adata_alone(predicted):
    before = (set(predicted.obsm), set(predicted.obsp), set(predicted.uns))
    axes = rbg.pl.embedding(predicted, color=["region", "HK_1"], show=False)
    assert [ax.get_title() for ax in axes] == ["region", "HK_1"]
    assert all(ax.collections for ax in axes)
    assert (set(predicted.obsm), set(predicted.obsp), set(predicted.uns)) == before
    with pytest.raises(KeyError, match="neither obs columns nor genes"):
        rbg.pl.embedding(predicted, color="nothing", show=False)
    with pytest.raises(KeyError, match="X_other"):
        rbg.pl.embedding(predicted, use_rep="X_other", show=False)


def test_rank_consistency_anchor_panels(predicted):
    axes = rbg.pl.rank_consistency(predicted, n_anchors=3, show=False)
    assert len(axes) == 4
    for ax in axes[:3]:
        assert "rho = " in ax.get_title()
        assert ax.get_xlabel() == "gene-side similarity"
        assert len(ax.collections[0].get_offsets()) == 30
    assert axes[-1].get_title().startswith("all spots: mean rho")
    assert "rank_consistency" not in predicted.obs
    chosen = [ax.get_title().split("\n")[0] for ax in axes[:2]]
    axes = rbg.pl.rank_consistency(predicted, anchors=chosen, show=False)
    assert [ax.get_title().split("\n")[0] for ax in axes[:2]] == chosen


def test_rank_consistency_from_the_model(trained_synthetic):
    test = trained_synthetic.test.copy()
    axes = rbg.pl.rank_consistency(test, model=trained_synthetic.model, n_anchors=2, show=False)
    assert len(axes) == 3
    assert "X_rankbygene" not in test.obsm
