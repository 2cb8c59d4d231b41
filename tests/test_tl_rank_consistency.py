"""tl.rank_consistency: per-spot Spearman of image- against gene-side orderings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anndata import AnnData
from scipy.stats import spearmanr

import rankbygene as rbg
from rankbygene.losses import cosine_similarity_matrix, rank_agreement


def _adata(n=40, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(5.0, size=(n, 12)).astype(np.float32)
    adata = AnnData(X=counts.copy(), layers={"counts": counts})
    adata.obs["library_id"] = np.repeat(["a", "b"], n // 2)
    expression = rbg.tl.log_normalize(counts)
    adata.obsm["X_gene"] = expression - expression.mean(axis=1, keepdims=True)
    return adata


def test_identical_sides_score_one_and_reversed_minus_one():
    adata = _adata()
    adata.obsm["X_same"] = adata.obsm["X_gene"] * 3.0  # cosine ignores the scale
    rbg.tl.rank_consistency(adata, use_rep="X_same", n_neighbors=10, library_key="library_id")
    np.testing.assert_allclose(adata.obs["rank_consistency"], 1.0)
    out = rbg.tl.rank_consistency(
        adata, use_rep="X_same", gene_rep="X_gene", n_neighbors=None, key_added="rc", copy=True
    )
    np.testing.assert_allclose(out.obs["rc"], 1.0)
    assert "rc" not in adata.obs


def test_matches_scipy_for_one_anchor():
    adata = _adata(seed=1)
    rng = np.random.default_rng(2)
    adata.obsm["X_rankbygene"] = rng.normal(size=(adata.n_obs, 5))
    rbg.tl.rank_consistency(adata, n_neighbors=7, library_key="library_id")
    # by hand: anchor 3 of library "a", its 7 nearest gene-side neighbours within "a"
    rows = np.flatnonzero(adata.obs["library_id"] == "a")
    gene = adata.obsm["X_gene"][rows]
    gene = gene / np.linalg.norm(gene, axis=1, keepdims=True)
    image = adata.obsm["X_rankbygene"][rows]
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    s_gene = gene @ gene[3]
    s_image = image @ image[3]
    s_gene[3] = -np.inf
    top = np.argsort(-s_gene)[:7]
    expected = spearmanr(s_gene[top], s_image[top]).statistic
    assert adata.obs["rank_consistency"].iloc[rows[3]] == pytest.approx(expected)


@pytest.mark.parametrize(("n_neighbors", "seed"), [(None, 0), (5, 1), (12, 2), (59, 3)])
def test_numpy_scores_agree_with_the_torch_rank_agreement(n_neighbors, seed):
    # One measure in two implementations: per-spot scores here (numpy, float64), their mean in
    # training (torch, float32); random embeddings have no ties that rounding could break, and
    # the image side shares the gene side's coordinates so that the scores are far from 0.
    rng = np.random.default_rng(seed)
    gene = rng.normal(size=(60, 6))
    image = np.hstack([gene, rng.normal(size=(60, 4))])
    adata = AnnData(obsm={"X_image": image, "X_gene": gene}, shape=(60, 0))
    rbg.tl.rank_consistency(adata, use_rep="X_image", gene_rep="X_gene", n_neighbors=n_neighbors)
    expected = rank_agreement(
        cosine_similarity_matrix(torch.as_tensor(image)),
        cosine_similarity_matrix(torch.as_tensor(gene)),
        k=n_neighbors,
    )
    scores = adata.obs["rank_consistency"]
    assert scores.notna().all()
    assert scores.mean() > 0.2  # measured: 0.27 to 0.80
    assert scores.mean() == pytest.approx(float(expected), abs=1e-5)


def test_trained_embedding_is_more_consistent_than_untrained(trained_synthetic):
    run = trained_synthetic
    test = run.test.copy()
    test.obsm["X_rankbygene"] = run.model.get_image_representation(test)
    rbg.tl.rank_consistency(test)
    trained = test.obs["rank_consistency"].mean()
    untrained = rbg.RankByGene(run.train, image_encoder="resnet18", input_size=48, n_latent=32)
    test.obsm["X_untrained"] = untrained.get_image_representation(test)
    rbg.tl.rank_consistency(test, use_rep="X_untrained", key_added="untrained")
    # Measured: 0.155 trained vs 0.084 untrained (mean per-spot Spearman).
    assert trained > test.obs["untrained"].mean() + 0.03


def test_bad_input():
    adata = _adata()
    with pytest.raises(KeyError, match="X_rankbygene"):
        rbg.tl.rank_consistency(adata)
    adata.obsm["X_rankbygene"] = np.ones((adata.n_obs, 3))
    with pytest.raises(KeyError, match="raw"):
        rbg.tl.rank_consistency(adata, layer="raw")
    with pytest.raises(KeyError, match="batch"):
        rbg.tl.rank_consistency(adata, library_key="batch")
    with pytest.raises(ValueError, match="n_neighbors"):
        rbg.tl.rank_consistency(adata, n_neighbors=1)
