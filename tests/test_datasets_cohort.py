"""Synthetic cohort: pyramidal TIFF slides whose label and survival follow their composition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import rankbygene as rbg
from rankbygene.io import open_image, write_pyramidal_tiff


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    return rbg.datasets.synthetic_cohort(folder, n_slides=8, n_spots=20, seed=0), folder


def test_cohort_table_and_files(cohort):
    table, folder = cohort
    assert table.index.name == "slide_id"
    assert list(table.columns) == [
        "path",
        "label",
        "time",
        "event",
        "tumor_fraction",
        "mpp",
        "width",
        "height",
    ]
    assert len(table) == 8
    assert table["label"].sum() == 4  # above / below the cohort's median
    high = table.loc[table["label"] == 1, "tumor_fraction"]
    low = table.loc[table["label"] == 0, "tumor_fraction"]
    assert high.min() > low.max()
    assert set(table["event"]) <= {0, 1}
    assert (table["time"] > 0).all()
    saved = pd.read_csv(folder / "cohort.csv", index_col="slide_id")
    pd.testing.assert_frame_equal(saved, table, check_dtype=False)
    assert sorted(p.name for p in folder.glob("*.tif")) == [f"slide_{i:03d}.tif" for i in range(8)]
    assert not list(folder.glob(".*"))  # no temporary file left


def test_slides_are_pyramids_with_mpp(cohort):
    table, _ = cohort
    reader = open_image(table["path"].iloc[0])
    assert reader.mpp == pytest.approx(1.0)
    assert reader.shape == (table["height"].iloc[0], table["width"].iloc[0])
    assert len(reader.level_downsamples) >= 2
    assert reader.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
    tiles = rbg.pp.tile_slide(table["path"].iloc[0], tile_size_um=64)
    assert tiles.n_obs > 20


def test_cohort_is_deterministic_and_survival_follows_the_fraction(tmp_path):
    first = rbg.datasets.synthetic_cohort(tmp_path / "a", n_slides=4, n_spots=10, seed=5)
    second = rbg.datasets.synthetic_cohort(tmp_path / "b", n_slides=4, n_spots=10, seed=5)
    columns = ["label", "time", "event", "tumor_fraction"]
    pd.testing.assert_frame_equal(first[columns], second[columns])
    a = open_image(first["path"].iloc[0]).read_region(0, 0, 200, 200)
    b = open_image(second["path"].iloc[0]).read_region(0, 0, 200, 200)
    np.testing.assert_array_equal(a, b)


def test_stain_variation_changes_colours_not_layout(tmp_path):
    plain = rbg.datasets.synthetic_cohort(tmp_path / "a", n_slides=4, n_spots=10, seed=1)
    stained = rbg.datasets.synthetic_cohort(
        tmp_path / "b", n_slides=4, n_spots=10, seed=1, stain_variation=0.2
    )
    pd.testing.assert_series_equal(plain["tumor_fraction"], stained["tumor_fraction"])
    a = open_image(plain["path"].iloc[0]).read_region(0, 0, 400, 400).astype(float)
    b = open_image(stained["path"].iloc[0]).read_region(0, 0, 400, 400).astype(float)
    assert np.abs(a - b).mean() > 2.0
    assert np.corrcoef(a[..., 1].ravel(), b[..., 1].ravel())[0, 1] > 0.8


def test_write_pyramidal_tiff_levels(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (1100, 900, 3), dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "x.tif", image, mpp=0.25, min_side=300)
    reader = open_image(path)
    assert reader.mpp == pytest.approx(0.25)
    assert len(reader.level_downsamples) == 3
    np.testing.assert_array_equal(reader.read_region(100, 50, 64, 32), image[50:82, 100:164])
    with pytest.raises(ValueError, match="uint8"):
        write_pyramidal_tiff(tmp_path / "y.tif", image.astype(np.float32))


def test_cohort_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="region must be one of"):
        rbg.datasets.synthetic_cohort(tmp_path, n_slides=4, region="necrosis", n_regions=4)
    with pytest.raises(ValueError, match="n_slides"):
        rbg.datasets.synthetic_cohort(tmp_path, n_slides=2)
    with pytest.raises(ValueError, match="censoring"):
        rbg.datasets.synthetic_cohort(tmp_path, n_slides=4, censoring=1.0)
