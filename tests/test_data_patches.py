from __future__ import annotations

import copy
import os
import pickle
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from anndata import AnnData
from conftest import HER2ST, requires_her2st
from PIL import Image

import rankbygene.data._patch_cache as patch_cache_module
import rankbygene.data._patches as patches_module
from rankbygene._layout import ImageSource
from rankbygene.data import PatchExtractor

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
# spot centres (x, y) in full-resolution pixels, all at least 8 px from the edges
COORDS = np.array([[10.0, 10.0], [40.0, 30.0], [70.0, 50.0], [25.0, 45.0], [55.0, 12.0]])


def make_adata(
    image: np.ndarray | None = IMAGE,
    coords: np.ndarray = COORDS,
    diameter: float = 10.0,
    scalef: float = 1.0,
    path: Path | None = None,
    library_id: str = "lib",
) -> AnnData:
    adata = AnnData(
        np.zeros((len(coords), 2), dtype=np.float32),
        obs=pd.DataFrame(index=[f"{library_id}_s{i}" for i in range(len(coords))]),
        obsm={"spatial": np.array(coords, dtype=float)},
    )
    entry = {
        "images": {} if image is None else {"hires": image},
        "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": diameter},
        "metadata": {} if path is None else {"source_image_path": str(path)},
    }
    adata.uns["spatial"] = {library_id: entry}
    return adata


def crop(image: np.ndarray, x: float, y: float, side: int) -> np.ndarray:
    x0, y0 = int(x - side / 2), int(y - side / 2)
    return image[y0 : y0 + side, x0 : x0 + side]


def multi_library(tmp_path: Path, n: int = 3, on_disk: bool = True) -> tuple[AnnData, list]:
    """``n`` libraries of 5 spots each; each library's image is a different random image."""
    adatas, images = [], []
    for k in range(n):
        image = np.random.default_rng(k + 1).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
        images.append(image)
        path = None
        if on_disk:
            path = tmp_path / f"lib{k}.tif"
            tifffile.imwrite(path, image)
        adatas.append(make_adata(None if on_disk else image, path=path, library_id=f"lib{k}"))
    spatial = {}
    for a in adatas:
        spatial.update(a.uns["spatial"])
    adata = AnnData(
        np.zeros((5 * n, 2), dtype=np.float32),
        obs=pd.DataFrame(
            {"library_id": np.repeat([f"lib{k}" for k in range(n)], 5)},
            index=[f"s{i}" for i in range(5 * n)],
        ),
        obsm={"spatial": np.concatenate([COORDS] * n)},
    )
    adata.uns["spatial"] = spatial
    return adata, images


def assert_unchanged(adata: AnnData, before: AnnData) -> None:
    assert list(adata.obsm) == list(before.obsm)
    for key in before.obsm:
        np.testing.assert_array_equal(np.asarray(adata.obsm[key]), np.asarray(before.obsm[key]))
    assert adata.obs.equals(before.obs)
    assert list(adata.uns) == list(before.uns)
    for lib, entry in before.uns.get("spatial", {}).items():
        now = adata.uns["spatial"][lib]
        assert now["scalefactors"] == entry["scalefactors"]
        assert now.get("metadata") == entry.get("metadata")
        assert list(now["images"]) == list(entry["images"])


# ---------------------------------------------------------------- pixels


def test_patch_equals_in_memory_pixels():
    patches = PatchExtractor(make_adata(), patch_size=10)
    assert len(patches) == len(COORDS)
    for i, (x, y) in enumerate(COORDS):
        patch = patches[i]
        assert patch.dtype == np.uint8
        assert patch.shape == (10, 10, 3)
        np.testing.assert_array_equal(patch, crop(IMAGE, x, y, 10))


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_patch_equals_file_pixels(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, IMAGE)
    else:
        Image.fromarray(IMAGE).save(path)
    adata = make_adata(image=None, path=path)
    patches = PatchExtractor(adata, patch_size=10)
    assert patches.sources["lib"].kind == "file"
    for i, (x, y) in enumerate(COORDS):
        np.testing.assert_array_equal(patches[i], crop(IMAGE, x, y, 10))


def test_hires_scale_factor():
    # the hires image is half the full resolution: coordinates and diameter are in full-res pixels
    adata = make_adata(coords=COORDS * 2, diameter=20.0, scalef=0.5)
    patches = PatchExtractor(adata, patch_size=10)
    assert patches.sources["lib"].scale == 0.5
    for i, (x, y) in enumerate(COORDS):
        np.testing.assert_array_equal(patches[i], crop(IMAGE, x, y, 10))


def test_resizing_and_patch_scale():
    adata = make_adata()
    up = PatchExtractor(adata, patch_size=24)
    expected = Image.fromarray(np.ascontiguousarray(crop(IMAGE, 40, 30, 10)))
    expected = np.asarray(expected.resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(up[1], expected)

    wide = PatchExtractor(adata, patch_scale=1.6, patch_size=16)  # 16 full-res pixels, no resize
    np.testing.assert_array_equal(wide[1], crop(IMAGE, 40, 30, 16))
    down = PatchExtractor(adata, patch_scale=1.6, patch_size=8)
    assert down[1].shape == (8, 8, 3)


def test_constant_image_stays_constant():
    image = np.full((60, 80, 3), 120, dtype=np.uint8)
    patches = PatchExtractor(make_adata(image=image), patch_size=37)
    assert (patches[2] == 120).all()


def test_float_image_in_unit_range():
    image = IMAGE.astype(np.float32) / 255.0  # squidpy keeps hires images as float
    patches = PatchExtractor(make_adata(image=image), patch_size=10)
    np.testing.assert_array_equal(patches[1], crop(IMAGE, 40, 30, 10))


# ---------------------------------------------------------------- out of bounds

EDGE = np.array([[10.0, 10.0], [2.0, 30.0], [40.0, 30.0], [79.0, 59.0], [40.0, 57.0]])


def test_out_of_bounds_raise_counts_per_library():
    adata = make_adata(coords=EDGE)
    before = copy.deepcopy(adata)
    with pytest.raises(ValueError, match=r"3 spots .*'lib': 3 of 5.*out_of_bounds='pad'.*'drop'"):
        PatchExtractor(adata, patch_size=10, out_of_bounds="raise")
    assert_unchanged(adata, before)


def test_out_of_bounds_pad_fills_white():
    with pytest.warns(UserWarning, match=r"^3 spots .*\('lib': 3 of 5\): their missing pix"):
        patches = PatchExtractor(make_adata(coords=EDGE), patch_size=10)  # pad: the default
    assert patches.valid.all()
    patch = patches[1]  # x = 2: the 3 leftmost columns lie outside the image
    assert (patch[:, :3] == 255).all()
    np.testing.assert_array_equal(patch[:, 3:], IMAGE[25:35, 0:7])
    corner = patches[3]  # bottom-right corner: only the top-left 6 x 6 pixels lie inside
    np.testing.assert_array_equal(corner[:6, :6], IMAGE[54:60, 74:80])
    assert (corner[6:] == 255).all()
    assert (corner[:, 6:] == 255).all()


def test_out_of_bounds_drop():
    patches = PatchExtractor(make_adata(coords=EDGE), patch_size=10, out_of_bounds="drop")
    np.testing.assert_array_equal(patches.valid, [True, False, True, False, False])
    np.testing.assert_array_equal(patches.indices, [0, 2])
    assert len(patches) == 5  # indexing is by AnnData position
    np.testing.assert_array_equal(patches[2], crop(IMAGE, 40, 30, 10))
    with pytest.raises(ValueError, match="dropped"):
        patches[1]
    assert [p.shape for p in patches] == [(10, 10, 3)] * 2  # iterates over the kept spots
    with pytest.raises(IndexError):
        patches[5]


def test_pad_counts_the_spots_entirely_outside():
    coords = np.vstack([EDGE, [[500.0, 30.0], [40.0, -90.0]]])
    with pytest.warns(UserWarning, match=r"5 spots .*'lib': 5 of 7\), 2 of them entirely out"):
        PatchExtractor(make_adata(coords=coords), patch_size=10)


def _with_nan(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32) / 255.0
    image[30:32, 40:43] = np.nan  # under the spot at (40, 30): 6 pixels
    image[0, 0, 1] = np.inf  # one channel of one pixel, under no spot
    return image


@pytest.mark.parametrize("out_of_bounds", ["raise", "pad", "drop"])
def test_nan_pixels_are_counted_as_missing(out_of_bounds):
    adata = make_adata(image=_with_nan(IMAGE))
    message = r"1 spots whose patch holds NaN or infinite pixels \('lib': 1 of 5; such pixels "
    message += r"per image: 'lib': 7\)"
    if out_of_bounds == "raise":
        with pytest.raises(ValueError, match=message + r"\. Pass out_of_bounds='pad'"):
            PatchExtractor(adata, patch_size=10, out_of_bounds="raise")
        return
    if out_of_bounds == "drop":
        patches = PatchExtractor(adata, patch_size=10, out_of_bounds="drop")
        np.testing.assert_array_equal(patches.indices, [0, 2, 3, 4])
        return
    with pytest.warns(UserWarning, match=message + ": their missing pixels are white"):
        patches = PatchExtractor(adata, patch_size=10)
    patch = patches[1]  # the spot at (40, 30): its box is [35, 45) x [25, 35)
    assert (patch[5:7, 5:8] == 255).all()  # NaN is white, as the glass beyond the image
    np.testing.assert_array_equal(patch[:5], crop(IMAGE, 40, 30, 10)[:5])
    assert np.isnan(adata.uns["spatial"]["lib"]["images"]["hires"]).sum() == 18  # unchanged


def test_all_out_of_bounds_hints_at_units():
    adata = make_adata(coords=COORDS * 100)
    with pytest.raises(ValueError, match="full-resolution pixels"):
        PatchExtractor(adata, out_of_bounds="drop")


# ---------------------------------------------------------------- bad input


def _drop_obsm(adata):
    del adata.obsm["spatial"]


def _bad_shape(adata):
    adata.obsm["spatial"] = np.zeros((adata.n_obs, 1))


def _nan_coords(adata):
    adata.obsm["spatial"][1, 0] = np.nan


def _wrong_library(adata):
    adata.obs["library_id"] = "other"


def _no_diameter(adata):
    del adata.uns["spatial"]["lib"]["scalefactors"]["spot_diameter_fullres"]


def _no_scalef(adata):
    del adata.uns["spatial"]["lib"]["scalefactors"]["tissue_hires_scalef"]


def _no_image(adata):
    adata.uns["spatial"]["lib"]["images"] = {}


def _missing_file(adata):
    adata.uns["spatial"]["lib"]["metadata"] = {"source_image_path": "/nonexistent/slide.tif"}


def _no_uns(adata):
    del adata.uns["spatial"]


@pytest.mark.parametrize(
    ("breaks", "kwargs", "error", "match"),
    [
        (_drop_obsm, {}, KeyError, r"obsm\['spatial'\] is missing"),
        (_bad_shape, {}, ValueError, r"obsm\['spatial'\] must have shape"),
        (_nan_coords, {}, ValueError, "NaN"),
        (_wrong_library, {"library_key": "library_id"}, KeyError, "'other' is not in"),
        (None, {"library_key": "batch"}, KeyError, "library_key 'batch'"),
        (_no_diameter, {}, KeyError, "spot_diameter_fullres"),
        (_no_scalef, {}, KeyError, "tissue_<image>_scalef"),
        (_no_scalef, {"image_key": "hires"}, KeyError, "tissue_hires_scalef"),
        (None, {"image_key": "lowres"}, KeyError, "no 'lowres'"),
        (_no_image, {}, KeyError, "has no image"),
        (_missing_file, {}, FileNotFoundError, "/nonexistent/slide.tif"),
        (_no_uns, {}, KeyError, r"uns\['spatial'\] is missing"),
        (None, {"spatial_key": "xy"}, KeyError, r"obsm\['xy'\]"),
        (None, {"patch_size": 0}, ValueError, "patch_size"),
        (None, {"patch_scale": -1.0}, ValueError, "patch_scale"),
        (None, {"out_of_bounds": "clip"}, ValueError, "out_of_bounds"),
        (None, {"cache": "ram"}, ValueError, "cache"),
        (None, {"max_open_images": 0}, ValueError, "max_open_images"),
    ],
)
def test_bad_input_errors_leave_adata_unchanged(breaks, kwargs, error, match):
    adata = make_adata()
    if breaks is not None:
        breaks(adata)
    before = copy.deepcopy(adata)
    with pytest.raises(error, match=match):
        PatchExtractor(adata, **kwargs)
    assert_unchanged(adata, before)


def test_multiple_libraries_find_their_column_or_need_library_key(tmp_path):
    adata, _ = multi_library(tmp_path, on_disk=False)
    found = PatchExtractor(adata, patch_size=10)
    given = PatchExtractor(adata, library_key="library_id", patch_size=10)
    np.testing.assert_array_equal(found[7], given[7])
    assert found.libraries == given.libraries
    adata.obs = adata.obs.rename(columns={"library_id": "batch"}).assign(
        batch=lambda obs: obs["batch"].str.upper()  # no longer the library ids
    )
    with pytest.raises(ValueError, match="pass library_key"):
        PatchExtractor(adata)


def test_does_not_keep_the_anndata():
    patches = PatchExtractor(make_adata(), patch_size=10)
    assert not any(isinstance(v, AnnData) for v in vars(patches).values())


# ---------------------------------------------------------------- caches


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_caches_match_no_cache(tmp_path, cache):
    adata, _ = multi_library(tmp_path)
    plain = PatchExtractor(adata, library_key="library_id", patch_size=12)
    cached = PatchExtractor(
        adata, library_key="library_id", patch_size=12, cache=cache, cache_dir=tmp_path / "c"
    )
    assert cached.n_cached == 0
    first = [cached[i] for i in range(adata.n_obs)]  # filled on access
    assert cached.n_cached == adata.n_obs
    second = [cached[i] for i in range(adata.n_obs)]  # served from the cache
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(first[i], plain[i])
        np.testing.assert_array_equal(second[i], plain[i])


def test_disk_cache_is_reused_without_reading(tmp_path, monkeypatch):
    adata, _ = multi_library(tmp_path)
    kwargs = {"library_key": "library_id", "patch_size": 12, "cache": "disk", "cache_dir": tmp_path}
    first = PatchExtractor(adata, **kwargs).materialize(progress=False)
    expected = [first[i] for i in range(adata.n_obs)]
    first.close()

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(PatchExtractor, "_read", fail)
    again = PatchExtractor(adata, **kwargs)
    assert again.cache_path == first.cache_path
    assert again.n_cached == adata.n_obs
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(again[i], expected[i])
    again.materialize(progress=False)  # nothing left to do

    other = PatchExtractor(adata, **{**kwargs, "patch_size": 8})
    assert other.cache_path != first.cache_path


def test_disk_cache_keeps_what_an_interrupted_run_filled(tmp_path, monkeypatch):
    adata, _ = multi_library(tmp_path)
    kwargs = {"library_key": "library_id", "patch_size": 12, "cache": "disk", "cache_dir": tmp_path}
    read = PatchExtractor._read
    calls = {"n": 0}

    def interrupted(self, i):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return read(self, i)

    monkeypatch.setattr(PatchExtractor, "_read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        PatchExtractor(adata, **kwargs).materialize(progress=False)
    monkeypatch.setattr(PatchExtractor, "_read", read)
    again = PatchExtractor(adata, **kwargs)
    assert again.n_cached == 7
    again.materialize(progress=False)
    assert again.n_cached == adata.n_obs
    plain = PatchExtractor(adata, library_key="library_id", patch_size=12)
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(again[i], plain[i])


def _cut(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.parametrize(
    ("which", "how"),
    [("pixels", "truncated"), ("pixels", "empty"), ("mask", "truncated"), ("mask", "empty")],
)
def test_damaged_disk_cache_is_rebuilt_not_served(tmp_path, caplog, which, how):
    # numpy's r+ memory map zero-extends a short .npy: black patches were served as cached, and
    # an empty file raised a bare EOFError
    adata, _ = multi_library(tmp_path)
    kwargs = {"library_key": "library_id", "patch_size": 12, "cache": "disk", "cache_dir": tmp_path}
    first = PatchExtractor(adata, **kwargs).materialize(progress=False)
    first.close()
    damaged = first.cache_path
    if which == "mask":
        damaged = damaged.with_suffix(".sums.npy")
    _cut(damaged, how)
    with caplog.at_level("WARNING", logger="rankbygene"):
        again = PatchExtractor(adata, **kwargs)
    assert f"Patch cache file {damaged} is damaged" in caplog.text
    assert again.n_cached == 0  # nothing from the damaged cache is trusted
    plain = PatchExtractor(adata, library_key="library_id", patch_size=12)
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(again[i], plain[i])
    again.close()
    assert np.load(again.cache_path).shape == (adata.n_obs, 12, 12, 3)


@pytest.mark.parametrize("which", ["pixels", "checksums"])
def test_flipped_byte_in_disk_cache_is_repaired_not_served(tmp_path, caplog, monkeypatch, which):
    adata, _ = multi_library(tmp_path)
    kwargs = {"library_key": "library_id", "patch_size": 12, "cache": "disk", "cache_dir": tmp_path}
    first = PatchExtractor(adata, **kwargs).materialize(progress=False)
    first.close()
    spot, patch_bytes = 3, 12 * 12 * 3
    path = first.cache_path if which == "pixels" else first.cache_path.with_suffix(".sums.npy")
    data = bytearray(path.read_bytes())
    header = len(data) - (adata.n_obs * (patch_bytes if which == "pixels" else 8))
    data[header + spot * (patch_bytes if which == "pixels" else 8) + 5] ^= 0x01
    path.write_bytes(bytes(data))  # same size, same header: only a checksum can tell

    plain = PatchExtractor(adata, library_key="library_id", patch_size=12)
    expected = [plain[i] for i in range(adata.n_obs)]
    again = PatchExtractor(adata, **kwargs)
    assert again.n_cached == adata.n_obs
    with caplog.at_level("WARNING", logger="rankbygene"):
        served = [again[i] for i in range(adata.n_obs)]
    assert f"the patch of spot {spot} does not match its checksum" in caplog.text
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(served[i], expected[i])
    again.close()

    def fail(*args, **kwargs):
        raise AssertionError("a repaired cache serves every patch")

    monkeypatch.setattr(PatchExtractor, "_read", fail)
    repaired = PatchExtractor(adata, **kwargs)
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(repaired[i], expected[i])


def test_damaged_disk_cache_is_rebuilt_by_a_receiving_process(tmp_path):
    adata, _ = multi_library(tmp_path, n=2)
    kwargs = {"library_key": "library_id", "patch_size": 10, "cache": "disk", "cache_dir": tmp_path}
    patches = PatchExtractor(adata, **kwargs).materialize(progress=False)
    expected = [patches[i] for i in range(adata.n_obs)]
    blob = pickle.dumps(patches)  # as a DataLoader worker receives it
    patches.close()
    _cut(patches.cache_path, "truncated")
    clone = pickle.loads(blob)
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(clone[i], expected[i])


def test_interrupted_cache_rebuild_leaves_no_stale_mask(tmp_path, monkeypatch):
    adata, _ = multi_library(tmp_path)
    kwargs = {"library_key": "library_id", "patch_size": 12, "cache": "disk", "cache_dir": tmp_path}
    first = PatchExtractor(adata, **kwargs).materialize(progress=False)
    first.close()
    # pixels of the wrong shape: rebuilt; the run is killed once the new pixels are in place,
    # before the new mask is: the old mask (all filled) must not vouch for the zeroed pixels
    np.save(first.cache_path, np.zeros((1, 12, 12, 3), dtype=np.uint8))
    replace = os.replace
    calls = {"n": 0}

    def killed_after_first(src, dst):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(patch_cache_module.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        PatchExtractor(adata, **kwargs)
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file went with the interrupt
    again = PatchExtractor(adata, **kwargs)
    assert again.n_cached == 0
    plain = PatchExtractor(adata, library_key="library_id", patch_size=12)
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(again[i], plain[i])


def test_memory_materialize_and_no_cache_error():
    patches = PatchExtractor(make_adata(), patch_size=10, cache="memory")
    patches.materialize(progress=False)
    assert patches.n_cached == len(COORDS)
    with pytest.raises(ValueError, match="needs a cache"):
        PatchExtractor(make_adata(), patch_size=10).materialize(progress=False)


def test_drop_with_cache_stores_kept_spots_only(tmp_path):
    patches = PatchExtractor(
        make_adata(coords=EDGE),
        patch_size=10,
        out_of_bounds="drop",
        cache="disk",
        cache_dir=tmp_path,
    )
    patches.materialize(progress=False)
    assert np.load(patches.cache_path, mmap_mode="r").shape == (2, 10, 10, 3)
    np.testing.assert_array_equal(patches[2], crop(IMAGE, 40, 30, 10))


# ---------------------------------------------------------------- open images, pickling


def _track_readers(monkeypatch):
    """Count images opened by the extractor and how many are open at once."""
    state = {"open": 0, "peak": 0, "opened": 0}
    real_open = patches_module.open_image

    def tracking_open(source, *args, **kwargs):
        reader = real_open(source, *args, **kwargs)
        real_close = reader.close
        state["open"] += 1
        state["opened"] += 1
        state["peak"] = max(state["peak"], state["open"])

        def close():
            state["open"] -= 1
            real_close()

        reader.close = close
        return reader

    monkeypatch.setattr(patches_module, "open_image", tracking_open)
    return state


@pytest.mark.parametrize("max_open", [1, 2])
def test_at_most_max_open_images(tmp_path, monkeypatch, max_open):
    adata, images = multi_library(tmp_path, n=3)
    patches = PatchExtractor(
        adata, library_key="library_id", patch_size=10, max_open_images=max_open
    )
    state = _track_readers(monkeypatch)
    order = np.random.default_rng(0).permutation(adata.n_obs)  # jump between libraries
    for i in order:
        np.testing.assert_array_equal(patches[i], crop(images[i // 5], *COORDS[i % 5], 10))
        assert len(patches.open_libraries) <= max_open
    assert state["peak"] <= max_open
    assert state["opened"] > 3  # libraries were closed and reopened
    patches.close()
    assert state["open"] == 0


def test_materialize_opens_one_image_at_a_time(tmp_path, monkeypatch):
    adata, _ = multi_library(tmp_path, n=3)
    patches = PatchExtractor(
        adata, library_key="library_id", patch_size=10, cache="memory", max_open_images=3
    )
    state = _track_readers(monkeypatch)
    patches.materialize(progress=False)
    assert state["peak"] == 1
    assert state["opened"] == 3
    assert state["open"] == 0


def test_pickle_drops_open_images(tmp_path):
    adata, _ = multi_library(tmp_path, n=2)
    patches = PatchExtractor(adata, library_key="library_id", patch_size=10, max_open_images=2)
    expected = [patches[i] for i in range(adata.n_obs)]
    assert len(patches.open_libraries) == 2
    clone = pickle.loads(pickle.dumps(patches))
    assert clone.open_libraries == ()
    for i in range(adata.n_obs):
        np.testing.assert_array_equal(clone[i], expected[i])


def test_pickle_disk_cache_reopens_the_memory_map(tmp_path):
    adata, _ = multi_library(tmp_path, n=2)
    patches = PatchExtractor(
        adata, library_key="library_id", patch_size=10, cache="disk", cache_dir=tmp_path
    )
    patches.materialize(progress=False)
    blob = pickle.dumps(patches)
    assert len(blob) < 10_000  # neither images nor cached patches travel
    clone = pickle.loads(blob)
    assert clone.n_cached == adata.n_obs
    np.testing.assert_array_equal(clone[3], patches[3])


def test_forked_process_opens_its_own_images(tmp_path):
    adata, images = multi_library(tmp_path, n=1)
    patches = PatchExtractor(adata, library_key="library_id", patch_size=10)
    patches[0]
    parent_reader = patches._readers["lib0"]
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's open file
        ok = np.array_equal(patches[1], crop(images[0], *COORDS[1], 10))
        ok = ok and patches._readers["lib0"] is not parent_reader
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert patches._readers["lib0"] is parent_reader


# ---------------------------------------------------------------- precomputed (HEST) patches


def test_precomputed_patches_from_hdf5(tmp_path):
    stored = np.random.default_rng(3).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "patches.h5"
    with h5py.File(path, "w") as f:
        f["img"] = stored
        f["barcode"] = np.array([[b"AAA-1"], [b"CCC-1"], [b"GGG-1"], [b"TTT-1"]])
    adata = AnnData(
        np.zeros((3, 1)),
        obs=pd.DataFrame(index=["GGG-1", "AAA-1", "NNN-1"]),
        obsm={"spatial": np.zeros((3, 2))},
    )
    adata.uns["spatial"] = {"hest": {"images": {}, "scalefactors": {}, "metadata": {}}}
    adata.uns["spatial"]["hest"]["metadata"]["patches_path"] = str(path)

    with pytest.raises(ValueError, match=r"^1 spots that have no row in the patches file \('"):
        PatchExtractor(adata, patch_size=16, out_of_bounds="raise")
    patches = PatchExtractor(adata, patch_size=16, out_of_bounds="drop")
    np.testing.assert_array_equal(patches.indices, [0, 1])
    np.testing.assert_array_equal(patches[0], stored[2])
    np.testing.assert_array_equal(patches[1], stored[0])
    with pytest.warns(UserWarning, match="1 spots that have no row .*are white"):
        resized = PatchExtractor(adata, patch_size=8, out_of_bounds="pad")
    expected = np.asarray(Image.fromarray(stored[2]).resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resized[0], expected)
    assert (resized[2] == 255).all()
    clone = pickle.loads(pickle.dumps(patches))
    np.testing.assert_array_equal(clone[1], stored[0])


def test_precomputed_patches_file_must_have_datasets(tmp_path):
    path = tmp_path / "broken.h5"
    with h5py.File(path, "w") as f:
        f["img"] = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    adata = AnnData(np.zeros((1, 1)), obsm={"spatial": np.zeros((1, 2))})
    adata.uns["spatial"] = {"hest": {"metadata": {"patches_path": str(path)}}}
    with pytest.raises(KeyError, match="no dataset 'barcode'"):
        PatchExtractor(adata)


# ---------------------------------------------------------------- real data


@pytest.mark.slow
@requires_her2st
def test_her2st_patch_equals_jpeg_pixels(monkeypatch):
    spots = pd.read_csv(HER2ST / "ST-spotfiles" / "C2_selection.tsv", sep="\t")
    image_path = next((HER2ST / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    adata = AnnData(
        np.zeros((len(spots), 1)),
        obs=pd.DataFrame(index=[f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]),
        obsm={"spatial": spots[["pixel_x", "pixel_y"]].to_numpy(dtype=float)},
    )
    adata.uns["spatial"] = {
        "C2": {
            "images": {},
            "scalefactors": {"spot_diameter_fullres": 128.0},
            "metadata": {"source_image_path": str(image_path)},
        }
    }
    start = time.perf_counter()
    patches = PatchExtractor(adata, patch_size=128)
    assert time.perf_counter() - start < 1.0  # sizes from the JPEG header, nothing decoded
    i = 5
    x, y = adata.obsm["spatial"][i]
    x0, y0 = int(np.floor(x - 64)), int(np.floor(y - 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the slide exceeds PIL's guard
    with Image.open(image_path) as im:
        expected = np.asarray(im.crop((x0, y0, x0 + 128, y0 + 128)).convert("RGB"))
    np.testing.assert_array_equal(patches[i], expected)


# ---------------------------------------------------------------- resolution


def test_check_resolution_warns_about_tiles_once_and_logs_blurry_spots(caplog):
    small_tiles = ImageSource("tiles_8um", 16.0, image_key="hires", tile_size_um=8.0)
    coarse_spots = ImageSource("coarse_spots", 6.0, image_key="hires")  # 6 px * 4 < 32
    sharp_tiles = ImageSource("tiles_32um", 64.0, image_key="hires", tile_size_um=32.0)
    sources = {"a": small_tiles, "b": coarse_spots, "c": sharp_tiles}
    with pytest.raises(ValueError, match=r"'a' \(in memory\): tiles of 8 um span 16 px"):
        PatchExtractor.check_resolution(sources, 1.0, 32, action="raise")
    with (
        caplog.at_level("WARNING", logger="rankbygene"),
        pytest.warns(UserWarning, match="upsampled") as caught,
    ):
        assert PatchExtractor.check_resolution(sources, 1.0, 32) == ["a", "b"]
    assert len(caught) == 1
    assert "'c'" not in str(caught[0].message)
    assert "Library 'b': a patch spans 6.0 pixels" in caplog.text
    # the same images at the same geometry are not reported again; another geometry is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PatchExtractor.check_resolution(sources, 1.0, 32) == ["a", "b"]
    with pytest.warns(UserWarning, match="span 24 px"):
        PatchExtractor.check_resolution(sources, 1.5, 32)
    assert PatchExtractor.check_resolution(sources, 1.0, 16) == []
