"""The conventions every function shares: one rule for library_key, parameter docs written once."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import rankbygene as rbg
from rankbygene._docs import d
from rankbygene.data import PatchExtractor

#: Public callables taking ``library_key`` with the meaning the shared docs give it.
#: ``io.from_spatialdata`` is left out: there it names the column it writes.
FUNCTIONS = [
    *(getattr(rbg.pp, name) for name in rbg.pp.__all__),
    *(getattr(rbg.tl, name) for name in rbg.tl.__all__),
    *(getattr(rbg.pl, name) for name in rbg.pl.__all__),
    rbg.io.to_spatialdata,
    PatchExtractor,
]
MODEL_METHODS = [
    rbg.RankByGene.predict_expression,
    rbg.RankByGene.get_image_representation,
    rbg.RankByGene.get_latent_representation,
    PatchExtractor.from_settings,
]


def _takes(obj, name: str) -> bool:
    try:
        return name in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


def _name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


@pytest.mark.parametrize("obj", [f for f in FUNCTIONS if _takes(f, "library_key")], ids=_name)
def test_library_key_is_documented_once_for_functions(obj):
    assert d.params["library_key"] in inspect.cleandoc(obj.__doc__)


@pytest.mark.parametrize("obj", MODEL_METHODS, ids=_name)
def test_library_key_is_documented_once_for_model_methods(obj):
    assert d.params["library_key_model"] in inspect.cleandoc(obj.__doc__)


def test_setup_anndata_documents_the_function_rule():
    assert d.params["library_key"] in inspect.cleandoc(rbg.RankByGene.setup_anndata.__doc__)


@pytest.mark.parametrize("name", ["copy", "batch_size", "num_workers", "layer", "key_added"])
def test_shared_parameters_use_the_shared_text(name):
    takers = [
        f
        for f in [*FUNCTIONS, *MODEL_METHODS, rbg.pp.normalize, rbg.pp.select_genes]
        if _takes(f, name) and f.__doc__ and "%(" not in f.__doc__
    ]
    shared = [f for f in takers if d.params[name] in inspect.cleandoc(f.__doc__)]
    # every function whose docs were moved to the shared text; the rest name their own default
    expected = {
        "copy": {
            rbg.pp.select_genes,
            rbg.pp.normalize,
            rbg.pp.smooth_expression,
            rbg.tl.rank_consistency,
            rbg.tl.patch_statistics,
            rbg.RankByGene.predict_expression,
        },
        "batch_size": {rbg.RankByGene.predict_expression},
        "num_workers": {rbg.RankByGene.predict_expression},
        "layer": {rbg.pp.select_genes, rbg.pp.normalize, rbg.pp.smooth_expression},
        "key_added": {
            rbg.pp.normalize,
            rbg.pp.smooth_expression,
            rbg.tl.rank_consistency,
            rbg.tl.patch_statistics,
            rbg.RankByGene.predict_expression,
        },
    }[name]
    assert expected <= set(shared)


def _two_slides():
    adata = rbg.datasets.synthetic(n_slides=2, n_spots=60, n_genes=12, seed=3)
    rng = np.random.default_rng(0)
    adata.obsm["X_rankbygene"] = rng.normal(size=(adata.n_obs, 8)).astype(np.float32)
    adata.layers["rankbygene_predicted"] = rng.normal(size=adata.shape).astype(np.float32)
    adata.obs["slide_copy"] = adata.obs["library_id"].astype(str)  # also names the libraries
    return adata


def test_library_key_left_out_is_found_the_same_way_everywhere():
    adata = _two_slides()
    explicit = adata.copy()
    # several columns qualify: squidpy's library_id is preferred
    scores = rbg.tl.evaluate_expression(adata)
    assert sorted(scores["library"].unique()) == ["slide_0", "slide_1"]
    expected = rbg.tl.evaluate_expression(explicit, library_key="library_id")
    np.testing.assert_allclose(scores["pearson"], expected["pearson"])
    rbg.tl.rank_consistency(adata)
    rbg.tl.rank_consistency(explicit, library_key="library_id")
    np.testing.assert_allclose(adata.obs["rank_consistency"], explicit.obs["rank_consistency"])
    rbg.pp.smooth_expression(adata, layer="counts")
    rbg.pp.smooth_expression(explicit, layer="counts", library_key="library_id")
    np.testing.assert_allclose(
        adata.layers["counts_smoothed"].toarray(), explicit.layers["counts_smoothed"].toarray()
    )
    rbg.tl.patch_statistics(adata, patch_size=16)
    rbg.tl.patch_statistics(explicit, patch_size=16, library_key="library_id")
    np.testing.assert_allclose(
        adata.obsm["X_patch_statistics"], explicit.obsm["X_patch_statistics"]
    )


def test_library_key_left_out_with_no_column_fails_with_one_message():
    adata = _two_slides()
    del adata.obs["library_id"], adata.obs["slide_copy"]
    calls = [
        lambda: rbg.tl.evaluate_expression(adata),
        lambda: rbg.tl.rank_consistency(adata),
        lambda: rbg.pp.smooth_expression(adata),
        lambda: rbg.tl.patch_statistics(adata),
        lambda: rbg.RankByGene.setup_anndata(adata, layer="counts"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="no obs column has them as values: pass library_key"):
            call()
    assert "rank_consistency" not in adata.obs
    assert "smoothed" not in adata.layers
