"""read_st (legacy ST, on the real HER2+ sections and on small files) and read_hest (HEST-1k)."""

from __future__ import annotations

import gzip
import json
import logging
import warnings
import zlib
from pathlib import Path

import anndata
import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import HER2ST, requires_her2st
from PIL import Image
from scipy import sparse
from scipy.spatial import cKDTree

from rankbygene._layout import image_sources, spot_libraries, validate_layout
from rankbygene.io import TiffImage, open_image, read_hest, read_st

matplotlib.use("Agg")

# the HEST fixture has a duplicated gene on purpose; anndata warns when it reads it
pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")

# --- the real HER2+ sections -----------------------------------------------------------------

needs_her2st = requires_her2st
# spots under tissue with counts, as the data's README says
SECTIONS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184}
IMAGES = {
    "B4": "ST-imgs/B/B4/BT10737_D2_HE.jpg",
    "C2": "ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    "C3": "ST-imgs/C/C3/5714_HE_BT_D1.jpg",
    "C4": "ST-imgs/C/C4/5714_HE_BT_D2.jpg",
}


def _passes_layout_checks(adata: anndata.AnnData, caplog: pytest.LogCaptureFixture) -> None:
    """setup_anndata's layout checks (units, a decoded patch) find nothing to say."""
    libraries = spot_libraries(adata)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rankbygene"):
        validate_layout(adata, image_sources(adata, libraries), libraries)
    assert not caplog.records


def _files(section: str) -> tuple[Path, Path, Path]:
    return (
        HER2ST / "ST-cnts" / f"{section}.tsv.gz",
        HER2ST / "ST-spotfiles" / f"{section}_selection.tsv",
        HER2ST / IMAGES[section],
    )


@pytest.fixture(scope="module")
def c2() -> anndata.AnnData:
    return read_st(*_files("C2"))


@pytest.fixture(scope="module")
def c2_decoded() -> np.ndarray:
    """The C2 image decoded whole by PIL, independently of the package's readers."""
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(_files("C2")[2]) as im:
        return np.asarray(im.convert("RGB"))


@needs_her2st
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_real_sections_spots_and_genes(section: str, caplog: pytest.LogCaptureFixture) -> None:
    counts_path, spots_path, image_path = _files(section)
    adata = read_st(counts_path, spots_path, image_path)
    table = pd.read_csv(counts_path, sep="\t", index_col=0)
    spot_file = pd.read_csv(spots_path, sep="\t")
    assert adata.n_obs == SECTIONS[section] == len(table)
    assert adata.n_vars == table.shape[1]
    assert list(adata.var_names) == list(table.columns)  # genes as given, already unique here
    assert list(adata.obs_names) == list(table.index)
    # counts: float32 CSR in X and the same in layers["counts"]
    assert sparse.issparse(adata.X)
    assert adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), table.to_numpy(dtype=np.float32))
    assert (adata.layers["counts"] != adata.X).nnz == 0
    # coordinates and array positions come from the spot file
    spot_file.index = [f"{x}x{y}" for x, y in zip(spot_file.x, spot_file.y, strict=True)]
    joined = spot_file.loc[adata.obs_names]
    np.testing.assert_allclose(adata.obsm["spatial"], joined[["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_array_equal(adata.obs["array_col"], joined["x"])
    np.testing.assert_array_equal(adata.obs["array_row"], joined["y"])
    assert (adata.obs["in_tissue"] == 1).all()
    assert adata.obs["library_id"].dtype == "category"
    assert list(adata.obs["library_id"].cat.categories) == [section]
    _passes_layout_checks(adata, caplog)
    # layout
    entry = adata.uns["spatial"][section]
    assert entry["metadata"]["source_image_path"] == str(image_path.resolve())
    scalefactors = entry["scalefactors"]
    height, width = open_image(image_path).shape
    hires, lowres = entry["images"]["hires"], entry["images"]["lowres"]
    assert hires.dtype == np.uint8
    assert max(hires.shape[:2]) == 2000
    assert max(lowres.shape[:2]) == 600
    assert hires.shape[1] == round(width * scalefactors["tissue_hires_scalef"])
    assert lowres.shape[0] == round(height * scalefactors["tissue_lowres_scalef"])
    # spot diameter: half the median nearest-neighbour distance, ~128-145 px on these images
    distances, _ = cKDTree(adata.obsm["spatial"]).query(adata.obsm["spatial"], k=2)
    diameter = scalefactors["spot_diameter_fullres"]
    assert diameter == pytest.approx(np.median(distances[:, 1]) / 2)
    assert 120 < diameter < 150
    # spots sit on tissue: the thumbnail is darker under the spots than on average
    xy = np.round(adata.obsm["spatial"] * scalefactors["tissue_hires_scalef"]).astype(int)
    under_spots = hires[xy[:, 1], xy[:, 0]].astype(float).mean()
    assert under_spots < hires.astype(float).mean() - 10


@needs_her2st
@pytest.mark.slow
def test_real_patch_equals_image_pixels(c2: anndata.AnnData, c2_decoded: np.ndarray) -> None:
    reader = open_image(c2.uns["spatial"]["C2"]["metadata"]["source_image_path"])
    assert reader.shape == c2_decoded.shape[:2]
    radius = int(c2.uns["spatial"]["C2"]["scalefactors"]["spot_diameter_fullres"] // 2)
    for spot in ("10x21", c2.obs_names[len(c2.obs_names) // 2], c2.obs_names[-1]):
        x, y = np.floor(c2[spot].obsm["spatial"][0]).astype(int)
        patch = reader.read_region(x - radius, y - radius, 2 * radius, 2 * radius)
        truth = c2_decoded[y - radius : y + radius, x - radius : x + radius]
        np.testing.assert_array_equal(patch, truth)


@needs_her2st
@pytest.mark.slow
def test_real_hires_matches_downscale(c2: anndata.AnnData, c2_decoded: np.ndarray) -> None:
    entry = c2.uns["spatial"]["C2"]
    hires = entry["images"]["hires"]
    truth = np.asarray(
        Image.fromarray(c2_decoded).resize(hires.shape[1::-1], Image.Resampling.BOX)
    ).astype(float)
    assert np.abs(hires.astype(float) - truth).mean() < 6
    lowres = entry["images"]["lowres"]
    truth_low = np.asarray(
        Image.fromarray(c2_decoded).resize(lowres.shape[1::-1], Image.Resampling.BOX)
    ).astype(float)
    assert np.abs(lowres.astype(float) - truth_low).mean() < 6


@needs_her2st
def test_real_squidpy_spatial_scatter(c2: anndata.AnnData) -> None:
    import matplotlib.pyplot as plt
    import squidpy as sq

    ax = sq.pl.spatial_scatter(c2, color="ERBB2", return_ax=True)
    ax = ax[0] if isinstance(ax, list | np.ndarray) else ax
    images = ax.get_images()
    assert len(images) == 1
    shown = np.asarray(images[0].get_array())
    assert shown.shape[:2] == c2.uns["spatial"]["C2"]["images"]["hires"].shape[:2]
    plt.close("all")


@needs_her2st
def test_real_roundtrip_h5ad(c2: anndata.AnnData, tmp_path: Path) -> None:
    c2.write_h5ad(tmp_path / "c2.h5ad")
    back = anndata.read_h5ad(tmp_path / "c2.h5ad")
    np.testing.assert_array_equal(
        back.uns["spatial"]["C2"]["images"]["hires"], c2.uns["spatial"]["C2"]["images"]["hires"]
    )
    assert back.uns["spatial"]["C2"]["scalefactors"] == c2.uns["spatial"]["C2"]["scalefactors"]


# --- small ST files for the error paths -------------------------------------------------------

PITCH = 60.0


def _write_st(
    root: Path,
    n_x: int = 4,
    n_y: int = 3,
    genes: tuple[str, ...] = ("G1", "G2", "G3"),
    selected: list[int] | None = None,
    image_size: tuple[int, int] = (300, 400),
) -> tuple[Path, Path, Path]:
    """A tiny ST section: an n_x x n_y grid, counts, spot file and a PNG image."""
    rng = np.random.default_rng(0)
    positions = [(x, y) for y in range(1, n_y + 1) for x in range(1, n_x + 1)]
    names = [f"{x}x{y}" for x, y in positions]
    counts = pd.DataFrame(
        rng.poisson(3, size=(len(names), len(genes))), index=names, columns=list(genes)
    )
    counts_path = root / "S1.tsv.gz"
    with gzip.open(counts_path, "wt") as handle:
        counts.to_csv(handle, sep="\t")
    spots = pd.DataFrame(
        {
            "x": [p[0] for p in positions],
            "y": [p[1] for p in positions],
            "new_x": [p[0] + 0.01 for p in positions],
            "new_y": [p[1] - 0.01 for p in positions],
            "pixel_x": [20 + PITCH * p[0] for p in positions],
            "pixel_y": [20 + PITCH * p[1] for p in positions],
            "selected": selected if selected is not None else [1] * len(positions),
        }
    )
    spots_path = root / "S1_selection.tsv"
    spots.to_csv(spots_path, sep="\t", index=False)
    image = np.full((*image_size, 3), 240, dtype=np.uint8)
    for x, y in zip(spots.pixel_x, spots.pixel_y, strict=True):
        image[int(y) - 10 : int(y) + 10, int(x) - 10 : int(x) + 10] = (150, 60, 160)
    image_path = root / "S1.png"
    Image.fromarray(image).save(image_path)
    return counts_path, spots_path, image_path


def _rewrite_counts(path: Path, edit) -> None:
    table = pd.read_csv(path, sep="\t", index_col=0)
    table = edit(table)
    with gzip.open(path, "wt") as handle:
        table.to_csv(handle, sep="\t")


def test_small_st_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    counts, spots, image = _write_st(tmp_path)
    adata = read_st(counts, spots, image, hires_max_side=200, lowres_max_side=50)
    _passes_layout_checks(adata, caplog)
    assert adata.shape == (12, 3)
    assert list(adata.uns["spatial"]) == ["S1"]  # library_id from the file name
    entry = adata.uns["spatial"]["S1"]
    assert entry["images"]["hires"].shape == (150, 200, 3)
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.5)
    assert entry["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.125)
    assert entry["images"]["lowres"].shape == (38, 50, 3)
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(PITCH / 2)
    assert entry["metadata"]["mpp"] == pytest.approx(100 / (PITCH / 2))
    assert adata.obs.loc["3x2", "array_col"] == 3
    assert adata.obs.loc["3x2", "array_row"] == 2
    np.testing.assert_allclose(adata.obsm["spatial"][adata.obs_names.get_loc("3x2")], [200, 140])
    adata2 = read_st(counts, spots, image, library_id="mine", spot_diameter=25.0)
    assert list(adata2.uns["spatial"]) == ["mine"]
    assert adata2.uns["spatial"]["mine"]["scalefactors"]["spot_diameter_fullres"] == 25.0
    assert (adata2.obs["library_id"] == "mine").all()


def test_small_st_squidpy_renders(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    import squidpy as sq

    adata = read_st(*_write_st(tmp_path), hires_max_side=200)
    ax = sq.pl.spatial_scatter(adata, color="G1", return_ax=True)
    ax = ax[0] if isinstance(ax, list | np.ndarray) else ax
    assert len(ax.get_images()) == 1
    # the spots are drawn as circles at the hires-scaled centres, one spot diameter across
    paths = [path for c in ax.collections for path in c.get_paths()]
    assert len(paths) == adata.n_obs
    low = np.array([p.vertices.min(axis=0) for p in paths])
    high = np.array([p.vertices.max(axis=0) for p in paths])
    np.testing.assert_allclose((low + high) / 2, adata.obsm["spatial"] * 0.5, atol=0.5)
    np.testing.assert_allclose(high - low, PITCH / 2 * 0.5, atol=0.5)
    plt.close("all")


def test_unselected_spots_are_dropped(tmp_path: Path) -> None:
    selected = [1] * 12
    selected[0] = selected[5] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the counts of spots off the tissue are dropped quietly
        adata = read_st(*_write_st(tmp_path, selected=selected))
    assert adata.n_obs == 10
    assert "1x1" not in adata.obs_names
    assert "2x2" not in adata.obs_names


def test_duplicate_genes_made_unique(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path)
    _rewrite_counts(counts, lambda t: t.set_axis(["G1", "G1", "G2"], axis=1))
    adata = read_st(counts, spots, image)
    assert adata.var_names.is_unique
    assert list(adata.var_names) == ["G1", "G1-1", "G2"]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_missing_file_is_named(tmp_path: Path, which: int) -> None:
    files = list(_write_st(tmp_path))
    files[which] = tmp_path / "nowhere" / "gone.file"
    with pytest.raises(FileNotFoundError, match=r"gone\.file"):
        read_st(*files)


def test_undecodable_image(tmp_path: Path) -> None:
    counts, spots, _ = _write_st(tmp_path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        read_st(counts, spots, bad)


def test_spot_file_missing_columns(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path)
    pd.read_csv(spots, sep="\t").drop(columns=["pixel_y"]).to_csv(spots, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['pixel_y'\]"):
        read_st(counts, spots, image)


def test_spot_file_non_numeric_positions(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path)
    table = pd.read_csv(spots, sep="\t")
    table["pixel_x"] = table["pixel_x"].astype(object)
    table.loc[0, "pixel_x"] = "n/a"
    table.to_csv(spots, sep="\t", index=False)
    with pytest.raises(ValueError, match="'pixel_x' has 1 non-numeric"):
        read_st(counts, spots, image)


def test_spot_file_duplicate_positions(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path)
    table = pd.read_csv(spots, sep="\t")
    pd.concat([table, table.iloc[[0]]]).to_csv(spots, sep="\t", index=False)
    with pytest.raises(ValueError, match="twice"):
        read_st(counts, spots, image)


def test_no_matching_spots(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path)
    _rewrite_counts(counts, lambda t: t.set_axis([f"s{i}" for i in range(len(t))], axis=0))
    with pytest.raises(ValueError, match="None of the 12 spots of count table"):
        read_st(counts, spots, image)


def test_no_selected_spots_match(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path, selected=[0] * 12)
    with pytest.raises(ValueError, match="12 of them are in the spot file but none is selected"):
        read_st(counts, spots, image)


def test_transposed_counts_hint(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path)
    _rewrite_counts(counts, lambda t: t.T)
    with pytest.raises(ValueError, match="transposed"):
        read_st(counts, spots, image)


def test_partial_match_warns_and_keeps_intersection(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path)
    names = [f"{x}x{y}" for y in range(1, 4) for x in range(1, 5)]
    names[0], names[1] = "90x90", "91x91"  # two count rows with no spot
    _rewrite_counts(counts, lambda t: t.set_axis(names, axis=0))
    with pytest.warns(UserWarning, match=r"10 of 12 count-table spots .* 10 of 12 selected"):
        adata = read_st(counts, spots, image)
    assert adata.n_obs == 10
    assert "90x90" not in adata.obs_names
    assert "1x1" not in adata.obs_names


def test_selected_spots_without_counts_are_dropped_quietly(tmp_path: Path) -> None:
    # as in the published tables, where a few selected spots have no counts
    counts, spots, image = _write_st(tmp_path)
    _rewrite_counts(counts, lambda t: t.iloc[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adata = read_st(counts, spots, image)
    assert adata.n_obs == 10


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "1 non-numeric"),
        (-2, "1 negative"),
        (np.nan, r"1 missing \(NaN\)"),
    ],
)
def test_bad_count_values(tmp_path: Path, value: object, message: str) -> None:
    counts, spots, image = _write_st(tmp_path)

    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table = table.astype(object)
        table.iloc[3, 1] = value
        return table

    _rewrite_counts(counts, edit)
    with pytest.raises(ValueError, match=message):
        read_st(counts, spots, image)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header only":
        data = data[:5]
    else:  # one flipped byte in the compressed stream: zlib or gzip's CRC check fails
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "header only", "flipped"])
def test_damaged_count_table_is_named(tmp_path: Path, how: str) -> None:
    genes = tuple(f"G{i}" for i in range(60))
    counts, spots, image = _write_st(tmp_path, n_x=12, n_y=10, genes=genes)
    _damage(counts, how)
    with pytest.raises(
        ValueError, match=r"count table .*S1\.tsv\.gz.*truncated or corrupt"
    ) as info:
        read_st(counts, spots, image)
    # the decoder's own error, chained
    assert isinstance(info.value.__cause__, EOFError | OSError | zlib.error)


def test_damaged_gzipped_spot_file_is_named(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path, n_x=12, n_y=10)
    zipped = tmp_path / "S1_selection.tsv.gz"
    with gzip.open(zipped, "wb") as handle:
        handle.write(spots.read_bytes())
    _damage(zipped, "truncated")
    with pytest.raises(
        ValueError, match=r"spot file .*S1_selection\.tsv\.gz.*truncated or corrupt"
    ):
        read_st(counts, zipped, image)


def test_reading_file_wraps_decoder_errors_only(tmp_path: Path) -> None:
    from rankbygene._image import reading_file

    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(b"spot\tG1\n" * 1000)[:40])
    message = r"table .*cut\.gz: it looks truncated or corrupt"
    with pytest.raises(ValueError, match=message) as info, reading_file(path, "table"):
        gzip.decompress(path.read_bytes())
    assert isinstance(info.value.__cause__, EOFError)
    with pytest.raises(ValueError, match=r"cut\.gz"), reading_file(path):
        zlib.decompress(b"not zlib")
    with pytest.raises(FileNotFoundError), reading_file(path):  # missing files are not corrupt
        (tmp_path / "gone.gz").read_bytes()
    with pytest.raises(KeyError), reading_file(path):  # nor are other errors
        raise KeyError("x")


def test_spots_outside_image(tmp_path: Path) -> None:
    counts, spots, image = _write_st(tmp_path)
    table = pd.read_csv(spots, sep="\t")
    table.loc[0, "pixel_x"] = 5000.0
    table.to_csv(spots, sep="\t", index=False)
    with pytest.warns(UserWarning, match="1 of 12 spot centres lie outside"):
        read_st(counts, spots, image)
    table["pixel_x"] += 10000
    table.to_csv(spots, sep="\t", index=False)
    with pytest.raises(ValueError, match="Wrong image"):
        read_st(counts, spots, image)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hires_max_side": 0}, "hires_max_side"),
        ({"lowres_max_side": 1.5}, "lowres_max_side"),
        ({"spot_diameter": -3.0}, "spot_diameter"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_st(*_write_st(tmp_path), **kwargs)


# --- HEST-1k ----------------------------------------------------------------------------------

HEST_MPP = 0.5
HEST_SPOT_UM = 55.0
HEST_SIZE = (512, 640)  # (height, width) of the synthetic WSI


def _hest_image() -> np.ndarray:
    height, width = HEST_SIZE
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack(
        [
            128 + 100 * np.sin(xx / 40.0),
            128 + 100 * np.cos(yy / 30.0),
            128 + 80 * np.sin((xx + yy) / 50.0),
        ],
        axis=-1,
    )
    return np.clip(image, 0, 255).astype(np.uint8)


def _downscale(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return (
        image[: h * factor, : w * factor]
        .reshape(h, factor, w, factor, 3)
        .mean(axis=(1, 3))
        .round()
        .astype(np.uint8)
    )


@pytest.fixture(scope="module")
def hest_sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small HEST-like sample: st/ h5ad, wsis/ pyramidal TIFF, patches/ h5, metadata/ json."""
    root = tmp_path_factory.mktemp("hest")
    for sub in ("st", "wsis", "patches", "metadata"):
        (root / sub).mkdir()
    rng = np.random.default_rng(1)
    image = _hest_image()
    # spots on a Visium-like grid, 100 um = 200 px apart
    xs, ys = np.meshgrid(np.arange(100, 600, 200.0), np.arange(100, 500, 200.0))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1) + rng.normal(0, 1, (xs.size, 2))
    n_spots = len(coords)
    barcodes = [f"AAAC{i:04d}-1" for i in range(n_spots)]
    counts = sparse.csr_matrix(rng.poisson(2, size=(n_spots, 5)).astype(np.float32))
    obs = pd.DataFrame(
        {
            "in_tissue": 1,
            "array_row": np.repeat(np.arange(ys.shape[0]), xs.shape[1]),
            "array_col": np.tile(np.arange(xs.shape[1]), ys.shape[0]),
            "pxl_col_in_fullres": coords[:, 0],
            "pxl_row_in_fullres": coords[:, 1],
        },
        index=barcodes,
    )
    var = pd.DataFrame(index=["GENE1", "GENE2", "GENE2", "MT-CO1", "ERBB2"])
    downscaled = _downscale(image, 8)
    adata = anndata.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = coords
    adata.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": downscaled},
            "scalefactors": {
                "spot_diameter_fullres": HEST_SPOT_UM / HEST_MPP,
                "tissue_downscaled_fullres_scalef": 1 / 8,
            },
        }
    }
    adata.write_h5ad(root / "st" / "TEST01.h5ad")
    _write_pyramid(
        root / "wsis" / "TEST01.tif", [image, _downscale(image, 2), _downscale(image, 4)]
    )
    with h5py.File(root / "patches" / "TEST01.h5", "w") as handle:
        patches = np.stack(
            [
                np.asarray(Image.fromarray(image).crop((x - 112, y - 112, x + 112, y + 112)))
                for x, y in np.round(coords).astype(int)
            ]
        )
        handle.create_dataset("img", data=patches)
        handle.create_dataset("coords", data=np.round(coords).astype(int) - 112)
        handle.create_dataset("barcode", data=np.array(barcodes, dtype="S")[:, None])
    meta = {
        "id": "TEST01",
        "st_technology": "Visium",
        "pixel_size_um_estimated": HEST_MPP,
        "pixel_size_um_embedded": 0.49,
        "spot_diameter": HEST_SPOT_UM,
        "inter_spot_dist": 100.0,
        "fullres_px_width": HEST_SIZE[1],
        "fullres_px_height": HEST_SIZE[0],
        "magnification": "20x",
        "treatment": None,
    }
    (root / "metadata" / "TEST01.json").write_text(json.dumps(meta))
    return {
        "root": root,
        "h5ad": root / "st" / "TEST01.h5ad",
        "wsi": root / "wsis" / "TEST01.tif",
        "patches": root / "patches" / "TEST01.h5",
        "metadata": root / "metadata" / "TEST01.json",
    }


def _write_pyramid(path: Path, levels: list[np.ndarray]) -> None:
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            levels[0],
            subifds=len(levels) - 1,
            tile=(64, 64),
            photometric="rgb",
            resolution=(1e4 / HEST_MPP, 1e4 / HEST_MPP),
            resolutionunit="CENTIMETER",
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(64, 64), photometric="rgb")


def _hest_files(sample: dict[str, Path], **drop: bool) -> dict[str, Path]:
    return {k: v for k, v in sample.items() if k != "root" and not drop.get(k)}


def test_read_hest_layout(hest_sample: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    levels_read: list[int] = []
    original = TiffImage._read_level

    def spy(self: TiffImage, level: int, *args: int) -> np.ndarray:
        levels_read.append(level)
        return original(self, level, *args)

    monkeypatch.setattr(TiffImage, "_read_level", spy)
    adata = read_hest(**_hest_files(hest_sample), hires_max_side=160, lowres_max_side=80)
    source = anndata.read_h5ad(hest_sample["h5ad"])
    assert adata.shape == source.shape
    assert adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), source.X.toarray())
    assert (adata.layers["counts"] != adata.X).nnz == 0
    assert list(adata.var_names) == ["GENE1", "GENE2", "GENE2-1", "MT-CO1", "ERBB2"]
    np.testing.assert_allclose(adata.obsm["spatial"], source.obsm["spatial"])
    assert list(adata.obs["library_id"].cat.categories) == ["TEST01"]
    assert "pxl_col_in_fullres" in adata.obs
    assert list(adata.uns["spatial"]) == ["TEST01"]  # HEST's "ST" entry is replaced
    entry = adata.uns["spatial"]["TEST01"]
    # the hires thumbnail came from the coarsest pyramid level that is large enough
    assert levels_read
    assert set(levels_read) == {2}
    hires = entry["images"]["hires"]
    assert hires.shape == (128, 160, 3)
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.25)
    assert np.abs(hires.astype(float) - _downscale(_hest_image(), 4)).mean() < 2
    assert entry["images"]["lowres"].shape == (64, 80, 3)
    assert entry["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.125)
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)
    metadata = entry["metadata"]
    assert metadata["source_image_path"] == str(hest_sample["wsi"].resolve())
    assert metadata["patches_path"] == str(hest_sample["patches"].resolve())
    assert metadata["mpp"] == pytest.approx(HEST_MPP)  # estimated pixel size wins over embedded
    assert metadata["technology"] == "Visium"
    assert metadata["hest"]["inter_spot_dist"] == 100.0
    assert "treatment" not in metadata["hest"]  # None does not go into an h5ad


def test_read_hest_roundtrips_and_plots(hest_sample: dict[str, Path], tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    import squidpy as sq

    adata = read_hest(**_hest_files(hest_sample))
    adata.write_h5ad(tmp_path / "back.h5ad")
    back = anndata.read_h5ad(tmp_path / "back.h5ad")
    assert back.uns["spatial"]["TEST01"]["metadata"]["patches_path"].endswith("TEST01.h5")
    ax = sq.pl.spatial_scatter(adata, color="ERBB2", return_ax=True)
    ax = ax[0] if isinstance(ax, list | np.ndarray) else ax
    assert len(ax.get_images()) == 1
    plt.close("all")


def test_read_hest_patch_pixels_match_wsi(hest_sample: dict[str, Path]) -> None:
    adata = read_hest(**_hest_files(hest_sample))
    reader = open_image(adata.uns["spatial"]["TEST01"]["metadata"]["source_image_path"])
    with h5py.File(adata.uns["spatial"]["TEST01"]["metadata"]["patches_path"]) as handle:
        x, y = handle["coords"][4]
        np.testing.assert_array_equal(handle["img"][4], reader.read_region(x, y, 224, 224))


def test_read_hest_passes_the_layout_checks(
    hest_sample: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _passes_layout_checks(read_hest(**_hest_files(hest_sample)), caplog)  # the WSI
    _passes_layout_checks(read_hest(**_hest_files(hest_sample, wsi=True)), caplog)  # patches


def test_read_hest_without_wsi(hest_sample: dict[str, Path]) -> None:
    adata = read_hest(hest_sample["h5ad"], patches=hest_sample["patches"], library_id="lib")
    entry = adata.uns["spatial"]["lib"]
    assert "source_image_path" not in entry["metadata"]
    assert entry["metadata"]["patches_path"] == str(hest_sample["patches"].resolve())
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(1 / 8)
    assert entry["images"]["hires"].shape == (64, 80, 3)
    assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)
    assert "mpp" not in entry["metadata"]
    assert list(adata.uns["spatial"]) == ["lib"]


def test_read_hest_coordinates_from_obs(hest_sample: dict[str, Path], tmp_path: Path) -> None:
    source = anndata.read_h5ad(hest_sample["h5ad"])
    del source.obsm["spatial"]
    source.write_h5ad(tmp_path / "noobsm.h5ad")
    adata = read_hest(tmp_path / "noobsm.h5ad", metadata=hest_sample["metadata"])
    np.testing.assert_allclose(
        adata.obsm["spatial"], source.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]]
    )
    source.obs = source.obs.drop(columns=["pxl_col_in_fullres"])
    source.write_h5ad(tmp_path / "nocoords.h5ad")
    with pytest.raises(KeyError, match="no spot centres"):
        read_hest(tmp_path / "nocoords.h5ad")


def test_read_hest_spot_diameter_from_metadata(
    hest_sample: dict[str, Path], tmp_path: Path
) -> None:
    source = anndata.read_h5ad(hest_sample["h5ad"])
    del source.uns["spatial"]["ST"]["scalefactors"]["spot_diameter_fullres"]
    source.write_h5ad(tmp_path / "nodiameter.h5ad")
    adata = read_hest(tmp_path / "nodiameter.h5ad", metadata=hest_sample["metadata"])
    assert adata.uns["spatial"]["TEST01"]["scalefactors"]["spot_diameter_fullres"] == 110.0
    with pytest.raises(KeyError, match="No spot diameter"):
        read_hest(tmp_path / "nodiameter.h5ad")


def test_read_hest_missing_files(hest_sample: dict[str, Path], tmp_path: Path) -> None:
    for key in ("wsi", "patches", "metadata"):
        files = _hest_files(hest_sample)
        files[key] = tmp_path / f"missing_{key}.x"
        with pytest.raises(FileNotFoundError, match=f"missing_{key}"):
            read_hest(**files)
    with pytest.raises(FileNotFoundError, match=r"nope\.h5ad"):
        read_hest(tmp_path / "nope.h5ad")


def test_read_hest_corrupt_files(hest_sample: dict[str, Path], tmp_path: Path) -> None:
    garbage = b"not what it claims to be" * 20
    for key, name in (
        ("h5ad", "bad.h5ad"),
        ("wsi", "bad.tif"),
        ("metadata", "bad.json"),
        ("patches", "bad.h5"),
    ):
        (tmp_path / name).write_bytes(garbage)
        files = _hest_files(hest_sample)
        files[key] = tmp_path / name
        with pytest.raises(ValueError, match=name):
            read_hest(**files)


def test_read_hest_wsi_size_mismatch(hest_sample: dict[str, Path], tmp_path: Path) -> None:
    small = tmp_path / "small.tif"
    _write_pyramid(small, [_hest_image()[:256]])
    with pytest.raises(ValueError, match="wrong image"):
        read_hest(hest_sample["h5ad"], wsi=small, metadata=hest_sample["metadata"])


def test_read_hest_patch_barcodes(hest_sample: dict[str, Path], tmp_path: Path) -> None:
    def write(path: Path, barcodes: list[bytes], keys=("img", "coords", "barcode")) -> Path:
        with h5py.File(path, "w") as handle:
            n = len(barcodes)
            if "img" in keys:
                handle.create_dataset("img", data=np.zeros((n, 8, 8, 3), np.uint8))
            if "coords" in keys:
                handle.create_dataset("coords", data=np.zeros((n, 2), int))
            if "barcode" in keys:
                handle.create_dataset("barcode", data=np.array(barcodes, dtype="S")[:, None])
        return path

    partial = write(tmp_path / "partial.h5", [b"AAAC0000-1", b"AAAC0001-1", b"OTHER-1"])
    with pytest.warns(UserWarning, match=r"2 of 3 patches .* 2 of 6 spots have a patch"):
        read_hest(hest_sample["h5ad"], patches=partial)
    none = write(tmp_path / "none.h5", [b"X-1", b"Y-1"])
    with pytest.raises(ValueError, match="None of the 2 patch barcodes"):
        read_hest(hest_sample["h5ad"], patches=none)
    nobarcode = write(tmp_path / "nobarcode.h5", [b"X-1"], keys=("img", "coords"))
    with pytest.raises(ValueError, match="'barcode'"):
        read_hest(hest_sample["h5ad"], patches=nobarcode)


def test_read_hest_negative_counts(hest_sample: dict[str, Path], tmp_path: Path) -> None:
    source = anndata.read_h5ad(hest_sample["h5ad"])
    source.X = source.X.toarray()
    source.X[0, 0] = -1
    source.write_h5ad(tmp_path / "negative.h5ad")
    with pytest.raises(ValueError, match="1 negative"):
        read_hest(tmp_path / "negative.h5ad", metadata=hest_sample["metadata"])
