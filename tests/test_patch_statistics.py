"""Patch colour/texture statistics: one torch implementation for tl and for the model's encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.color import rgb2hed

import rankbygene as rbg
from rankbygene.data import PatchStatistics, patch_statistics_tensor

N_STATISTICS = len(rbg.tl.PATCH_STATISTICS)


def _he_like(n: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """Pinkish patches with dark purple blobs: ``(n, size, size, 3)`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3))
    for image in images:
        image[:] = [0.92, 0.75, 0.85]
        blobs = ndimage.gaussian_filter(rng.random((size, size)), 1.5) > 0.5
        image[blobs] = [0.35, 0.2, 0.5]
        image += rng.normal(0, 0.03, image.shape)
    return images.clip(0, 1)


def _column(statistics: np.ndarray, name: str) -> np.ndarray:
    return statistics[:, rbg.tl.PATCH_STATISTICS.index(name)]


def test_statistics_match_scipy_and_skimage_per_image():
    images = _he_like(3)
    got = patch_statistics_tensor(torch.as_tensor(images).permute(0, 3, 1, 2)).numpy()
    assert got.shape == (3, N_STATISTICS)
    for i, image in enumerate(images):
        hed = rgb2hed(image)
        grey = image @ np.array([0.299, 0.587, 0.114])
        gradient = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))
        laplacian = np.abs(ndimage.laplace(grey, mode="nearest"))
        expected = {
            "G_mean": image[..., 1].mean(),
            "B_sd": image[..., 2].std(),
            "hematoxylin_mean": hed[..., 0].mean(),
            "eosin_sd": hed[..., 1].std(),
            "grey_q90": np.quantile(grey, 0.9),
            "gradient_mean": gradient.mean(),
            "gradient_sd": gradient.std(),
            "laplacian_mean": laplacian.mean(),
            "nuclear_fraction": (hed[..., 0] > 0.08).mean(),
        }
        for name, value in expected.items():
            assert _column(got, name)[i] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_each_image_is_filtered_on_its_own():
    # filters over a stack of images must not reach across neighbouring images
    images = torch.as_tensor(_he_like(4, seed=3)).permute(0, 3, 1, 2)
    together = patch_statistics_tensor(images)
    alone = torch.cat([patch_statistics_tensor(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_darker_nuclei_raise_the_nuclear_statistics():
    pale = _he_like(1, seed=5)
    dark = pale.copy()
    dark[pale[..., 0] < 0.5] *= 0.5  # the nuclei only
    stats = patch_statistics_tensor(
        torch.as_tensor(np.concatenate([pale, dark])).permute(0, 3, 1, 2)
    )
    assert (
        _column(stats.numpy(), "hematoxylin_mean")[1]
        > _column(stats.numpy(), "hematoxylin_mean")[0]
    )


def test_bad_image_shape_is_named():
    with pytest.raises(ValueError, match=r"\(n, 3, h, w\); got shape \(2, 16, 16, 3\)"):
        patch_statistics_tensor(torch.zeros(2, 16, 16, 3))


def test_encoder_features_end_with_the_statistics_of_the_unnormalised_images():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = torch.as_tensor(_he_like(2, size=16)).permute(0, 3, 1, 2).float()
    normalised = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    encoder = PatchStatistics(torch.nn.Flatten(), mean, std)
    out = encoder(normalised)
    assert out.shape == (2, 3 * 16 * 16 + N_STATISTICS)
    torch.testing.assert_close(out[:, :-N_STATISTICS], normalised.flatten(1))
    torch.testing.assert_close(
        out[:, -N_STATISTICS:], patch_statistics_tensor(rgb), atol=1e-4, rtol=1e-4
    )


@pytest.fixture(scope="module")
def slide():
    return rbg.datasets.synthetic(n_slides=1, n_spots=30, n_genes=12, seed=1)


def test_tl_patch_statistics_writes_obsm_and_column_names(slide):
    adata = slide.copy()
    rbg.tl.patch_statistics(adata, library_key="library_id", patch_size=32)
    assert adata.obsm["X_patch_statistics"].shape == (adata.n_obs, N_STATISTICS)
    assert adata.uns["X_patch_statistics"]["columns"] == list(rbg.tl.PATCH_STATISTICS)
    assert np.isfinite(adata.obsm["X_patch_statistics"]).all()
    fresh = slide.copy()
    copied = rbg.tl.patch_statistics(fresh, patch_size=32, copy=True, key_added="stats")
    assert "stats" not in fresh.obsm
    assert "stats" not in fresh.uns
    assert copied.uns["stats"]["columns"] == list(rbg.tl.PATCH_STATISTICS)
    copied = copied.obsm["stats"]
    np.testing.assert_allclose(copied, adata.obsm["X_patch_statistics"])
    # the synthetic tissue varies: nuclear density differs between spots
    assert _column(copied, "nuclear_fraction").std() > 0.01


def test_model_backbone_features_carry_the_spot_statistics(slide, tmp_path):
    adata = slide.copy()
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    model = rbg.RankByGene(
        adata, image_encoder="resnet18", input_size=32, n_latent=8, patch_statistics=True
    )
    assert model.module.n_features == 512 + N_STATISTICS
    features = model.get_image_representation(kind="backbone", progress=False)
    expected = rbg.tl.patch_statistics(
        adata, library_key="library_id", patch_size=32, patch_scale=model.patch_scale, copy=True
    ).obsm["X_patch_statistics"]
    np.testing.assert_allclose(features[:, -N_STATISTICS:], expected, atol=2e-3)
    model.save(tmp_path / "model")
    loaded = rbg.RankByGene.load(tmp_path / "model", adata=adata)
    assert loaded.module.n_features == 512 + N_STATISTICS
    np.testing.assert_allclose(
        loaded.get_image_representation(kind="backbone", progress=False), features, atol=1e-5
    )


def test_statistics_need_images_not_precomputed_features(slide):
    adata = slide.copy()
    adata.obsm["X_features"] = np.zeros((adata.n_obs, 4), dtype=np.float32)
    rbg.RankByGene.setup_anndata(
        adata, layer="counts", library_key="library_id", features_key="X_features"
    )
    with pytest.raises(ValueError, match="features_key='X_features'"):
        rbg.RankByGene(adata, patch_statistics=True)


# ------------------------------------- missing pixels: the same message in tl and in training
def _with_nan_under_first_spot(slide):
    """The slide with its image as floats and 4 x 4 NaN pixels under its first spot."""
    adata = slide.copy()
    (entry,) = adata.uns["spatial"].values()
    key = max(entry["images"], key=lambda k: entry["scalefactors"][f"tissue_{k}_scalef"])
    scale = entry["scalefactors"][f"tissue_{key}_scalef"]
    image = entry["images"][key].astype(np.float32) / 255.0
    x, y = (adata.obsm["spatial"][0] * scale).astype(int)
    image[y - 2 : y + 2, x - 2 : x + 2] = np.nan
    entry["images"][key] = image
    return adata


NAN_MESSAGE = (
    r"1 spots whose patch holds NaN or infinite pixels \('slide_0': 1 of 30; such pixels per "
    r"image: 'slide_0': 16\)"
)


def test_nan_pixels_warn_or_raise_in_tl(slide):
    adata = _with_nan_under_first_spot(slide)
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        rbg.tl.patch_statistics(adata, out_of_bounds="raise")
    assert "X_patch_statistics" not in adata.obsm
    with pytest.warns(UserWarning, match=NAN_MESSAGE + ": their missing pixels are white"):
        rbg.tl.patch_statistics(adata)
    assert np.isfinite(adata.obsm["X_patch_statistics"]).all()


def test_nan_pixels_warn_or_raise_in_training(slide):
    adata = _with_nan_under_first_spot(slide)
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    model = rbg.RankByGene(
        adata, image_encoder="resnet18", input_size=32, n_latent=8, patch_statistics=True
    )
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        model.train(max_epochs=1, out_of_bounds="raise", enable_progress_bar=False)
    assert not model.is_trained_
    with pytest.warns(UserWarning, match=NAN_MESSAGE + ": their missing pixels are white"):
        model.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    assert model.is_trained_


def test_spots_outside_the_image_are_counted_by_tl(slide):
    adata = slide.copy()
    adata.obsm["spatial"] = adata.obsm["spatial"].copy()
    adata.obsm["spatial"][0] = [-500.0, 40.0]  # entirely outside
    message = r"1 spots whose patch extends beyond the image \('slide_0': 1 of 30\), 1 of them en"
    with pytest.warns(UserWarning, match=message):
        rbg.tl.patch_statistics(adata)
    with pytest.raises(ValueError, match=message):
        rbg.tl.patch_statistics(adata, out_of_bounds="raise")


def test_one_out_of_bounds_default_across_the_package():
    import inspect

    from rankbygene.data import PatchExtractor

    takers = (
        PatchExtractor,
        PatchExtractor.from_settings,
        rbg.tl.patch_statistics,
        rbg.RankByGene.train,
        rbg.RankByGene.get_image_representation,
    )
    defaults = {
        taker.__qualname__: inspect.signature(taker).parameters["out_of_bounds"].default
        for taker in takers
    }
    assert set(defaults.values()) == {"pad"}, defaults
