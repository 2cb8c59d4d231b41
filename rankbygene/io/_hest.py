"""HEST-1k samples: ``st/<id>.h5ad``, ``wsis/<id>.tif``, ``patches/<id>.h5``, ``metadata/``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from anndata.utils import make_index_unique
from PIL import Image
from scipy import sparse

from rankbygene._image import PATCH_COORDS_KEY, ImageReader, PatchFile, as_rgb_uint8, open_image

# the entry builder only: rankbygene._layout's readers of images import rankbygene.io
from rankbygene._layout import image_scales, read_thumbnails, spatial_entry, thumbnails
from rankbygene._layout._keys import (
    COUNTS_LAYER_KEY,
    IMAGES_KEY,
    LIBRARY_ID_KEY,
    METADATA_HEST,
    METADATA_MPP,
    METADATA_PATCHES_PATH,
    METADATA_SOURCE_IMAGE,
    METADATA_TECHNOLOGY,
    SCALEFACTOR_SPOT_DIAMETER,
    SCALEFACTORS_KEY,
    SPATIAL_KEY,
)
from rankbygene._logging import logger
from rankbygene.io._st import check_sides, existing_file

__all__ = ["read_hest"]

_FULLRES_COLUMNS = ("pxl_col_in_fullres", "pxl_row_in_fullres")  # x, y in HEST's obs
_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")


def read_hest(
    h5ad: str | Path,
    wsi: str | Path | None = None,
    patches: str | Path | None = None,
    metadata: str | Path | None = None,
    library_id: str | None = None,
    hires_max_side: int = 2000,
    lowres_max_side: int = 600,
) -> AnnData:
    """Read a HEST-1k sample into the scanpy/squidpy spatial layout.

    HEST-1k (Jaume et al. 2024) ships each sample ``<id>`` as ``st/<id>.h5ad`` (expression;
    spot centres in ``obsm["spatial"]`` or ``obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]]``,
    full-resolution pixels), ``wsis/<id>.tif`` (pyramidal TIFF), ``patches/<id>.h5``
    (datasets ``img`` ``(N, 224, 224, 3)``, ``coords``, ``barcode``) and
    ``metadata/<id>.json`` (``pixel_size_um_estimated``, ``spot_diameter`` in um, ...).

    Parameters
    ----------
    h5ad
        The sample's ``st/<id>.h5ad``. ``X`` (or ``layers["counts"]`` when present) must hold
        raw counts.
    wsi
        The whole-slide image ``wsis/<id>.tif``; read lazily, the thumbnails from a coarse
        pyramid level. Without it, the h5ad's own downscaled image (if any) becomes ``hires``.
    patches
        The precomputed patches ``patches/<id>.h5``. Their barcodes are checked against the
        spots, and the path is recorded in ``metadata["patches_path"]`` so the patch pipeline
        can read them when no WSI is given.
    metadata
        The sample's ``metadata/<id>.json``: pixel size and spot diameter (um).
    library_id
        Key in ``uns["spatial"]`` and value of ``obs["library_id"]``; defaults to the
        metadata's ``id``, else the h5ad file name without extension.
    hires_max_side, lowres_max_side
        Long side in pixels of the ``"hires"`` and ``"lowres"`` thumbnails stored in ``uns``.

    Returns
    -------
    AnnData with raw counts (float32 CSR) in ``X`` and ``layers["counts"]``, the h5ad's ``obs``
    plus ``obs["library_id"]``, ``obsm["spatial"]`` (x, y full-resolution pixels), and
    ``uns["spatial"][library_id]`` with ``images`` (``hires``, ``lowres``), ``scalefactors``
    (``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``) and
    ``metadata`` (``source_image_path`` = the WSI, ``patches_path``, ``mpp``, ``hest``: the
    metadata json's scalar entries).

    Raises
    ------
    FileNotFoundError
        A file is missing.
    KeyError
        The h5ad has no spot coordinates, or no spot diameter can be found.
    ValueError
        A file cannot be read; the WSI does not match the metadata's size; counts are negative
        or not finite; no patch barcode matches a spot.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.io.read_hest(  # doctest: +SKIP
    ...     "hest_data/st/TENX95.h5ad",
    ...     wsi="hest_data/wsis/TENX95.tif",
    ...     patches="hest_data/patches/TENX95.h5",
    ...     metadata="hest_data/metadata/TENX95.json",
    ... )
    """
    h5ad_path = existing_file(h5ad, "HEST h5ad file")
    wsi_path = existing_file(wsi, "Whole-slide image") if wsi is not None else None
    patches_path = existing_file(patches, "Patch file") if patches is not None else None
    meta_path = existing_file(metadata, "Metadata file") if metadata is not None else None
    check_sides(hires_max_side=hires_max_side, lowres_max_side=lowres_max_side)

    meta = _read_metadata(meta_path) if meta_path is not None else {}
    reader = open_image(wsi_path) if wsi_path is not None else None
    source = _read_h5ad(h5ad_path)
    coords = _coordinates(source, h5ad_path)
    counts = _counts(source, h5ad_path)
    mpp = _mpp(meta, reader)
    diameter = _spot_diameter(source, meta, mpp, h5ad_path, meta_path)
    if reader is not None and wsi_path is not None:
        _check_wsi(reader, meta, coords, wsi_path, h5ad_path)
    if patches_path is not None:
        _check_patches(patches_path, source.obs_names, h5ad_path)
    if library_id is None:
        library_id = str(meta.get("id") or h5ad_path.name.removesuffix(".h5ad"))
    library_id = str(library_id)

    if reader is not None:
        try:
            images = read_thumbnails(reader, hires_max_side, lowres_max_side)
        finally:
            reader.close()
    else:
        images = _embedded_images(source, lowres_max_side)
    entry_metadata: dict[str, Any] = {}
    if wsi_path is not None:
        entry_metadata[METADATA_SOURCE_IMAGE] = str(wsi_path.resolve())
    if patches_path is not None:
        entry_metadata[METADATA_PATCHES_PATH] = str(patches_path.resolve())
    if mpp is not None:
        entry_metadata[METADATA_MPP] = float(mpp)
    entry_metadata[METADATA_TECHNOLOGY] = str(meta.get("st_technology", "unknown"))
    hest_meta = {k: v for k, v in meta.items() if isinstance(v, str | int | float | bool)}
    if hest_meta:
        entry_metadata[METADATA_HEST] = hest_meta

    obs = source.obs.copy()
    obs[LIBRARY_ID_KEY] = pd.Categorical([library_id] * source.n_obs)
    var = source.var.copy()
    if not var.index.is_unique:
        var.index = make_index_unique(var.index.astype(str))  # as var_names_make_unique
        logger.info("made var_names unique")
    adata = AnnData(X=counts, obs=obs, var=var)
    for key, value in source.obsm.items():
        if key != SPATIAL_KEY:
            adata.obsm[key] = value
    adata.obsm[SPATIAL_KEY] = coords
    adata.layers[COUNTS_LAYER_KEY] = counts.copy()
    uns = {k: v for k, v in source.uns.items() if k != SPATIAL_KEY}
    uns[SPATIAL_KEY] = {library_id: spatial_entry(images, diameter, entry_metadata)}
    adata.uns.update(uns)
    logger.info(
        f"read {adata.n_obs} spots x {adata.n_vars} genes: added X, "
        f"layers['{COUNTS_LAYER_KEY}'], obs['{LIBRARY_ID_KEY}'], obsm['{SPATIAL_KEY}'], "
        f"uns['{SPATIAL_KEY}']['{library_id}']"
    )
    return adata


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Metadata file {path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(
            f"Metadata file {path} must hold a JSON object; got {type(meta).__name__}."
        )
    return meta


def _read_h5ad(path: Path) -> AnnData:
    import anndata

    try:
        return anndata.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise many types for a broken file
        raise ValueError(f"Could not read h5ad file {path}: {err}") from err


def _coordinates(adata: AnnData, path: Path) -> np.ndarray:
    if SPATIAL_KEY in adata.obsm:
        coords = np.asarray(adata.obsm[SPATIAL_KEY])
        where = f"obsm[{SPATIAL_KEY!r}]"
    elif all(c in adata.obs for c in _FULLRES_COLUMNS):
        coords = adata.obs[list(_FULLRES_COLUMNS)].to_numpy()
        where = f"obs{list(_FULLRES_COLUMNS)}"
    else:
        raise KeyError(
            f"{path} has no spot centres: neither obsm[{SPATIAL_KEY!r}] nor obs columns "
            f"{list(_FULLRES_COLUMNS)}."
        )
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] < 2:
        raise ValueError(f"{path}: {where} must be (n_obs, 2); got shape {coords.shape}.")
    try:
        coords = coords[:, :2].astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {where} is not numeric: {err}") from err
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise ValueError(f"{path}: {where} has {int(bad.sum())} spots with NaN/inf centres.")
    return coords


def _counts(adata: AnnData, path: Path) -> sparse.csr_matrix:
    key = f"layers[{COUNTS_LAYER_KEY!r}]" if COUNTS_LAYER_KEY in adata.layers else "X"
    matrix = adata.layers.get(COUNTS_LAYER_KEY, adata.X)
    if matrix is None:
        raise ValueError(f"{path} has no expression matrix (X is empty).")
    matrix = sparse.csr_matrix(matrix, dtype=np.float32)
    values = matrix.data
    n_bad = int((~np.isfinite(values)).sum())
    n_negative = int((values < 0).sum())
    if n_bad or n_negative:
        raise ValueError(
            f"{path}: {key} has {n_bad} NaN/inf and {n_negative} negative values; raw counts "
            "are needed."
        )
    if values.size and not np.allclose(values[:10000], np.round(values[:10000])):
        warnings.warn(
            f"{path}: {key} holds non-integer values; rankbygene expects raw counts there.",
            UserWarning,
            stacklevel=3,
        )
    return matrix


def _mpp(meta: dict[str, Any], reader: ImageReader | None) -> float | None:
    for key in _MPP_KEYS:
        value = meta.get(key)
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return reader.mpp if reader is not None else None


def _spot_diameter(
    adata: AnnData, meta: dict[str, Any], mpp: float | None, path: Path, meta_path: Path | None
) -> float:
    for entry in (adata.uns.get(SPATIAL_KEY) or {}).values():
        value = ((entry or {}).get(SCALEFACTORS_KEY) or {}).get(SCALEFACTOR_SPOT_DIAMETER)
        if value is not None and np.isfinite(value) and float(value) > 0:
            return float(value)
    microns = meta.get("spot_diameter")
    if isinstance(microns, int | float) and microns > 0 and mpp:
        return float(microns) / mpp
    raise KeyError(
        f"No spot diameter for {path}: its uns[{SPATIAL_KEY!r}][...][{SCALEFACTORS_KEY!r}] has no "
        f"{SCALEFACTOR_SPOT_DIAMETER!r}, and "
        + (
            f"metadata {meta_path} lacks 'spot_diameter' (um) or a pixel size."
            if meta_path is not None
            else "no metadata json was given (pass metadata=)."
        )
    )


def _check_wsi(
    reader: ImageReader, meta: dict[str, Any], coords: np.ndarray, wsi: Path, h5ad: Path
) -> None:
    height, width = reader.shape
    meta_height, meta_width = meta.get("fullres_px_height"), meta.get("fullres_px_width")
    if (
        isinstance(meta_height, int | float)
        and isinstance(meta_width, int | float)
        and (int(meta_height) != height or int(meta_width) != width)
    ):
        raise ValueError(
            f"Whole-slide image {wsi} is {width} x {height} px but the metadata says "
            f"{int(meta_width)} x {int(meta_height)}: wrong image for this sample?"
        )
    inside = (
        (coords[:, 0] >= 0) & (coords[:, 0] < width) & (coords[:, 1] >= 0) & (coords[:, 1] < height)
    )
    if not inside.any():
        raise ValueError(
            f"No spot centre of {h5ad} lies inside whole-slide image {wsi} ({width} x {height} px)."
        )
    if not inside.all():
        warnings.warn(
            f"{int((~inside).sum())} of {len(coords)} spot centres lie outside {wsi.name}.",
            UserWarning,
            stacklevel=3,
        )


def _check_patches(path: Path, obs_names: pd.Index, h5ad: Path) -> None:
    try:
        patches = PatchFile(path)
    except OSError as err:
        raise ValueError(f"Could not read patch file {path}: {err}") from err
    with patches:
        if patches.image_key is None or patches.barcode_key is None or patches.n_coords is None:
            raise ValueError(
                f"Patch file {path} must hold datasets 'img', {PATCH_COORDS_KEY!r} and "
                f"'barcode'; found {patches.datasets}."
            )
        shape = patches.image_shape
        if len(shape) != 4 or shape[-1] not in (3, 4):
            raise ValueError(
                f"Patch file {path}: {patches.image_key!r} must be (N, H, W, 3); got {shape}."
            )
        barcodes = pd.Index(patches.barcodes())
        n_images, n_coords = shape[0], patches.n_coords
    if not n_images == n_coords == len(barcodes):
        raise ValueError(
            f"Patch file {path}: {n_images} images, {n_coords} coords and {len(barcodes)} "
            "barcodes; they must be as many."
        )
    shared = barcodes.intersection(obs_names)
    if len(shared) == 0:
        raise ValueError(
            f"None of the {len(barcodes)} patch barcodes of {path} (e.g. {list(barcodes[:3])}) "
            f"is a spot of {h5ad} (e.g. {list(obs_names[:3])})."
        )
    if len(shared) < len(barcodes) or len(shared) < len(obs_names):
        warnings.warn(
            f"{len(shared)} of {len(barcodes)} patches of {path.name} match a spot, and "
            f"{len(shared)} of {len(obs_names)} spots have a patch.",
            UserWarning,
            stacklevel=3,
        )


def _embedded_images(adata: AnnData, lowres_max_side: int) -> dict[str, tuple[np.ndarray, float]]:
    """The h5ad's own sharpest downscaled image as ``hires``, and a ``lowres`` made from it."""
    best: tuple[np.ndarray, float] | None = None
    for entry in (adata.uns.get(SPATIAL_KEY) or {}).values():
        for key, scale in image_scales(entry or {}).items():
            if best is None or scale > best[1]:
                best = (as_rgb_uint8(np.asarray(entry[IMAGES_KEY][key])), scale)
    if best is None:
        return {}
    hires, hires_scale = best
    return thumbnails(hires, hires_scale, lowres_max_side, resample=Image.Resampling.BILINEAR)
