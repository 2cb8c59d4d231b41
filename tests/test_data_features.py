"""SpotPatchDataset serving precomputed features, ImageSettings and PatchExtractor.from_settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from scipy import sparse
from torch.utils.data import DataLoader

from rankbygene.data import (
    BATCH_KEYS,
    IMAGENET_MEAN,
    ImageSettings,
    PatchExtractor,
    SpotPatchDataset,
)

N_OBS, N_VIEWS, N_FEATURES = 6, 3, 4


def feature_views() -> np.ndarray:
    """Features whose value says spot, view and feature: 100 * spot + 10 * view + feature."""
    spot, view, feature = np.meshgrid(
        np.arange(N_OBS), np.arange(N_VIEWS), np.arange(N_FEATURES), indexing="ij"
    )
    return (100 * spot + 10 * view + feature).astype(np.float64)


def test_plain_features_with_expression_and_extra():
    features = feature_views()[:, 0]
    expression = sparse.csr_matrix(np.arange(N_OBS * 2, dtype=np.int64).reshape(N_OBS, 2))
    dataset = SpotPatchDataset(
        features=features, expression=expression, extra={"w": np.arange(N_OBS) * 0.5}
    )
    assert len(dataset) == N_OBS
    item = dataset[4]
    assert set(item) == {BATCH_KEYS.features, BATCH_KEYS.expression, BATCH_KEYS.index, "w"}
    assert item[BATCH_KEYS.features].dtype == torch.float32
    np.testing.assert_array_equal(item[BATCH_KEYS.features].numpy(), features[4])
    np.testing.assert_array_equal(item[BATCH_KEYS.expression].numpy(), [8.0, 9.0])
    assert int(item[BATCH_KEYS.index]) == 4
    assert float(item["w"]) == 2.0
    assert "features 4" in repr(dataset)


def test_feature_views_and_indices():
    features = feature_views()
    dataset = SpotPatchDataset(features=features, indices=[5, 1])
    assert len(dataset) == 2
    item = dataset[0]
    assert int(item[BATCH_KEYS.index]) == 5
    # without random views student and teacher both get the plain view
    np.testing.assert_array_equal(item[BATCH_KEYS.features].numpy(), features[5, 0])
    np.testing.assert_array_equal(item[BATCH_KEYS.features_weak].numpy(), features[5, 0])
    mask = np.zeros(N_OBS, dtype=bool)
    mask[[0, 3]] = True
    np.testing.assert_array_equal(SpotPatchDataset(features=features, indices=mask).indices, [0, 3])


def test_random_views_in_a_loader():
    features = feature_views()
    dataset = SpotPatchDataset(features=features, random_views=True)
    torch.manual_seed(0)
    batch = next(iter(DataLoader(dataset, batch_size=N_OBS)))
    student, teacher = batch[BATCH_KEYS.features], batch[BATCH_KEYS.features_weak]
    assert student.shape == teacher.shape == (N_OBS, N_FEATURES)
    np.testing.assert_array_equal(teacher.numpy(), features[:, 0])
    views = (student[:, 0].numpy() % 100) // 10
    assert set(views) <= {1, 2}  # an augmented view, never the plain one


def test_single_view_features_never_random():
    features = feature_views()[:, :1]
    dataset = SpotPatchDataset(features=features, random_views=True)
    for _ in range(5):
        np.testing.assert_array_equal(dataset[2][BATCH_KEYS.features].numpy(), features[2, 0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"features": np.zeros(N_OBS)}, ValueError, r"features must be .*got shape \(6,\)"),
        (
            {"features": np.zeros((N_OBS, 2, 3, 4))},
            ValueError,
            r"features must be .*got shape \(6, 2, 3, 4\)",
        ),
        ({"features": np.zeros((N_OBS, 0))}, ValueError, r"features must be .*\(6, 0\)"),
        ({"features": np.full((N_OBS, 2), "a")}, ValueError, "features must be numeric"),
        (
            {"features": np.zeros((N_OBS, 2)), "expression": np.zeros((3, 2))},
            ValueError,
            "expression has 3 rows",
        ),
        ({"features": np.zeros((N_OBS, 2)), "indices": [N_OBS]}, IndexError, "indices must lie"),
        (
            {"features": np.zeros((N_OBS, 2)), "indices": np.ones(3, dtype=bool)},
            ValueError,
            r"n_obs = 6 entries; got \(3,\)",
        ),
        ({"features": np.zeros((N_OBS, 2)), "n_views": 2}, ValueError, "n_views are for patches"),
        (
            {"features": np.zeros((N_OBS, 2)), "transform": lambda patch: patch},
            ValueError,
            "transform and n_views are for patches",
        ),
        (
            {"features": np.zeros((N_OBS, 2)), "extra": {"features": np.zeros(N_OBS)}},
            ValueError,
            "reserved",
        ),
        ({}, TypeError, "patches must be a PatchExtractor; got NoneType"),
    ],
)
def test_bad_feature_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SpotPatchDataset(**kwargs)


@pytest.fixture
def adata() -> AnnData:
    image = np.random.default_rng(0).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    adata = AnnData(
        np.zeros((3, 2), dtype=np.float32),
        obs=pd.DataFrame({"library_id": ["lib"] * 3}, index=["a", "b", "c"]),
        obsm={"spatial": np.array([[20.0, 20.0], [40.0, 30.0], [60.0, 40.0]])},
    )
    adata.uns["spatial"] = {
        "lib": {
            "images": {"hires": image},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 16.0},
        }
    }
    return adata


def test_patches_with_features_or_random_views_refused(adata):
    patches = PatchExtractor(adata, patch_size=8)
    with pytest.raises(ValueError, match="not both"):
        SpotPatchDataset(patches, features=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="random_views is for features"):
        SpotPatchDataset(patches, random_views=True)


def test_from_settings_matches_the_constructor(adata):
    settings = ImageSettings(library_key="library_id", patch_scale=1.5, patch_size=12)
    patches = PatchExtractor.from_settings(adata, settings)
    direct = PatchExtractor(adata, library_key="library_id", patch_scale=1.5, patch_size=12)
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(patches[i], direct[i])
    # an AnnData without the settings' library column (one library) still works
    del adata.obs["library_id"]
    assert PatchExtractor.from_settings(adata, settings)[0].shape == (12, 12, 3)


def test_image_settings():
    settings = ImageSettings(mean=[0.5, 0.5, 0.5], std=np.array([0.2, 0.2, 0.2]), patch_size=64)
    assert settings.mean == (0.5, 0.5, 0.5)
    assert settings.std == (0.2, 0.2, 0.2)
    assert not settings.uses_features
    assert ImageSettings(features_key="X_uni").uses_features
    assert hash(settings) == hash(dataclasses.replace(settings))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.patch_size = 32
    assert ImageSettings(mean=IMAGENET_MEAN).mean == tuple(IMAGENET_MEAN)
    for kwargs, match in [
        ({"patch_scale": 0}, "patch_scale"),
        ({"patch_scale": float("nan")}, "patch_scale"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 2.5}, "patch_size"),
        ({"mean": (0.5, 0.5)}, "mean needs 3 values"),
    ]:
        with pytest.raises(ValueError, match=match):
            ImageSettings(**kwargs)
