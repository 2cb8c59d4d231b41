"""Views made per batch on the training device: the same augmentations as the per-patch ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankbygene.data import DeviceAugmentation, eval_transform, random_dihedral
from rankbygene.model._data import SpotDataModule


def _patches(n: int = 8, size: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def _unnormalise(images: torch.Tensor, augmentation: DeviceAugmentation) -> torch.Tensor:
    mean = torch.tensor(augmentation.mean).view(1, 3, 1, 1)
    return images * torch.tensor(augmentation.std).view(1, 3, 1, 1) + mean


def test_dihedral_draws_each_symmetry_per_image_and_keeps_the_pixels():
    torch.manual_seed(0)
    square = torch.arange(16.0).view(1, 1, 4, 4).expand(4000, 1, 4, 4)
    moved = random_dihedral(square)
    symmetries = {tuple(image.flatten().tolist()) for image in moved}
    assert len(symmetries) == 8  # all of the square's symmetries, and nothing else
    counts = torch.unique(moved.reshape(4000, -1), dim=0, return_counts=True)[1]
    assert counts.min() > 400  # about 500 each: uniform, drawn per image
    with pytest.raises(ValueError, match="shape"):
        random_dihedral(torch.zeros(2, 3, 4, 5))


def test_weak_view_moves_pixels_and_strong_view_changes_colours():
    torch.manual_seed(1)
    patches = _patches()
    augmentation = DeviceAugmentation()
    strong, weak = augmentation(patches)
    assert strong.dtype == weak.dtype == torch.float32
    assert strong.shape == weak.shape == patches.shape
    original = patches.float() / 255
    for i in range(len(patches)):  # the teacher's view: the same pixel values, moved
        np.testing.assert_allclose(
            _unnormalise(weak, augmentation)[i].flatten().sort().values,
            original[i].flatten().sort().values,
            atol=1e-5,
        )
    # the student's view: colours changed for most patches (jitter p=0.8, grayscale p=0.2)
    changed = [
        not torch.allclose(
            _unnormalise(strong, augmentation)[i].flatten().sort().values,
            original[i].flatten().sort().values,
            atol=1e-3,
        )
        for i in range(len(patches))
    ]
    assert sum(changed) >= 4
    assert _unnormalise(strong, augmentation).min() >= -1e-5


def test_each_patch_gets_its_own_colour_draw():
    torch.manual_seed(2)
    augmentation = DeviceAugmentation(p_grayscale=0.0, p_jitter=1.0)
    same = _patches(1).expand(6, 3, 12, 12).contiguous()
    strong, _ = augmentation(same)
    means = _unnormalise(strong, augmentation).mean(dim=(1, 2, 3))
    assert len(torch.unique(means.round(decimals=4))) == 6


def test_plain_view_equals_the_per_patch_normalisation():
    patches = _patches(3)
    augmentation = DeviceAugmentation(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    expected = torch.stack(
        [
            eval_transform((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))(p.permute(1, 2, 0).numpy())
            for p in patches
        ]
    )
    torch.testing.assert_close(augmentation.plain(patches), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        augmentation.plain(patches.float())


def test_data_module_augments_batches_after_their_transfer():
    module = SpotDataModule(n_obs=8, expression=np.zeros((8, 5)), batch_size=2)
    module.device_augmentation = DeviceAugmentation()
    batch = {"image": _patches(2), "expression": torch.zeros(2, 5)}
    views = module.on_after_batch_transfer(batch, 0)  # no trainer: training views
    assert views["image"].dtype == views["image_weak"].dtype == torch.float32
    assert views["expression"] is batch["expression"]
