"""What the package writes chains into squidpy's spatial statistics and scanpy's clustering."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import squidpy as sq


@pytest.fixture(scope="module")
def slide(predicted_heldout):
    """The held-out slide with predicted expression and the image embedding."""
    test = predicted_heldout.copy()
    sq.gr.spatial_neighbors(test, coord_type="grid", n_neighs=6)
    return test


def test_moran_on_predicted_genes(slide):
    markers = [g for g in slide.var_names if not g.startswith("HK_")][:6]
    sq.gr.spatial_autocorr(
        slide, mode="moran", genes=markers, layer="rankbygene_predicted", n_perms=None, n_jobs=1
    )
    moran = slide.uns["moranI"]
    assert list(moran.index.sort_values()) == sorted(markers)
    # predicted marker expression follows the tissue regions: strongly autocorrelated
    assert (moran["I"] > 0.3).all(), moran["I"]
    assert (moran["pval_norm"] < 1e-3).all()


def test_moran_on_embedding_dimensions(slide):
    sq.gr.spatial_autocorr(
        slide, mode="moran", attr="obsm", layer="X_rankbygene", genes=[0, 1, 2, 3], n_jobs=1
    )
    moran = slide.uns["moranI"]
    assert len(moran) == 4
    assert np.isfinite(moran["I"]).all()
    assert moran["I"].max() > 0.2


def test_neighbourhood_enrichment_of_embedding_clusters(slide):
    sc.pp.neighbors(slide, use_rep="X_rankbygene", n_neighbors=10, random_state=0)
    sc.tl.leiden(slide, resolution=0.5, key_added="rbg_leiden", random_state=0, flavor="igraph")
    n_clusters = slide.obs["rbg_leiden"].nunique()
    assert n_clusters >= 2
    sq.gr.nhood_enrichment(slide, cluster_key="rbg_leiden", n_perms=100, seed=0, n_jobs=1)
    zscore = slide.uns["rbg_leiden_nhood_enrichment"]["zscore"]
    assert zscore.shape == (n_clusters, n_clusters)
    # clusters of the image embedding are spatially coherent: each neighbours itself
    assert (np.diag(zscore) > 2).mean() >= 0.5
