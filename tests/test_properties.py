"""Property-based tests: readers, preprocessing and setup on random and damaged inputs.

Every public entry point tested here either works, returning output of the documented shape
and type, or raises a ``ValueError``, ``KeyError``, ``FileNotFoundError`` or ``TypeError``
whose message names the file, key or argument at fault; never another exception, and a
failing call never changes the AnnData it was given.

The examples are derandomised, so a run is reproducible and CI sees the same cases as a
laptop. ``RANKBYGENE_HYPOTHESIS_SCALE=10`` multiplies every example count, and
``RANKBYGENE_HYPOTHESIS_RANDOM=1`` draws other examples, for a deeper search.
"""

from __future__ import annotations

import copy
import gzip
import io
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
import tifffile
from anndata import AnnData
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from scipy import sparse

import rankbygene as rbg
from rankbygene._image import as_rgb_uint8, open_image
from rankbygene.pp._genes import MIN_HVG_GENES, _n_varying_genes
from rankbygene.pp._smooth import smoothed_layer_key

# Library warnings (a partial spot match, scanpy's on odd input) are expected on random input.
pytestmark = pytest.mark.filterwarnings("ignore")

#: The only exception types a bad input may raise, exactly (a subclass such as pandas'
#: ParserError or UnicodeDecodeError is a library's error leaking through).
CLEAR_ERRORS = (ValueError, KeyError, FileNotFoundError, TypeError)

_SCALE = max(1, int(os.environ.get("RANKBYGENE_HYPOTHESIS_SCALE", "1")))

#: Reproducible and with no time limit per example: the shared CI machines vary in speed.
#: ``RANKBYGENE_HYPOTHESIS_RANDOM=1`` draws new examples each run (``--hypothesis-seed=N``
#: fixes them).
BASE_SETTINGS = settings(
    derandomize=not os.environ.get("RANKBYGENE_HYPOTHESIS_RANDOM"),
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(n: int) -> settings:
    """The base settings with ``n`` examples (times ``RANKBYGENE_HYPOTHESIS_SCALE``)."""
    return settings(BASE_SETTINGS, max_examples=n * _SCALE)


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int = 6) -> st.SearchStrategy:
    """``common`` about ``odds`` times as often as ``rare``.

    ``st.one_of`` draws its branches about equally often; invalid values drawn that often would
    stop most examples at the first check, so that the code after it is seldom reached.
    """
    return st.sampled_from([True] * odds + [False]).flatmap(lambda c: common if c else rare)


# ------------------------------------------------------------------------------ helpers


def _message(err: BaseException) -> str:
    # KeyError's str() is the repr of its argument: quotes would be escaped
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def assert_clear(err: BaseException, names: Iterable[str]) -> None:
    """``err`` is one of the clear error types and its message names one of ``names``."""
    names = [str(n) for n in names]
    assert type(err) in CLEAR_ERRORS, f"unclear error {type(err).__module__}.{err!r}"
    message = _message(err)
    assert any(name in message for name in names), (
        f"{type(err).__name__} names none of {names}: {message}"
    )


def outcome(call: Callable[[], Any], names: Iterable[str]) -> tuple[Any, BaseException | None]:
    """``(result, None)`` when ``call`` works, ``(None, error)`` when it fails clearly."""
    try:
        result = call()
    except Exception as err:
        assert_clear(err, names)
        if currently_in_test_context():
            # --hypothesis-show-statistics then tells which checks the examples reached
            message = re.sub(r"/\S+|\d+", "#", f"{type(err).__name__}: {_message(err)}")
            event("raises", message[:50])
        return None, err
    if currently_in_test_context():
        event("works")
    return result, None


def _dense(x: Any) -> np.ndarray:
    """``x`` as a dense numpy array."""
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def assert_same_matrix(before: Any, after: Any, where: str) -> None:
    """Same kind (dense/sparse), dtype, shape and values (NaN equal to NaN)."""
    if before is None or after is None:
        assert before is after, f"{where}: {before!r} -> {after!r}"
        return
    assert sparse.issparse(before) == sparse.issparse(after), f"{where}: sparse/dense changed"
    assert before.dtype == after.dtype, f"{where}: dtype {before.dtype} -> {after.dtype}"
    assert before.shape == after.shape, f"{where}: shape {before.shape} -> {after.shape}"
    a, b = _dense(before), _dense(after)
    equal_nan = a.dtype.kind in "fc"
    assert np.array_equal(a, b, equal_nan=equal_nan), f"{where}: values changed"


def _nested_keys(value: Any, prefix: str = "") -> set[str]:
    """Paths of every key in nested mappings, e.g. ``/spatial/lib/images``."""
    if not isinstance(value, Mapping):
        return set()
    keys = set()
    for key, item in value.items():
        keys.add(f"{prefix}/{key}")
        keys |= _nested_keys(item, f"{prefix}/{key}")
    return keys


def assert_unchanged(before: AnnData, after: AnnData) -> None:
    """``after`` holds what ``before`` (a deep copy taken earlier) held: X, layers, obs, var,
    obsm and the keys of uns."""
    assert after.shape == before.shape
    assert_same_matrix(before.X, after.X, "X")
    assert list(after.layers) == list(before.layers), "layers added or removed"
    for key in before.layers:
        assert_same_matrix(before.layers[key], after.layers[key], f"layers[{key!r}]")
    pd.testing.assert_frame_equal(after.obs, before.obs)
    pd.testing.assert_frame_equal(after.var, before.var)
    assert list(after.obsm) == list(before.obsm), "obsm keys added or removed"
    for key in before.obsm:
        assert_same_matrix(
            np.asarray(before.obsm[key]), np.asarray(after.obsm[key]), f"obsm[{key!r}]"
        )
    assert _nested_keys(after.uns) == _nested_keys(before.uns), "uns keys changed"


def _nan_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------- in-memory images

_IMAGE_DTYPES = [
    np.uint8,
    np.uint16,
    np.uint32,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex64,
    ">u2",  # big-endian 16-bit, as some TIFFs hold it
    "U2",
    "datetime64[s]",
]


@st.composite
def image_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of any dimension up to 4, small sides, any numeric dtype, NaN/inf included."""
    dtype = np.dtype(draw(st.sampled_from(_IMAGE_DTYPES)))
    ndim = draw(mostly(st.sampled_from([2, 3, 3]), st.sampled_from([0, 1, 4])))
    # Hypothesis starts from the simplest draws (zeros, first elements): valid ones, here and
    # below, so that most examples get past the first check
    shape = tuple(draw(mostly(st.integers(1, 5), st.just(0), odds=12)) for _ in range(ndim))
    if ndim == 3 and draw(st.integers(0, 3)) < 3:  # mostly a valid number of channels
        shape = (*shape[:2], draw(st.sampled_from([3, 1, 4])))
    return draw(hnp.arrays(dtype, shape))


@examples(400)
@given(array=image_arrays(), name=st.sampled_from(["image", "uns['spatial']['A1']"]))
def test_as_rgb_uint8_on_any_array(array: np.ndarray, name: str) -> None:
    """Any array: RGB uint8 of its height and width, or a ValueError naming the image."""
    before = array.copy()
    result, err = outcome(lambda: as_rgb_uint8(array, name=name), [name])
    assert _nan_equal(array, before), "as_rgb_uint8 changed its input"
    if err is not None:
        assert isinstance(err, ValueError)
        return
    assert result.dtype == np.uint8
    assert result.ndim == 3
    assert result.shape[2] == 3
    assert result.shape[:2] == array.shape[:2]
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] >= 3:
        np.testing.assert_array_equal(result, array[..., :3])
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 1):
        # grey repeated to the three channels
        assert (result == result[..., :1]).all()


@st.composite
def boxes(draw: st.DrawFn) -> tuple[float, float, float, float]:
    """Regions anywhere, of any size: inside, across the edge, outside, empty, NaN or infinite."""
    coordinate = st.one_of(
        st.integers(-8, 16).map(float),
        st.floats(-20, 20, allow_nan=False),
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e18]),
    )
    size = st.one_of(
        st.integers(1, 12).map(float),
        st.floats(0.01, 30),
        # not 1e18: a box of that size is a MemoryError, an honest answer
        st.sampled_from([0.0, -3.0, float("nan"), float("inf")]),
    )
    return draw(coordinate), draw(coordinate), draw(size), draw(size)


def _expected_box_shape(width: float, height: float, out_size: Any) -> tuple[int, int, int]:
    """The shape ``read_region`` documents for a box of ``width x height``."""
    if out_size is not None:
        out_w, out_h = (out_size, out_size) if isinstance(out_size, int) else out_size
        return out_h, out_w, 3
    return max(1, round(height)), max(1, round(width)), 3


@examples(300)
@given(
    array=image_arrays(),
    box=boxes(),
    out_size=st.one_of(
        st.none(), st.integers(1, 6), st.tuples(st.integers(1, 6), st.integers(1, 6))
    ),
    max_side=st.integers(1, 8),
)
def test_array_image_regions(
    array: np.ndarray, box: tuple[float, float, float, float], out_size: Any, max_side: int
) -> None:
    """Regions and thumbnails of in-memory images: the documented shape, or a clear error."""
    before = array.copy()
    reader, err = outcome(lambda: open_image(array), ["image"])
    assert _nan_equal(array, before), "open_image changed its input"
    if err is not None:
        return
    x, y, width, height = box
    names = ["Region"]
    region, err = outcome(lambda: reader.read_region(x, y, width, height, out_size), names)
    if err is None:
        assert region.dtype == np.uint8
        assert region.shape == _expected_box_shape(width, height, out_size)
    thumb, err = outcome(lambda: reader.thumbnail(max_side), ["image", "max_side"])
    if err is None:
        image, scale = thumb
        assert image.dtype == np.uint8
        assert image.ndim == 3
        assert image.shape[2] == 3
        assert max(image.shape[:2]) <= max(max_side, 1)
        assert 0 < scale <= 1
    assert _nan_equal(array, before), "reading regions changed the array"


# ----------------------------------------------------------------------- image files

#: PIL modes each format writes; TIFF through tifffile is drawn separately.
_PIL_FORMATS = {
    "PNG": ["L", "RGB", "RGBA", "LA", "P", "1", "I;16"],
    "JPEG": ["L", "RGB"],
    "BMP": ["L", "RGB", "P", "1"],
    "TIFF": ["L", "RGB", "RGBA", "I;16", "I", "F"],
}
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}
_LOSSLESS_EXACT = {"L", "RGB", "RGBA", "I;16", "F"}


def _pil_image(mode: str, pixels: np.ndarray) -> Image.Image:
    """An image of ``mode`` from random uint16 ``pixels`` ``(H, W, 4)``."""
    small = (pixels >> 8).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(small[..., :3], "RGB")
    if mode == "RGBA":
        return Image.fromarray(small, "RGBA")
    if mode == "LA":
        return Image.fromarray(small[..., :2], "LA")
    if mode == "I;16":
        return Image.fromarray(pixels[..., 0].astype(np.uint16))
    if mode == "I":
        return Image.fromarray(pixels[..., 0].astype(np.int32))
    if mode == "F":
        return Image.fromarray(pixels[..., 0].astype(np.float32) / 65535)
    grey = Image.fromarray(small[..., 0], "L")
    if mode == "P":
        return grey.convert("P")
    if mode == "1":
        return grey.convert("1")
    return grey


class ImageFile(NamedTuple):
    """A small image file: its suffix, bytes, pixels as RGB (lossless formats) and reader."""

    suffix: str
    data: bytes
    expected: np.ndarray | None
    backend: str


@st.composite
def image_files(draw: st.DrawFn) -> ImageFile:
    """A small image file in a drawn format, and the backend to read it with."""
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    pixels = draw(hnp.arrays(np.uint16, (height, width, 4)))
    kind = draw(st.sampled_from(["PNG", "JPEG", "BMP", "TIFF", "tifffile", "tifffile"]))
    if kind == "tifffile":
        return ImageFile(*_tifffile_image(draw, pixels), backend="auto")
    mode = draw(st.sampled_from(_PIL_FORMATS[kind]))
    image = _pil_image(mode, pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    expected = None
    if kind != "JPEG" and mode in _LOSSLESS_EXACT:
        expected = as_rgb_uint8(np.asarray(image))
    # PIL's TIFFs through PIL too: its 16-bit, 32-bit and float modes take their own path
    backend = draw(st.sampled_from(["auto", "pil"])) if kind == "TIFF" else "auto"
    return ImageFile(_SUFFIX[kind], buffer.getvalue(), expected, backend)


def _tifffile_image(draw: st.DrawFn, pixels: np.ndarray) -> tuple[str, bytes, np.ndarray]:
    """A TIFF written by tifffile: strips or 16-px tiles, compressed or not, maybe a pyramid."""
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32]))
    channels = draw(st.sampled_from([0, 3, 4]))
    data = pixels[..., : max(channels, 1)]
    data = data[..., 0] if channels == 0 else data
    if dtype == np.uint8:
        data = (data >> 8).astype(np.uint8)
    elif dtype == np.float32:
        data = data.astype(np.float32) / 65535
    tile = draw(st.sampled_from([None, (16, 16)]))
    compression = draw(st.sampled_from([None, "zlib", "lzw"]))
    pyramid = draw(st.booleans()) and min(data.shape[:2]) >= 2
    buffer = io.BytesIO()
    kwargs: dict[str, Any] = {"tile": tile, "compression": compression}
    kwargs["photometric"] = "rgb" if channels else "minisblack"
    if channels == 4:
        kwargs["extrasamples"] = ["unassalpha"]
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(data, subifds=1 if pyramid else 0, **kwargs)
        if pyramid:
            tif.write(data[::2, ::2], subfiletype=1, **kwargs)
    return ".tif", buffer.getvalue(), as_rgb_uint8(data)


def _damage(data: bytes, how: str, where: float, byte: int) -> bytes:
    """``data`` emptied, cut at ``where`` (a fraction), or with the byte there replaced."""
    if how == "empty":
        return b""
    position = min(len(data) - 1, int(where * len(data)))
    if how == "truncated":
        return data[:position]
    if how == "zero tail":  # a download that stopped, its file pre-allocated
        return data[:position] + bytes(len(data) - position)
    damaged = bytearray(data)
    damaged[position] = byte
    return bytes(damaged)


#: Most pixels a damaged header may claim and still be read: beyond, decoding even a corner can
#: mean a strip of gigabytes (a MemoryError, as for a real image of that size), so only the
#: header is read.
_MAX_CLAIMED_PIXELS = 2**20


def _read_whole(path: Path, backend: str = "auto") -> np.ndarray | None:
    """Open ``path``, take a thumbnail and read the whole image with a white margin.

    ``None`` when the header claims more than ``_MAX_CLAIMED_PIXELS`` (a damaged one).
    """
    reader = open_image(path, backend=backend)
    try:
        height, width = reader.shape
        assert height >= 1
        assert width >= 1
        if height * width > _MAX_CLAIMED_PIXELS:
            return None
        thumb, scale = reader.thumbnail(8)
        assert thumb.dtype == np.uint8
        assert thumb.shape[2] == 3
        assert max(thumb.shape[:2]) <= 8
        assert 0 < scale <= 1
        region = reader.read_region(-2, -2, width + 4, height + 4)
        assert region.shape == (height + 4, width + 4, 3)
        assert region.dtype == np.uint8
        assert (region[:2] == 255).all()
        assert (region[:, :2] == 255).all()
        return region[2:-2, 2:-2]
    finally:
        reader.close()


@examples(300)
@given(file=image_files())
def test_image_files_read_back(file: ImageFile) -> None:
    """Intact files open, and lossless ones read back the pixels written."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"slide{file.suffix}"
        path.write_bytes(file.data)
        pixels = _read_whole(path, file.backend)
        assert pixels is not None
        if file.expected is not None:
            np.testing.assert_array_equal(pixels, file.expected)


@examples(600)
@given(
    file=image_files(),
    how=st.sampled_from(["truncated", "truncated", "zero tail", "byte", "empty"]),
    where=st.floats(0, 1),
    byte=st.integers(0, 255),
)
def test_damaged_image_files_are_named(file: ImageFile, how: str, where: float, byte: int) -> None:
    """Truncated, zero-padded, emptied or altered files: read, or a ValueError naming them."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"damaged{file.suffix}"
        path.write_bytes(_damage(file.data, how, where, byte))
        outcome(lambda: _read_whole(path, file.backend), [path.name])


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    """A missing image is a FileNotFoundError naming it."""
    path = tmp_path / "nowhere.png"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png"):
        open_image(path)


# ------------------------------------------------------------------------------ read_st

_GENE = st.one_of(
    st.text("ABCDEFGXYZ0123456789-_.", min_size=1, max_size=6),
    st.sampled_from(["", "NA", "nan", "1", "#G", "G 1", '"G"', "Ünï"]),
)
_BAD_CELLS = ["nan", "inf", "-1", "abc", "", "1.5", "1e400", "NA", "-0"]


@st.composite
def st_sections(draw: st.DrawFn) -> dict[str, Any]:
    """Text of a small ST section's count table and spot file, and its image, maybe broken."""
    n_x, n_y = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    positions = [(x, y) for y in range(1, n_y + 1) for x in range(1, n_x + 1)]
    genes = draw(mostly(st.lists(_GENE, min_size=1, max_size=4), st.just([])))
    counts = draw(hnp.arrays(np.int64, (len(positions), len(genes)), elements=st.integers(0, 20)))
    rows = [[f"{x}x{y}", *map(str, row)] for (x, y), row in zip(positions, counts, strict=True)]
    header = ["", *genes] if draw(st.booleans()) else list(genes)
    count_edit = draw(
        st.sampled_from([None, None, None, "cell", "ragged", "duplicate", "transpose", "names"])
    )
    if count_edit == "cell" and genes:
        row, col = draw(st.integers(0, len(rows) - 1)), draw(st.integers(1, len(genes)))
        rows[row][col] = draw(st.sampled_from(_BAD_CELLS))
    elif count_edit == "ragged":
        rows[draw(st.integers(0, len(rows) - 1))].append("3")
    elif count_edit == "duplicate":
        rows.append(list(rows[0]))
    elif count_edit == "transpose":
        table = [header if header[:1] == [""] else ["", *header], *rows]
        width = max(map(len, table))
        table = [r + [""] * (width - len(r)) for r in table]
        header, *rows = [list(col) for col in zip(*table, strict=True)]
    elif count_edit == "names":
        rows[draw(st.integers(0, len(rows) - 1))][0] = draw(st.sampled_from(["", "1x", "x1", "0"]))
    count_text = "\n".join("\t".join(r) for r in [header, *rows]) + "\n"

    pitch = 10.0
    spots = pd.DataFrame(
        {
            "x": [p[0] for p in positions],
            "y": [p[1] for p in positions],
            "pixel_x": [5 + pitch * p[0] for p in positions],
            "pixel_y": [5 + pitch * p[1] for p in positions],
            "selected": draw(
                st.lists(
                    st.sampled_from([1, 1, 1, 0]), min_size=len(positions), max_size=len(positions)
                )
            ),
        }
    )
    spot_edit = draw(st.sampled_from([None, None, None, "drop", "cell", "scale", "no selected"]))
    if spot_edit == "drop":
        spots = spots.drop(columns=draw(st.sampled_from(list(spots.columns))))
    elif spot_edit == "cell":
        column = draw(st.sampled_from(list(spots.columns)))
        spots[column] = spots[column].astype(object)
        spots.loc[draw(st.integers(0, len(spots) - 1)), column] = draw(
            st.sampled_from([*_BAD_CELLS, "1.5", 1e300])
        )
    elif spot_edit == "scale":
        spots[["pixel_x", "pixel_y"]] *= draw(st.sampled_from([0.0, 0.1, 10.0, -1.0]))
    elif spot_edit == "no selected":
        spots = spots.drop(columns="selected")
    spot_text = spots.to_csv(sep="\t", index=False)

    side = int(pitch * (max(n_x, n_y) + 1) + 10)
    image = draw(hnp.arrays(np.uint8, (side // 4, side // 4, 3)))
    buffer = io.BytesIO()
    Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST).save(buffer, "PNG")
    return {
        "counts": count_text.encode(),
        "spots": spot_text.encode(),
        "image": buffer.getvalue(),
        # a row made longer is a table without a corner cell when it is the only row
        "n_genes": None if count_edit == "ragged" else len(genes),
        "spot_names": {r[0] for r in rows},
    }


@examples(300)
@given(
    section=st_sections(),
    gzipped=st.sampled_from([(False, False), (True, False), (True, True), (False, True)]),
    damaged=st.sampled_from([None] * 6 + ["counts", "spots", "image"]),
    how=st.sampled_from(["truncated", "zero tail", "byte", "empty"]),
    where=st.floats(0, 1),
    byte=st.integers(0, 255),
    spot_diameter=st.sampled_from([None] * 6 + [8.0, 0.0, float("nan")]),
)
def test_read_st_on_random_sections(
    section: dict[str, Any],
    gzipped: tuple[bool, bool],
    damaged: str | None,
    how: str,
    where: float,
    byte: int,
    spot_diameter: float | None,
) -> None:
    """Small sections, maybe broken or damaged: a valid AnnData, or an error naming a file."""
    with tempfile.TemporaryDirectory() as root:
        paths = {
            "counts": Path(root) / ("S1.tsv.gz" if gzipped[0] else "S1.tsv"),
            "spots": Path(root) / ("S1_selection.tsv.gz" if gzipped[1] else "S1_selection.tsv"),
            "image": Path(root) / "S1.png",
        }
        for key, path in paths.items():
            data = section[key]
            if path.suffix == ".gz":
                data = gzip.compress(data, mtime=0)
            if key == damaged:
                data = _damage(data, how, where, byte)
            path.write_bytes(data)
        names = [p.name for p in paths.values()] + ["spot_diameter"]
        adata, err = outcome(
            lambda: rbg.io.read_st(
                paths["counts"],
                paths["spots"],
                paths["image"],
                spot_diameter=spot_diameter,
                hires_max_side=16,
                lowres_max_side=8,
            ),
            names,
        )
    if err is not None:
        return
    n_obs = adata.n_obs
    assert n_obs >= 1
    assert section["n_genes"] is None or adata.n_vars == section["n_genes"]
    assert adata.var_names.is_unique
    assert adata.obs_names.is_unique
    assert set(adata.obs_names) <= section["spot_names"]
    x = _dense(adata.X)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert (x >= 0).all()
    np.testing.assert_array_equal(_dense(adata.layers["counts"]), x)
    coords = adata.obsm["spatial"]
    assert coords.shape == (n_obs, 2)
    assert np.isfinite(coords).all()
    (entry,) = adata.uns["spatial"].values()
    for image in entry["images"].values():
        assert image.dtype == np.uint8
        assert image.ndim == 3
        assert image.shape[2] == 3
    assert all(np.isfinite(v) and v > 0 for v in entry["scalefactors"].values())


def test_read_st_missing_files_are_named(tmp_path: Path) -> None:
    """Each missing file of a section is a FileNotFoundError naming it."""
    for name in ("counts.tsv", "spots.tsv", "he.png"):
        files = {n: tmp_path / n for n in ("counts.tsv", "spots.tsv", "he.png")}
        for other, path in files.items():
            if other != name:
                path.write_text("x")
        files[name].unlink(missing_ok=True)
        with pytest.raises(FileNotFoundError, match=name):
            rbg.io.read_st(*files.values())


# ------------------------------------------------------------------- AnnData for pp


_SPECIAL = [np.nan, np.inf, -np.inf, -1.0, 0.5, 1e30]


@st.composite
def count_matrices(
    draw: st.DrawFn,
    max_obs: int = 6,
    max_vars: int = 6,
    min_obs: int = 0,
    min_vars: int = 0,
    poisson: bool | None = None,
) -> Any:
    """Small count matrices: dense or sparse, integer, float or bool, maybe one bad value.

    Values are Hypothesis' (mostly one repeated value: edge cases) or Poisson counts of a drawn
    mean (every gene varies, as real counts do); ``poisson`` chooses, ``None`` draws it.
    """
    # an empty matrix now and then, not as often as Hypothesis draws its smallest size
    n_obs = draw(mostly(st.integers(max(min_obs, 1), max_obs), st.just(min_obs), odds=12))
    n_vars = draw(mostly(st.integers(max(min_vars, 1), max_vars), st.just(min_vars), odds=12))
    dtype = draw(
        st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint16] * 2 + [np.bool_])
    )
    if poisson is None:
        poisson = draw(st.booleans())
    if poisson:
        mean = draw(st.sampled_from([0.2, 2.0, 20.0, 500.0]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        values = rng.poisson(mean, size=(n_obs, n_vars))
    else:
        values = draw(hnp.arrays(np.int64, (n_obs, n_vars), elements=st.integers(0, 30)))
    values = values.astype(dtype)
    special = draw(mostly(st.none(), st.sampled_from(_SPECIAL), odds=8))
    if special is not None and values.size:
        i, j = draw(st.integers(0, n_obs - 1)), draw(st.integers(0, n_vars - 1))
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            values = values.astype(np.float64 if values.dtype.kind != "f" else values.dtype)
            values[i, j] = special
    kind = draw(st.sampled_from(["dense", "csr", "csc"]))
    if kind == "csr":
        return sparse.csr_matrix(values)
    if kind == "csc":
        return sparse.csc_matrix(values)
    return values


@st.composite
def count_adatas(draw: st.DrawFn, **kwargs: Any) -> tuple[AnnData, str | None]:
    """An AnnData with counts in X or in ``layers['counts']``, and the layer to name.

    ``kwargs`` go to :func:`count_matrices`.
    """
    matrix = draw(count_matrices(**kwargs))
    n_obs, n_vars = matrix.shape
    genes = [f"G{i}" for i in range(n_vars)]
    if n_vars > 1 and draw(st.integers(0, 9)) == 9:
        genes[-1] = genes[0]  # a repeated gene name
    adata = AnnData(
        obs=pd.DataFrame(index=[f"s{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=genes),
    )
    where = draw(st.sampled_from(["X", "layer", "layer+X"]))
    if where == "X":
        adata.X = matrix
        layer = None
    else:
        adata.layers["counts"] = matrix
        if where == "layer+X":
            adata.X = matrix.copy()
        layer = "counts"
    if draw(st.integers(0, 9)) == 9:
        layer = "missing"
    adata.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 1.0}}}
    return adata, layer


def _matrix_names(layer: str | None) -> list[str]:
    """How an error may name the expression matrix of ``layer``."""
    return ["adata.X", f"layers[{layer!r}]", f"layer {layer!r}", f"'{layer}'"]


@examples(300)
@given(
    data=count_adatas(),
    target_sum=mostly(
        # not below 1e-3: float32 results underflow to 0 (as they should)
        st.one_of(st.none(), st.floats(1e-3, 1e6), st.just(1e4)),
        st.sampled_from([0.0, -2.5, float("nan"), float("inf"), "1e4", True]),
    ),
    key_added=st.sampled_from(["lognorm"] * 6 + ["counts", ""]),
    copy_=st.booleans(),
)
def test_normalize_on_random_counts(
    data: tuple[AnnData, str | None], target_sum: float | None, key_added: str, copy_: bool
) -> None:
    """Spots with counts sum to target_sum after expm1; nothing else in adata changes."""
    adata, layer = data
    before = copy.deepcopy(adata)
    names = ["target_sum", "key_added", *_matrix_names(layer)]
    call = lambda: rbg.pp.normalize(  # noqa: E731
        adata, target_sum=target_sum, layer=layer, key_added=key_added, copy=copy_
    )
    result, err = outcome(call, names)
    if err is not None or copy_:
        assert_unchanged(before, adata)
    if err is not None:
        return
    out = result if copy_ else adata
    lognorm = _dense(out.layers[key_added])
    assert lognorm.shape == adata.shape
    assert lognorm.dtype == np.float32
    assert np.isfinite(lognorm).all()
    assert (lognorm >= 0).all()
    # each spot with counts sums to target_sum (by default the median of those totals)
    matrix = adata.X if layer is None else adata.layers[layer]
    totals = _dense(matrix).astype(np.float64).sum(axis=1)
    target = np.median(totals[totals > 0]) if target_sum is None else target_sum
    sums = np.expm1(lognorm.astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(sums[totals > 0], target, rtol=1e-3)
    np.testing.assert_array_equal(sums[totals == 0], 0)
    # only the new layer was added
    del out.layers[key_added]
    assert_unchanged(before, out)


@examples(300)
@given(
    data=count_adatas(),
    n_top=mostly(st.integers(1, 8), st.sampled_from([0, -1, True, 2.5, np.int64(3), "3"])),
    flavor=st.sampled_from(["heg"] * 4 + ["hvg"] * 2 + ["seurat"]),
    genes=st.one_of(
        st.none(),
        st.none(),
        st.lists(st.sampled_from(["G0", "G1", "G3", "G9", "TP53"]), max_size=4),
        st.just("missing_panel.txt"),
    ),
    subset=st.booleans(),
    copy_=st.booleans(),
)
def test_select_genes_on_random_counts(
    data: tuple[AnnData, str | None],
    n_top: Any,
    flavor: str,
    genes: list[str] | str | None,
    subset: bool,
    copy_: bool,
) -> None:
    """A panel of at most n_top known genes with their own counts, or a clear error."""
    adata, layer = data
    before = copy.deepcopy(adata)
    names = ["n_top", "flavor", "gene", "var_names", *_matrix_names(layer)]
    call = lambda: rbg.pp.select_genes(  # noqa: E731
        adata, n_top=n_top, flavor=flavor, genes=genes, layer=layer, subset=subset, copy=copy_
    )
    result, err = outcome(call, names)
    if err is not None or copy_:
        assert_unchanged(before, adata)
    if err is not None:
        return
    out = result if copy_ else adata
    assert out.n_obs == before.n_obs
    if subset:
        panel = list(out.var_names)
    else:
        assert out.n_vars == before.n_vars
        panel = list(out.var_names[out.var["rankbygene_panel"].to_numpy()])
    assert set(panel) <= set(before.var_names)
    if genes is None:
        assert len(panel) <= n_top
    else:
        assert set(panel) <= set(genes)
    if subset and before.var_names.is_unique:  # the panel's counts are the original ones
        index = before.var_names.get_indexer(out.var_names)
        matrix = before.X if layer is None else before.layers[layer]
        np.testing.assert_array_equal(
            _dense(out.X if layer is None else out.layers[layer]), _dense(matrix)[:, index]
        )


@examples(100)
@given(
    data=count_adatas(min_obs=1, max_obs=12, min_vars=14, max_vars=40, poisson=True),
    n_top=st.integers(1, 30),
)
def test_select_genes_hvg_on_small_data(data: tuple[AnnData, str | None], n_top: int) -> None:
    """seurat_v3's loess on few spots and genes: a panel or a clear error, never a crash."""
    adata, layer = data
    before = copy.deepcopy(adata)
    call = lambda: rbg.pp.select_genes(  # noqa: E731
        adata, n_top=n_top, flavor="hvg", layer=layer, subset=True, copy=True
    )
    result, err = outcome(call, ["n_top", "var_names", *_matrix_names(layer)])
    assert_unchanged(before, adata)
    if err is None:
        assert 1 <= result.n_vars <= min(n_top, adata.n_vars)
        matrix = adata.X if layer is None else adata.layers[layer]
        reached = _n_varying_genes(matrix) >= MIN_HVG_GENES
        event("hvg", "seurat_v3's loess" if reached else "fell back to heg")


# -------------------------------------------------------------------- smooth_expression


@st.composite
def spot_layouts(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres on a hexagonal or square grid (or anywhere), and each spot's library."""
    kind = draw(st.sampled_from(["hex", "square", "random"]))
    n_rows, n_cols = draw(mostly(st.integers(3, 5), st.integers(1, 2))), draw(st.integers(1, 5))
    step = draw(st.sampled_from([1.0, 10.0, 137.5]))
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    if kind == "hex":
        xy = np.column_stack([(cols + 0.5 * (rows % 2)).ravel(), rows.ravel() * np.sqrt(3) / 2])
    elif kind == "square":
        xy = np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64)
    else:
        n = n_rows * n_cols
        xy = draw(hnp.arrays(np.float64, (n, 2), elements=st.floats(-5, 5)))
    xy = xy * step
    n_libraries = draw(st.integers(1, 2))
    libraries = np.array([f"lib{i % n_libraries}" for i in range(len(xy))])
    edit = draw(st.sampled_from([None] * 6 + ["nan", "duplicate", "jitter"]))
    if edit == "nan":
        xy[draw(st.integers(0, len(xy) - 1)), draw(st.integers(0, 1))] = np.nan
    elif edit == "duplicate" and len(xy) > 1:
        xy[1] = xy[0]
    elif edit == "jitter":
        xy = xy + draw(hnp.arrays(np.float64, xy.shape, elements=st.floats(-0.05, 0.05))) * step
    return xy, libraries


@examples(300)
@given(
    layout=spot_layouts(),
    expression=st.data(),
    n_rings=mostly(st.integers(1, 2), st.sampled_from([0, True, 1.5])),
    n_neighs=mostly(st.none(), st.sampled_from([0, 4, 6, 8, 2.0]), odds=2),
    library_key=st.sampled_from([None] * 3 + ["library_id"] * 3 + ["missing"]),
    spatial_key=st.sampled_from(["spatial"] * 8 + ["xy"]),
    copy_=st.booleans(),
)
def test_smooth_expression_on_random_layouts(
    layout: tuple[np.ndarray, np.ndarray],
    expression: st.DataObject,
    n_rings: Any,
    n_neighs: Any,
    library_key: str | None,
    spatial_key: str,
    copy_: bool,
) -> None:
    """Each smoothed value lies within its library's range of the gene, or a clear error."""
    xy, libraries = layout
    matrix = expression.draw(count_matrices(min_obs=len(xy), max_obs=len(xy), max_vars=3))
    layer = expression.draw(st.sampled_from([None] * 4 + ["counts"] * 4 + ["missing"]))
    adata = AnnData(
        X=matrix if layer is None else None,
        obs=pd.DataFrame({"library_id": libraries}, index=[f"s{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(matrix.shape[1])]),
        obsm={"spatial": xy},
    )
    if layer is not None and layer != "missing":
        adata.layers[layer] = matrix
    before = copy.deepcopy(adata)
    names = ["n_rings", "n_neighs", "library_key", spatial_key, *_matrix_names(layer)]
    call = lambda: rbg.pp.smooth_expression(  # noqa: E731
        adata,
        n_rings=n_rings,
        layer=layer,
        library_key=library_key,
        spatial_key=spatial_key,
        n_neighs=n_neighs,
        copy=copy_,
    )
    result, err = outcome(call, names)
    if err is not None or copy_:
        assert_unchanged(before, adata)
    if err is not None:
        return
    out = result if copy_ else adata
    key = smoothed_layer_key(layer)
    smoothed = _dense(out.layers[key]).astype(np.float64)
    assert smoothed.shape == adata.shape
    assert np.isfinite(smoothed).all()
    # an average: each spot's value lies within its library's range of the gene
    values = _dense(matrix).astype(np.float64)
    groups = libraries if library_key else np.zeros(len(xy))
    for group in np.unique(groups):
        mine = groups == group
        low, high = values[mine].min(axis=0), values[mine].max(axis=0)
        tolerance = 1e-5 * np.maximum(1.0, np.abs(values[mine]).max(axis=0))
        assert (smoothed[mine] >= low - tolerance).all()
        assert (smoothed[mine] <= high + tolerance).all()
    del out.layers[key]
    assert_unchanged(before, out)


# ------------------------------------------------------------------------- setup_anndata


@cache
def _setup_base() -> AnnData:
    """One small synthetic slide; examples change copies of it."""
    return rbg.datasets.synthetic(n_slides=1, n_spots=30, n_genes=12, seed=1)


_MUTATIONS = [
    "dtype",
    "bad value",
    "log",
    "constant gene",
    "repeated gene",
    "one gene",
    "one spot",
    "spatial columns",
    "spatial value",
    "spatial scale",
    "spatial swap",
    "scalefactor",
    "image",
    "source image",
    "library_key",
    "layer",
    "features",
    # removals last, so that no other change looks for what they removed
    "no spatial",
    "no uns spatial",
]


def _mutate(
    mutation: str, draw: st.DrawFn, adata: AnnData, kwargs: dict[str, Any], root: Path
) -> tuple[AnnData, list[str]]:
    """Apply ``mutation`` to ``adata`` or the setup arguments; the names it may be told by."""
    entry = next(iter(adata.uns["spatial"].values()))
    counts = adata.layers["counts"]
    if mutation == "dtype":
        dtype = draw(st.sampled_from([np.int32, np.uint8, np.float16, np.float64, np.bool_]))
        adata.layers["counts"] = _dense(counts).astype(dtype)
        return adata, ["counts", "variance"]
    if mutation == "bad value":
        dense = _dense(counts).astype(np.float32)
        i, j = draw(st.integers(0, adata.n_obs - 1)), draw(st.integers(0, adata.n_vars - 1))
        dense[i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf, -1.0]))
        adata.layers["counts"] = sparse.csr_matrix(dense) if draw(st.booleans()) else dense
        return adata, ["counts"]
    if mutation == "log":
        adata.layers["counts"] = np.log1p(_dense(counts))
        return adata, ["counts"]
    if mutation == "constant gene":
        dense = _dense(counts).copy()
        j = draw(st.integers(0, adata.n_vars - 1))
        dense[:, j] = draw(st.sampled_from([0, 3]))
        adata.layers["counts"] = dense
        return adata, [adata.var_names[j]]
    if mutation == "repeated gene":
        names = list(adata.var_names)
        names[-1] = names[0]
        adata.var_names = names
        return adata, ["var_names"]
    if mutation == "one gene":
        return adata[:, :1].copy(), ["genes"]
    if mutation == "one spot":
        return adata[:1].copy(), ["spots"]
    if mutation == "no spatial":
        del adata.obsm["spatial"]
        return adata, ["spatial"]
    if mutation == "spatial columns":
        xy = adata.obsm["spatial"]
        adata.obsm["spatial"] = xy[:, :1] if draw(st.booleans()) else np.hstack([xy, xy[:, :1]])
        return adata, ["spatial"]
    if mutation == "spatial value":
        xy = adata.obsm["spatial"].astype(np.float64)
        xy[draw(st.integers(0, adata.n_obs - 1)), draw(st.integers(0, xy.shape[1] - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -1e9, 1e12])
        )
        adata.obsm["spatial"] = xy
        return adata, ["spatial"]
    if mutation == "spatial scale":
        factor = draw(st.sampled_from([0.01, 0.1, 0.5, 2.0, 10.0, 100.0]))
        adata.obsm["spatial"] = adata.obsm["spatial"] * factor
        return adata, ["spatial"]
    if mutation == "spatial swap":
        adata.obsm["spatial"] = adata.obsm["spatial"][:, ::-1].copy()
        return adata, ["spatial"]
    if mutation == "no uns spatial":
        del adata.uns["spatial"]
        return adata, ["spatial"]
    if mutation == "scalefactor":
        key = draw(st.sampled_from(["spot_diameter_fullres", "tissue_hires_scalef"]))
        value = draw(st.sampled_from([0, -1.0, np.nan, np.inf, "x", None, 1e-6, 1e6, "drop"]))
        scalefactors = entry["scalefactors"]
        if value == "drop":
            for name in [n for n in scalefactors if n.startswith("tissue_")] + [key]:
                scalefactors.pop(name, None)
        else:
            scalefactors[key] = value
        return adata, ["scalefactors", "spatial"]
    if mutation == "image":
        images = entry["images"]
        key = draw(st.sampled_from(["hires", "lowres"]))
        images[key] = draw(image_arrays())
        return adata, ["image", key, "spatial"]
    if mutation == "source image":
        path = root / "source.png"
        state = draw(st.sampled_from(["missing", "empty", "truncated", "grey", "tiny"]))
        # the slide's own image: the "image" change may have replaced the one in uns
        (original,) = _setup_base().uns["spatial"].values()
        image = original["images"]["hires"]
        if state == "grey":
            Image.fromarray(image[..., 0]).save(path)
        elif state == "tiny":
            Image.fromarray(image[:8, :8]).save(path)
        elif state != "missing":
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG")
            data = buffer.getvalue()
            path.write_bytes(b"" if state == "empty" else data[: len(data) // 2])
        entry.setdefault("metadata", {})["source_image_path"] = str(path)
        return adata, [path.name, "spatial"]
    if mutation == "library_key":
        kwargs["library_key"] = draw(st.sampled_from(["nowhere", "region", "in_tissue"]))
        # a column of other values: the error names the library missing from uns['spatial']
        return adata, [kwargs["library_key"], "uns['spatial']"]
    if mutation == "layer":
        kwargs["layer"] = draw(st.sampled_from(["nowhere", None]))
        return adata, ["nowhere", "adata.X"]
    # features
    shape = draw(st.sampled_from([(adata.n_obs, 4), (adata.n_obs,), (adata.n_obs, 2, 3)]))
    features = draw(hnp.arrays(np.float32, shape, elements=st.floats(-3, 3, width=32)))
    if draw(st.booleans()):
        features.flat[0] = np.nan
    adata.obsm["features"] = features
    kwargs["features_key"] = draw(st.sampled_from(["features", "features", "nowhere"]))
    return adata, [kwargs["features_key"]]


@examples(300)
@given(data=st.data(), mutations=st.lists(st.sampled_from(_MUTATIONS), max_size=2, unique=True))
def test_setup_anndata_on_damaged_layouts(data: st.DataObject, mutations: list[str]) -> None:
    """Up to two changes to a valid AnnData or to the arguments: setup works or says which."""
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        adata = _setup_base().copy()
        kwargs: dict[str, Any] = {"layer": "counts"}
        names: list[str] = []
        for mutation in sorted(mutations, key=_MUTATIONS.index):
            adata, told_by = _mutate(mutation, data.draw, adata, kwargs, root)
            names += told_by
        before = copy.deepcopy(adata)
        _, err = outcome(lambda: rbg.RankByGene.setup_anndata(adata, **kwargs), names)
        if err is not None:
            assert_unchanged(before, adata)
        else:  # setup only registers: the data is as it was
            assert_same_matrix(before.layers["counts"], adata.layers["counts"], "counts")
            pd.testing.assert_frame_equal(adata.obs, before.obs)


# no shrinking: while the case fails, the first example says enough
@settings(BASE_SETTINGS, max_examples=10, phases=[Phase.explicit, Phase.generate])
@given(scaled=st.sampled_from(["coordinates", "scale factor"]), factor=st.floats(3, 1000))
def test_setup_rejects_spots_outside_their_image(scaled: str, factor: float) -> None:
    """Spots all outside their image (in other units) are refused, naming obsm['spatial']."""
    adata = _setup_base().copy()
    (entry,) = adata.uns["spatial"].values()
    if scaled == "coordinates":
        adata.obsm["spatial"] = adata.obsm["spatial"] * factor
    else:
        entry["scalefactors"]["tissue_hires_scalef"] *= factor
    with pytest.raises(ValueError, match="spatial"):
        rbg.RankByGene.setup_anndata(adata, layer="counts")


@cache
def _slide(kind: str, seed: int) -> AnnData:
    """A valid synthetic slide: Visium-like spots, or Visium HD bins of 16 um."""
    if kind == "visium":
        return rbg.datasets.synthetic(n_slides=1, n_spots=100, n_genes=20, seed=seed)
    sdata = rbg.datasets.synthetic_visium_hd(size_um=400, bin_sizes_um=(16,), n_genes=20, seed=seed)
    return rbg.io.from_spatialdata(sdata, table_key="square_016um")


_LAYOUT_FIXES = {
    "x0.5": "multiply them by 2",
    "x2": "divide them by 2",
    "swap": "swap the columns",
}


@settings(examples(8), phases=[Phase.explicit, Phase.generate])
@given(
    kind=st.sampled_from(["visium", "visium_hd"]),
    seed=st.integers(0, 20),
    how=st.sampled_from(sorted(_LAYOUT_FIXES)),
)
def test_setup_refuses_spots_on_a_scaled_or_swapped_copy_of_the_tissue(
    kind: str, seed: int, how: str
) -> None:
    """Valid slides pass; their spots x0.5, x2 or swapped are refused, naming the fix."""
    adata = _slide(kind, seed).copy()
    layer = "counts" if "counts" in adata.layers else None
    rbg.RankByGene.setup_anndata(adata.copy(), layer=layer, library_key="library_id")
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    adata.obsm["spatial"] = {"x0.5": xy / 2, "x2": xy * 2, "swap": xy[:, ::-1].copy()}[how]
    with pytest.raises(ValueError, match=re.escape(_LAYOUT_FIXES[how])):
        rbg.RankByGene.setup_anndata(adata, layer=layer, library_key="library_id")


def test_setup_anndata_needs_an_anndata() -> None:
    """Anything but an AnnData is a TypeError."""
    with pytest.raises(TypeError, match="AnnData"):
        rbg.RankByGene.setup_anndata(np.zeros((3, 3)))


# ------------------------------------------- regressions: what the properties above found


def test_empty_array_image_is_rejected() -> None:
    # thumbnails divided by zero
    with pytest.raises(ValueError, match="no pixels"):
        open_image(np.zeros((0, 4, 3), dtype=np.uint8))


@pytest.mark.parametrize("box", [(np.nan, 0, 4, 4), (0, np.inf, 4, 4), (0, 0, np.nan, 4)])
def test_region_must_be_finite(box: tuple[float, float, float, float]) -> None:
    # int() of NaN raised a ValueError naming nothing, of inf an OverflowError
    reader = open_image(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="Region must be finite"):
        reader.read_region(*box)


@pytest.mark.parametrize("tile", [None, (16, 16)])
@pytest.mark.parametrize("shape", [(20, 20), (6, 9, 3)])
def test_zero_filled_tiff_is_named(
    tmp_path: Path, tile: tuple[int, int] | None, shape: tuple[int, ...]
) -> None:
    # Cut short and padded with zeros, a TIFF gave tifffile's ZeroDivisionError, KeyError,
    # IndexError, TypeError or RuntimeError, or opened with an empty level.
    buffer = io.BytesIO()
    photometric = "rgb" if len(shape) == 3 else "minisblack"
    tifffile.imwrite(buffer, np.ones(shape, dtype=np.uint8), tile=tile, photometric=photometric)
    data = buffer.getvalue()
    path = tmp_path / "padded.tif"
    # every cut in the header and tag values, then every 16th byte of the pixel data
    for position in [*range(min(len(data), 512)), *range(512, len(data), 16)]:
        path.write_bytes(data[:position] + bytes(len(data) - position))
        outcome(lambda: _read_whole(path), [path.name])


def test_spot_diameter_of_overflowing_centres_is_refused() -> None:
    # the squared distance to a spot at 1e300 px overflowed: read_st stored a diameter of inf
    with pytest.raises(ValueError, match="pass spot_diameter"):
        rbg.io.infer_spot_diameter(np.array([[1e300, 15.0], [15.0, 25.0]]))


def test_png_with_damaged_header_is_named(tmp_path: Path) -> None:
    # PIL's ValueError("Truncated IHDR chunk") came through without the file's name
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[11] = 0  # the length of the IHDR chunk
    path = tmp_path / "header.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"header\.png: it looks truncated or corrupt"):
        open_image(path)


def test_tiff_with_huge_tiles_is_named(tmp_path: Path) -> None:
    # One flipped byte of TileLength (16 -> 402,653,200) made a tile of gigabytes: MemoryError
    path = tmp_path / "tiles.tif"
    tifffile.imwrite(path, np.ones((13, 7, 3), np.uint8), tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags["TileLength"].valueoffset
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = (402_653_200).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tiles\.tif: it looks truncated or corrupt \(tiles of"):
        open_image(path)


def test_normalize_rejects_infinite_target_sum() -> None:
    # scanpy took inf as "do not scale"
    adata = AnnData(np.array([[1.0, 2.0], [3.0, 0.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="target_sum"):
        rbg.pp.normalize(adata, target_sum=float("inf"))
    assert "lognorm" not in adata.layers


def test_normalize_without_counts_is_refused() -> None:
    # target_sum=None on all-zero counts wrote a layer of NaN
    adata = AnnData(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"adata\.X has no counts"):
        rbg.pp.normalize(adata, target_sum=None)
    assert "lognorm" not in adata.layers


def test_normalize_median_total_same_for_sparse_counts() -> None:
    # On CSR counts scanpy's median total counted the empty spots: another scale than dense
    # counts, and all zeros once more than half the spots were empty.
    counts = np.array([[0, 0], [0, 0], [0, 0], [1, 0], [2, 3]], dtype=np.float32)
    dense, csr = AnnData(counts.copy()), AnnData(sparse.csr_matrix(counts))
    rbg.pp.normalize(dense, target_sum=None)
    rbg.pp.normalize(csr, target_sum=None)
    np.testing.assert_allclose(csr.layers["lognorm"].toarray(), dense.layers["lognorm"])
    totals = np.expm1(dense.layers["lognorm"]).sum(axis=1)
    np.testing.assert_allclose(totals, [0, 0, 0, 3, 3], rtol=1e-5)  # the median of 1 and 5


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_empty_counts_are_named(shape: tuple[int, int]) -> None:
    # scikit-learn's "Found array with 0 sample(s)" from scanpy, scipy's ZeroDivisionError
    for call in (rbg.pp.normalize, rbg.pp.select_genes):
        adata = AnnData(np.zeros(shape, dtype=np.float32))
        with pytest.raises(ValueError, match=r"adata\.X is empty"):
            call(adata)


@pytest.mark.parametrize("scale", [1e4, 1e6])
def test_setup_decodes_no_huge_patch(scale: float) -> None:
    # tissue_hires_scalef far too large made the decode check of setup_anndata allocate a
    # patch of terabytes (a MemoryError, or the process killed)
    adata = _setup_base().copy()
    (entry,) = adata.uns["spatial"].values()
    entry["scalefactors"]["tissue_hires_scalef"] = scale
    outcome(lambda: rbg.RankByGene.setup_anndata(adata, layer="counts"), ["spatial"])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_hvg_on_narrow_integer_counts(dtype: type) -> None:
    # scanpy squared uint16 (and large int32) counts in their own dtype: negative variances,
    # on which scikit-misc's loess killed the interpreter with a segfault
    counts = np.random.default_rng(0).poisson(50_000 if dtype == np.int32 else 500, (5, 21))
    adata = AnnData(counts.astype(dtype))
    rbg.pp.select_genes(adata, n_top=5, flavor="hvg", subset=True)
    assert adata.n_vars == 5


def test_hvg_with_repeated_gene_names_keeps_n_top() -> None:
    # the panel was matched back by name: a selected gene's namesake came along (3 of n_top=2)
    counts = np.random.default_rng(0).poisson(5, (20, 30)).astype(np.float32)
    names = [f"G{j}" for j in range(30)]
    panels = []
    for _ in range(2):
        adata = AnnData(counts.copy(), var=pd.DataFrame(index=names))
        rbg.pp.select_genes(adata, n_top=2, flavor="hvg", subset=False)
        panels.append(np.flatnonzero(adata.var["rankbygene_panel"]))
        # then a gene outside the panel is named like one in it
        outside = next(j for j in range(30) if j not in panels[0])
        names = list(names)
        names[outside] = names[panels[0][0]]
    assert len(panels[0]) == 2
    np.testing.assert_array_equal(panels[1], panels[0])


# ------------------------------------------------- missing pixels, bins, element names, saves
_RECT = st.tuples(st.integers(0, 31), st.integers(0, 23), st.integers(1, 6), st.integers(1, 6))


@settings(examples(25))
@given(
    rectangles=st.lists(_RECT, max_size=3),
    centres=hnp.arrays(np.float64, (5, 2), elements=st.floats(3, 21)),
    out_of_bounds=st.sampled_from(["raise", "pad", "drop"]),
)
def test_nan_pixels_are_counted_spot_by_spot(
    rectangles: list[tuple[int, int, int, int]], centres: np.ndarray, out_of_bounds: str
) -> None:
    """Exactly the spots whose patch holds a NaN pixel are counted, refused, padded or dropped."""
    nan = np.zeros((24, 32), dtype=bool)
    for x, y, w, h in rectangles:
        nan[y : y + h, x : x + w] = True
    image = np.full((24, 32, 3), 0.5, dtype=np.float32)
    image[nan] = np.nan
    adata = AnnData(np.zeros((5, 1)), obsm={"spatial": centres})
    adata.uns["spatial"] = {
        "lib": {
            "images": {"hires": image},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 6.0},
        }
    }
    corners = np.floor(centres - 3).astype(int)  # centres keep every 6 x 6 patch inside
    holds = np.array([nan[y : y + 6, x : x + 6].any() for x, y in corners])
    counted = f"{int(holds.sum())} spots whose patch holds NaN or infinite pixels"
    build = lambda: rbg.data.PatchExtractor(adata, patch_size=6, out_of_bounds=out_of_bounds)  # noqa: E731
    if not holds.any():
        assert build().valid.all()
    elif out_of_bounds == "raise":
        with pytest.raises(ValueError, match=counted):
            build()
    elif out_of_bounds == "drop" and holds.all():
        with pytest.raises(ValueError, match="All 5 spots would be dropped"):
            build()
    elif out_of_bounds == "drop":
        np.testing.assert_array_equal(build().valid, ~holds)
    else:
        with pytest.warns(UserWarning, match=counted):
            patches = build()
        for i in range(5):  # NaN pixels are white, the others grey
            assert (
                (patches[i] == 255).all(axis=-1)
                == nan[corners[i, 1] : corners[i, 1] + 6, corners[i, 0] : corners[i, 0] + 6]
            ).all()


@cache
def _bins() -> AnnData:
    sdata = rbg.datasets.synthetic_visium_hd(size_um=160, bin_sizes_um=(8,), n_genes=5)
    return rbg.io.from_spatialdata(sdata, table_key="square_008um")


@settings(examples(15))
@given(bin_size_um=st.one_of(st.just(8.0), st.floats(0.5, 100)), recorded=st.booleans())
def test_aggregate_bins_takes_only_the_bins_own_size(bin_size_um: float, recorded: bool) -> None:
    """A bin size other than the bins' own (8 um) is refused, whether it is recorded or not."""
    bins = _bins().copy()
    if not recorded:
        (entry,) = bins.uns["spatial"].values()
        del entry["scalefactors"]["bin_size_um"]
    call = lambda: rbg.pp.aggregate_bins(bins, size_um=8 * 4, bin_size_um=bin_size_um)  # noqa: E731
    if abs(bin_size_um / 8 - 1) <= 0.1 and (not recorded or bin_size_um == 8):
        outcome(call, ["size_um"])  # fits, or 32 um is no whole multiple of it
    else:
        with pytest.raises(ValueError, match=f"{bin_size_um:g}"):
            call()


@settings(examples(15))
@given(name=st.text(st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=12))
def test_to_spatialdata_names_a_library_id_it_cannot_use(name: str) -> None:
    """A library id that can name a SpatialData element works; another is refused, named."""
    adata = _setup_base().copy()
    (old,) = adata.uns["spatial"]
    adata.obs["library_id"] = pd.Categorical([name] * adata.n_obs)
    adata.uns["spatial"] = {name: adata.uns["spatial"][old]}
    # spatialdata's rule for element names
    allowed = (
        name not in {".", ".."}
        and not name.startswith("__")
        and all(c.isalnum() or c in "_-." for c in name)
    )
    if allowed:
        sdata = rbg.io.to_spatialdata(adata, library_key="library_id")
        assert list(sdata.shapes) == [name]
    else:
        with pytest.raises(ValueError, match=re.escape(f"library id {name!r} of adata.obs")):
            rbg.io.to_spatialdata(adata, library_key="library_id")


@cache
def _heads_model() -> Any:
    """A model of heads on precomputed features: quick to save."""
    adata = _setup_base().copy()
    adata.obsm["X_f"] = np.random.default_rng(0).normal(size=(adata.n_obs, 8)).astype("float32")
    rbg.RankByGene.setup_anndata(adata, layer="counts", features_key="X_f")
    return rbg.RankByGene(adata, n_latent=4)


_OWN_FILES = {"model.pt", "adata.h5ad", "checksums.json"}
_FILE_NAME = st.text(
    st.characters(blacklist_characters="/\x00", blacklist_categories=["Cs"]),
    min_size=1,
    max_size=12,
).filter(lambda name: name not in {".", ".."} | _OWN_FILES and len(name.encode()) < 200)


@settings(examples(15))
@given(
    names=st.lists(_FILE_NAME, max_size=4, unique_by=str.lower),
    in_folder=st.booleans(),
    save_anndata=st.booleans(),
)
def test_overwriting_a_save_keeps_every_other_file(
    names: list[str], in_folder: bool, save_anndata: bool
) -> None:
    """Files beside a saved model, of any name, survive a save with overwrite=True."""
    model = _heads_model()
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "res"
        model.save(folder)
        kept = {}
        for k, name in enumerate(names):
            path = (folder / "figures" / name) if in_folder else (folder / name)
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(f"user file {k}".encode())
            kept[path] = path.read_bytes()
        model.save(folder, overwrite=True, save_anndata=save_anndata)
        for path, data in kept.items():
            assert path.read_bytes() == data, path
        own = {p.name for p in folder.iterdir() if p.is_file() and p not in kept}
        assert own == {"model.pt", "checksums.json"} | ({"adata.h5ad"} if save_anndata else set())
        rbg.RankByGene.load(folder)
