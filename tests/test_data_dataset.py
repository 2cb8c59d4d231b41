from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from anndata import AnnData
from scipy import sparse
from torch.utils.data import DataLoader

from rankbygene.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchExtractor,
    SpotPatchDataset,
    eval_transform,
    strong_transform,
    weak_transform,
)

COORDS = np.array([[10.0, 10.0], [40.0, 30.0], [70.0, 50.0], [25.0, 45.0], [55.0, 12.0]])
N_LIBRARIES = 2
N_OBS = len(COORDS) * N_LIBRARIES


@pytest.fixture
def adata(tmp_path) -> AnnData:
    """Two libraries: one TIFF on disk, one in-memory hires image."""
    images = [
        np.random.default_rng(k).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
        for k in range(N_LIBRARIES)
    ]
    tifffile.imwrite(tmp_path / "lib0.tif", images[0])
    scalefactors = {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 16.0}
    adata = AnnData(
        np.zeros((N_OBS, 3), dtype=np.float32),
        obs=pd.DataFrame(
            {"library_id": np.repeat(["lib0", "lib1"], len(COORDS))},
            index=[f"s{i}" for i in range(N_OBS)],
        ),
        obsm={"spatial": np.concatenate([COORDS] * N_LIBRARIES)},
    )
    adata.uns["spatial"] = {
        "lib0": {
            "images": {},
            "scalefactors": dict(scalefactors),
            "metadata": {"source_image_path": str(tmp_path / "lib0.tif")},
        },
        "lib1": {"images": {"hires": images[1]}, "scalefactors": dict(scalefactors)},
    }
    return adata


@pytest.fixture
def patches(adata) -> PatchExtractor:
    return PatchExtractor(adata, library_key="library_id", patch_size=16)


def expression_matrix() -> np.ndarray:
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.7, size=(N_OBS, 7)).astype(np.float32)
    dense[:, 3] = 0
    return dense


def collect(loader: DataLoader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def test_items(patches):
    dense = expression_matrix()
    dataset = SpotPatchDataset(patches, expression=dense, extra={"size": np.arange(N_OBS) * 2.0})
    assert len(dataset) == N_OBS
    item = dataset[3]
    assert set(item) == {"image", "expression", "index", "size"}
    assert item["image"].dtype == torch.float32
    assert item["image"].shape == (3, 16, 16)
    assert item["expression"].dtype == torch.float32
    np.testing.assert_array_equal(item["expression"].numpy(), dense[3])
    assert item["index"].dtype == torch.int64
    assert int(item["index"]) == 3
    assert float(item["size"]) == 6.0
    expected = eval_transform()(patches[3])
    torch.testing.assert_close(item["image"], expected)


def test_workers_match_single_process(patches):
    dataset = SpotPatchDataset(patches, expression=expression_matrix(), transform=eval_transform())
    single = collect(DataLoader(dataset, batch_size=4, num_workers=0))
    multi = collect(DataLoader(dataset, batch_size=4, num_workers=2))
    assert single["image"].shape == (N_OBS, 3, 16, 16)
    for key in single:
        torch.testing.assert_close(single[key], multi[key], rtol=0, atol=0)
    np.testing.assert_array_equal(single["index"].numpy(), np.arange(N_OBS))


@pytest.mark.slow
def test_spawned_workers(patches):
    dataset = SpotPatchDataset(patches, transform=eval_transform())
    single = collect(DataLoader(dataset, batch_size=5, num_workers=0))
    spawned = collect(
        DataLoader(dataset, batch_size=5, num_workers=2, multiprocessing_context="spawn")
    )
    torch.testing.assert_close(single["image"], spawned["image"], rtol=0, atol=0)


def test_sparse_expression_matches_dense(patches):
    dense = expression_matrix()
    from_dense = SpotPatchDataset(patches, expression=dense)
    for matrix in (sparse.csr_matrix(dense), sparse.csc_matrix(dense), sparse.csr_array(dense)):
        from_sparse = SpotPatchDataset(patches, expression=matrix)
        for i in range(N_OBS):
            torch.testing.assert_close(
                from_sparse[i]["expression"], from_dense[i]["expression"], rtol=0, atol=0
            )


def test_two_views(patches):
    torch.manual_seed(0)
    dataset = SpotPatchDataset(patches, n_views=2)
    differ = 0
    for i in range(N_OBS):
        item = dataset[i]
        strong, weak = item["image"], item["image_weak"]
        assert strong.shape == weak.shape == (3, 16, 16)
        differ += not torch.equal(strong, weak)
        # the weak view only flips/rotates: it is one of the 8 symmetries of the plain patch
        plain = eval_transform()(patches[i])
        symmetries = [torch.rot90(p, k, (1, 2)) for p in (plain, plain.flip(2)) for k in range(4)]
        assert any(torch.equal(weak, s) for s in symmetries)
        assert torch.equal(weak.flatten().sort().values, plain.flatten().sort().values)
    assert differ == N_OBS


def test_strong_view_changes_colours():
    torch.manual_seed(0)
    patch = np.random.default_rng(5).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    plain = eval_transform()(patch).flatten().sort().values
    strong = strong_transform()
    changed = sum(
        not torch.allclose(strong(patch).flatten().sort().values, plain) for _ in range(20)
    )
    assert changed >= 10  # jitter (p=0.8) or grayscale (p=0.2) alter pixel values


def test_transform_parameters():
    patch = np.full((4, 4, 3), 51, dtype=np.uint8)
    x = eval_transform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(patch)
    torch.testing.assert_close(x, torch.full((3, 4, 4), 0.2))
    y = eval_transform()(patch)
    for c in range(3):
        torch.testing.assert_close(
            y[c], torch.full((4, 4), (0.2 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
        )
    weak = weak_transform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(patch)
    torch.testing.assert_close(weak, torch.full((3, 4, 4), -0.6))
    with pytest.raises(ValueError, match="3 values"):
        eval_transform(mean=(0.5,))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) patch"):
        eval_transform()(np.zeros((4, 4), dtype=np.uint8))


def test_indices(patches):
    dataset = SpotPatchDataset(patches, indices=[7, 2])
    assert len(dataset) == 2
    assert int(dataset[0]["index"]) == 7
    mask = np.zeros(N_OBS, dtype=bool)
    mask[[1, 8]] = True
    np.testing.assert_array_equal(SpotPatchDataset(patches, indices=mask).indices, [1, 8])
    with pytest.raises(IndexError, match="indices must lie"):
        SpotPatchDataset(patches, indices=[N_OBS])


def test_indices_must_be_kept_spots(adata):
    adata.obsm["spatial"][0] = [1.0, 1.0]  # patch leaves the image
    patches = PatchExtractor(adata, library_key="library_id", patch_size=16, out_of_bounds="drop")
    dataset = SpotPatchDataset(patches)
    assert len(dataset) == N_OBS - 1
    assert int(dataset[0]["index"]) == 1
    with pytest.raises(ValueError, match="dropped"):
        SpotPatchDataset(patches, indices=[0, 1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"expression": np.zeros((3, 2))}, "3 rows"),
        ({"extra": {"image": np.zeros(N_OBS)}}, "reserved"),
        ({"extra": {"w": np.zeros(3)}}, "one entry per spot"),
        ({"n_views": 3}, "n_views"),
        ({"n_views": 2, "transform": [eval_transform()]}, "one per view"),
    ],
)
def test_bad_arguments(patches, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpotPatchDataset(patches, **kwargs)
