"""Legacy Spatial Transcriptomics (ST, 1,007 spots per array) into the scanpy/squidpy layout."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from anndata.utils import make_index_unique
from scipy import sparse
from scipy.spatial import cKDTree

from rankbygene._image import open_image, reading_file

# the entry builder only: rankbygene._layout's readers of images import rankbygene.io
from rankbygene._layout import read_thumbnails, spatial_entry
from rankbygene._layout._keys import (
    ARRAY_COL_KEY,
    ARRAY_ROW_KEY,
    COUNTS_LAYER_KEY,
    IN_TISSUE_KEY,
    LIBRARY_ID_KEY,
    METADATA_COUNTS_PATH,
    METADATA_MPP,
    METADATA_SOURCE_IMAGE,
    METADATA_SPOTS_PATH,
    METADATA_TECHNOLOGY,
    SPATIAL_KEY,
)
from rankbygene._logging import logger

__all__ = ["read_st"]

#: Spot geometry of legacy ST arrays: 100 um spots, 200 um centre to centre.
ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0

_SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def read_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path,
    library_id: str | None = None,
    spot_diameter: float | None = None,
    hires_max_side: int = 2000,
    lowres_max_side: int = 600,
) -> AnnData:
    """Read a legacy Spatial Transcriptomics section (counts, spot selection, H&E image).

    This is the format of the HER2+ breast cancer data set (Andersson et al. 2021) and of most
    ST-v1 publications: a count table with one row per spot named by its array position
    ``"{x}x{y}"``, a spot-selection table mapping array positions to image pixels, and the
    full-resolution H&E image.

    Spots are joined on ``f"{x}x{y}"``. Only spots marked ``selected`` (under tissue) in the
    spot file are kept (all of them when the file has no ``selected`` column). Count-table
    spots with no row in the spot file are dropped with a warning; selected spots with no
    counts (the published tables omit a few) are dropped and logged.

    Parameters
    ----------
    counts
        Spots x genes table of raw counts, tab-separated (``.tsv`` or ``.tsv.gz``), spot names
        ``"{x}x{y}"`` in the first column and gene names in the header.
    spots
        Spot-selection table, tab-separated, with columns ``x y pixel_x pixel_y`` and
        optionally ``selected`` (and ``new_x new_y``, not used). ``pixel_x, pixel_y`` are the
        spot centre in full-resolution image pixels.
    image
        The H&E image at full resolution (JPEG, PNG or TIFF). It is referenced by path in
        ``uns["spatial"][library_id]["metadata"]["source_image_path"]`` and never decoded
        whole here: only the thumbnails are (JPEG thumbnails through the decoder's draft mode).
    library_id
        Key in ``uns["spatial"]`` and value of ``obs["library_id"]``; defaults to the count
        file's name without extensions (``"B4"`` for ``B4.tsv.gz``).
    spot_diameter
        Spot diameter in full-resolution pixels. ``None`` infers it from the spot spacing:
        ST spots are 100 um across with 200 um between centres, so the diameter is half the
        median distance between a spot and its nearest neighbour.
    hires_max_side, lowres_max_side
        Long side in pixels of the ``"hires"`` and ``"lowres"`` thumbnails stored in ``uns``.

    Returns
    -------
    AnnData in the scanpy/squidpy spatial layout:

    - ``X`` and ``layers["counts"]``: raw counts, float32 CSR;
    - ``obs``: ``array_row`` (= ``y``), ``array_col`` (= ``x``), ``in_tissue``,
      ``library_id`` (categorical);
    - ``obsm["spatial"]``: spot centres ``(pixel_x, pixel_y)`` in full-resolution pixels;
    - ``uns["spatial"][library_id]``: ``images`` (``hires``, ``lowres``, uint8),
      ``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``,
      ``spot_diameter_fullres``) and ``metadata`` (``source_image_path``, ``technology``,
      ``mpp`` estimated from the 100 um spot diameter, file paths).

    Raises
    ------
    FileNotFoundError
        One of the three files is missing.
    ValueError
        The image cannot be decoded; the spot file lacks a column; the count table has
        non-numeric, negative or missing values; no spot of the count table is in the spot file.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.io.read_st(  # doctest: +SKIP
    ...     "her2st/ST-cnts/C2.tsv.gz",
    ...     "her2st/ST-spotfiles/C2_selection.tsv",
    ...     "her2st/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    ... )
    >>> import squidpy as sq
    >>> sq.pl.spatial_scatter(adata, color="ERBB2")  # doctest: +SKIP
    """
    counts_path, spots_path, image_path = (
        existing_file(counts, "Count table"),
        existing_file(spots, "Spot file"),
        existing_file(image, "Image file"),
    )
    check_sides(hires_max_side=hires_max_side, lowres_max_side=lowres_max_side)
    if spot_diameter is not None and not (np.isfinite(spot_diameter) and spot_diameter > 0):
        raise ValueError(f"spot_diameter must be a positive number of pixels; got {spot_diameter}.")
    if library_id is None:
        library_id = _stem(counts_path)
    library_id = str(library_id)

    reader = open_image(image_path)  # reads the header only; fails on undecodable files
    spot_table = _read_spot_table(spots_path)
    count_table = _read_count_table(counts_path)
    spot_table, count_table = _join(count_table, spot_table, counts_path, spots_path)
    coords = spot_table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    _check_inside(coords, reader.shape, spots_path, image_path)

    if spot_diameter is None:
        spot_diameter = infer_spot_diameter(coords, pitch_to_diameter=0.5)
        logger.info(f"inferred spot diameter {spot_diameter:.1f} px from the spot spacing")
    try:
        images = read_thumbnails(reader, hires_max_side, lowres_max_side)
    finally:
        reader.close()

    matrix = sparse.csr_matrix(count_table.to_numpy(dtype=np.float32))
    obs = pd.DataFrame(
        {
            ARRAY_ROW_KEY: spot_table["y"].to_numpy(dtype=np.int64),
            ARRAY_COL_KEY: spot_table["x"].to_numpy(dtype=np.int64),
            IN_TISSUE_KEY: np.ones(len(spot_table), dtype=np.int64),
            LIBRARY_ID_KEY: pd.Categorical([library_id] * len(spot_table)),
        },
        index=pd.Index(count_table.index.astype(str), name=None),
    )
    genes = pd.Index(count_table.columns.astype(str), name=None)
    if not genes.is_unique:
        genes = make_index_unique(genes)  # as var_names_make_unique: "G", "G-1", ...
        logger.info("made var_names unique")
    adata = AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))
    adata.layers[COUNTS_LAYER_KEY] = matrix.copy()
    adata.obsm[SPATIAL_KEY] = coords
    metadata = {
        METADATA_SOURCE_IMAGE: str(image_path.resolve()),
        METADATA_TECHNOLOGY: "Spatial Transcriptomics",
        METADATA_COUNTS_PATH: str(counts_path.resolve()),
        METADATA_SPOTS_PATH: str(spots_path.resolve()),
        METADATA_MPP: ST_SPOT_DIAMETER_UM / float(spot_diameter),
    }
    adata.uns[SPATIAL_KEY] = {library_id: spatial_entry(images, spot_diameter, metadata)}
    logger.info(
        f"read {adata.n_obs} spots x {adata.n_vars} genes: added X, "
        f"layers['{COUNTS_LAYER_KEY}'], obs['{LIBRARY_ID_KEY}'], obsm['{SPATIAL_KEY}'], "
        f"uns['{SPATIAL_KEY}']['{library_id}']"
    )
    return adata


def infer_spot_diameter(coords: np.ndarray, pitch_to_diameter: float = 0.5) -> float:
    """Spot diameter from spot centres: ``pitch_to_diameter`` x the median nearest-neighbour gap.

    Parameters
    ----------
    coords
        ``(n_spots, 2)`` spot centres in pixels.
    pitch_to_diameter
        Spot diameter over centre-to-centre distance (0.5 for ST: 100 um / 200 um;
        0.55 for Visium: 55 um / 100 um).

    Examples
    --------
    >>> import numpy as np
    >>> grid = np.stack(np.meshgrid(np.arange(5), np.arange(5)), -1).reshape(-1, 2) * 290.0
    >>> infer_spot_diameter(grid)
    145.0
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape[0] < 2:
        raise ValueError(
            f"Cannot infer the spot diameter from {coords.shape[0]} spot(s): pass spot_diameter."
        )
    distances, _ = cKDTree(coords).query(coords, k=2)
    nearest = distances[:, 1]
    nearest = nearest[nearest > 0]  # duplicated centres say nothing about spacing
    if nearest.size == 0:
        raise ValueError("All spots share one centre: pass spot_diameter.")
    diameter = float(np.median(nearest) * pitch_to_diameter)
    if not np.isfinite(diameter):  # centres near 1e300: their squared distance overflows
        raise ValueError(
            f"Cannot infer the spot diameter from spots up to {np.abs(coords).max():.3g} px "
            "apart: pass spot_diameter."
        )
    return diameter


def existing_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".bz2", ".xz", ".zip", ".tsv", ".txt", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def check_sides(**sides: Any) -> None:
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")


def _read_spot_table(path: Path) -> pd.DataFrame:
    try:
        with reading_file(path, "spot file"):
            table = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"Could not parse spot file {path}: {err}") from err
    missing = [c for c in _SPOT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"Spot file {path} lacks column(s) {missing}; it needs {list(_SPOT_COLUMNS)} "
            f"(and optionally 'selected'). Columns found: {list(table.columns)}."
        )
    for column in _SPOT_COLUMNS:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = int((~np.isfinite(values.to_numpy(dtype=np.float64))).sum())
        if bad:
            raise ValueError(
                f"Spot file {path}: column {column!r} has {bad} non-numeric or missing values."
            )
        table[column] = values
    for column in ("x", "y"):
        values = table[column].to_numpy(dtype=np.float64)
        if not np.allclose(values, np.round(values)):
            raise ValueError(f"Spot file {path}: column {column!r} must hold integer positions.")
        table[column] = np.round(values).astype(np.int64)
    if "selected" in table.columns:
        table["selected"] = pd.to_numeric(table["selected"], errors="coerce").fillna(0) != 0
    else:
        table["selected"] = True
    table.index = pd.Index([f"{x}x{y}" for x, y in zip(table["x"], table["y"], strict=True)])
    if not table.index.is_unique:
        dup = table.index[table.index.duplicated()].unique()
        raise ValueError(
            f"Spot file {path} lists {len(dup)} array position(s) twice: {list(dup[:5])}."
        )
    return table


def _read_count_table(path: Path) -> pd.DataFrame:
    with reading_file(path, "count table"):
        table = _parse_counts_fast(path)
        if table is None:  # something unusual: let pandas parse it and say what is wrong
            table = _parse_counts_pandas(path)
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"Count table {path} is empty (shape {table.shape}).")
    if not table.index.is_unique:
        dup = table.index[table.index.duplicated()].unique()
        raise ValueError(f"Count table {path} names {len(dup)} spot(s) twice: {list(dup[:5])}.")
    values = table.to_numpy()
    n_missing = int(np.isnan(values).sum())
    n_negative = int((values < 0).sum())
    n_infinite = int(np.isinf(values).sum())
    n_non_numeric = int(table.attrs.get("n_non_numeric", 0))
    n_missing -= n_non_numeric  # coerced to NaN by the pandas path
    if n_non_numeric or n_missing or n_negative or n_infinite:
        problems = [
            f"{n} {what}"
            for n, what in (
                (n_non_numeric, "non-numeric"),
                (n_missing, "missing (NaN)"),
                (n_negative, "negative"),
                (n_infinite, "infinite"),
            )
            if n
        ]
        raise ValueError(
            f"Count table {path} has {', '.join(problems)} value(s) out of {values.size}: "
            "raw counts must be non-negative numbers."
        )
    return table


def _parse_counts_fast(path: Path) -> pd.DataFrame | None:
    """Parse a well-formed numeric table line by line (2x faster than pandas on 15,000 genes).

    Returns ``None`` when a line does not fit (ragged rows, non-numeric fields). A damaged
    compressed file raises the decoder's error: pandas could not read it either.
    """
    import gzip

    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rt") if is_gzip else open(path) as handle:
            header = handle.readline().rstrip("\r\n").split("\t")
            names, rows = [], []
            for line in handle:
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) == 1 and not fields[0]:
                    continue  # blank line
                names.append(fields[0])
                rows.append(np.array(fields[1:], dtype=np.float64))
    except ValueError:  # non-numeric fields or undecodable text (UnicodeDecodeError)
        return None
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    n_genes = len(rows[0])
    # "gene1 gene2 ..." (R's write.table) or " gene1 gene2 ..." (with a corner cell)
    genes = header if len(header) == n_genes else header[1:]
    if len(genes) != n_genes:
        return None
    return pd.DataFrame(np.vstack(rows), index=pd.Index(names), columns=pd.Index(genes))


def _parse_counts_pandas(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep="\t", index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"Could not parse count table {path}: {err}") from err
    table.index = table.index.astype(str)
    n_non_numeric = 0
    non_numeric_columns = [
        c for c, t in table.dtypes.items() if not pd.api.types.is_numeric_dtype(t)
    ]
    if non_numeric_columns:
        # only the offending columns are coerced: the whole table would be slow
        block = table[non_numeric_columns]
        coerced = block.apply(pd.to_numeric, errors="coerce")
        n_non_numeric = int((coerced.isna() & block.notna()).to_numpy().sum())
        table[non_numeric_columns] = coerced
    table = table.astype(np.float64)
    table.attrs["n_non_numeric"] = n_non_numeric
    return table


def _join(
    counts: pd.DataFrame, spots: pd.DataFrame, counts_path: Path, spots_path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the count-table spots that are selected in the spot file, in the count table's order."""
    selected = spots.index[spots["selected"].to_numpy()]
    in_file = counts.index.isin(spots.index)
    keep = counts.index.isin(selected)
    n_counts, n_selected, n_shared = len(counts.index), len(selected), int(keep.sum())
    if n_shared == 0:
        if in_file.any():
            detail = f"{int(in_file.sum())} of them are in the spot file but none is selected"
        else:
            detail = f"none is in the spot file (e.g. {list(spots.index[:3])})"
        hint = ""
        if len(counts.columns.intersection(spots.index)) > 0:
            hint = " The count table looks transposed (genes x spots): it must be spots x genes."
        raise ValueError(
            f"None of the {n_counts} spots of count table {counts_path} (e.g. "
            f"{list(counts.index[:3])}) matches the {n_selected} selected spots of spot file "
            f"{spots_path}: {detail}. Spots are joined on '{{x}}x{{y}}'.{hint}"
        )
    unknown = counts.index[~in_file]
    if len(unknown):
        warnings.warn(
            f"{n_counts - len(unknown)} of {n_counts} count-table spots are in the spot file, and "
            f"{n_shared} of {n_selected} selected spots have counts: keeping the {n_shared} "
            f"shared spots; {len(unknown)} spot(s) of {counts_path.name} with no row in "
            f"{spots_path.name} are dropped (e.g. {list(unknown[:5])}).",
            UserWarning,
            stacklevel=3,
        )
    n_unselected = int((in_file & ~keep).sum())
    if n_unselected:
        logger.info(f"dropped {n_unselected} spots that are not selected (not under tissue)")
    if n_shared < n_selected:
        logger.info(
            f"{n_shared} of {n_selected} selected spots have counts; the others are dropped"
        )
    counts = counts.loc[keep]
    return spots.loc[counts.index], counts


def _check_inside(
    coords: np.ndarray, shape: tuple[int, int], spots_path: Path, image_path: Path
) -> None:
    height, width = shape
    inside = (
        (coords[:, 0] >= 0) & (coords[:, 0] < width) & (coords[:, 1] >= 0) & (coords[:, 1] < height)
    )
    if not inside.any():
        raise ValueError(
            f"No spot centre of {spots_path} lies inside image {image_path} ({width} x {height} "
            f"px): pixel_x ranges {coords[:, 0].min():.0f}-{coords[:, 0].max():.0f}, pixel_y "
            f"{coords[:, 1].min():.0f}-{coords[:, 1].max():.0f}. Wrong image for this section?"
        )
    if not inside.all():
        warnings.warn(
            f"{int((~inside).sum())} of {len(coords)} spot centres lie outside image "
            f"{image_path.name} ({width} x {height} px).",
            UserWarning,
            stacklevel=3,
        )
