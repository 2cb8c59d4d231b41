"""Space Ranger output folders, written here in their exact layout, read the two supported ways.

Visium: ``squidpy.read.visium`` and ``spatialdata_io.visium`` + ``rbg.io.from_spatialdata`` must
give the same spots and the same patches. Visium HD (positions in parquet, which squidpy does not
read): ``spatialdata_io.visium_hd`` + ``from_spatialdata`` must give the bins and pixels the
folder holds, one library id at every bin size.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy import sparse

import rankbygene as rbg
from rankbygene._logging import quiet_third_party_imports
from rankbygene.data import PatchExtractor

sdio = pytest.importorskip(
    "spatialdata_io", reason="spatialdata-io not installed: pip install 'rankbygene[spatialdata]'"
)

SAMPLE = "sample1"
HIRES_SCALE, LOWRES_SCALE = 0.5, 0.15


def write_10x_h5(path: Path, counts: sparse.csr_matrix, barcodes, genes, library_id: str) -> None:
    """A ``filtered_feature_bc_matrix.h5`` as Space Ranger writes it (10x HDF5, version 3)."""
    matrix = sparse.csr_matrix(counts, dtype=np.int32)  # spots x genes = CSC of genes x spots
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([library_id.encode()])
        f.attrs["chemistry_description"] = b"Visium Spatial Gene Expression"
        f.attrs["software_version"] = b"spaceranger-3.1.2"
        f.attrs["filetype"] = b"matrix"
        f.attrs["version"] = 2
        group = f.create_group("matrix")
        group["barcodes"] = np.array([b.encode() for b in barcodes])
        group["data"] = matrix.data
        group["indices"] = matrix.indices.astype(np.int64)
        group["indptr"] = matrix.indptr.astype(np.int64)
        group["shape"] = np.array([matrix.shape[1], matrix.shape[0]], dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.array([f"ENSG{i:011d}".encode() for i in range(len(genes))])
        features["name"] = np.array([g.encode() for g in genes])
        features["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        features["genome"] = np.array([b"GRCh38"] * len(genes))
        features["_all_tag_keys"] = np.array([b"genome"])


def write_images(spatial: Path, image: np.ndarray) -> None:
    """``tissue_hires_image.png`` and ``tissue_lowres_image.png``, the image downscaled."""
    height, width = image.shape[:2]
    for name, scale in (("hires", HIRES_SCALE), ("lowres", LOWRES_SCALE)):
        size = (round(width * scale), round(height * scale))
        Image.fromarray(image).resize(size, Image.Resampling.LANCZOS).save(
            spatial / f"tissue_{name}_image.png"
        )


def scalefactors(spot_diameter: float, **extra: float) -> dict:
    return {
        "spot_diameter_fullres": spot_diameter,
        "tissue_hires_scalef": HIRES_SCALE,
        "tissue_lowres_scalef": LOWRES_SCALE,
        "fiducial_diameter_fullres": spot_diameter * 1.6,
        "regist_target_img_scalef": HIRES_SCALE,
        **extra,
    }


@pytest.fixture(scope="module")
def visium(tmp_path_factory):
    """A Visium run: ``outs/`` of Space Ranger and the full-resolution H&E beside it."""
    section = rbg.datasets.synthetic(n_slides=1, n_spots=80, n_genes=15, seed=4)
    root = tmp_path_factory.mktemp("visium")
    outs, spatial = root / "outs", root / "outs" / "spatial"
    spatial.mkdir(parents=True)
    image = np.ascontiguousarray(section.uns["spatial"]["slide_0"]["images"]["hires"])
    tifffile.imwrite(root / "image.tif", image, photometric="rgb")  # the microscope's image
    write_images(spatial, image)
    diameter = float(section.uns["spatial"]["slide_0"]["scalefactors"]["spot_diameter_fullres"])
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors(diameter)))
    barcodes = [f"{''.join('ACGT'[(i >> (2 * k)) % 4] for k in range(16))}-1" for i in range(80)]
    xy = np.rint(section.obsm["spatial"]).astype(int)
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": section.obs["array_row"].to_numpy(),
            "array_col": section.obs["array_col"].to_numpy(),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_csv(spatial / "tissue_positions.csv", index=False)
    genes = list(section.var_names)
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", section.X, barcodes, genes, SAMPLE)
    return root, xy, diameter, barcodes


def _patches(adata, library_key="library_id"):
    extractor = PatchExtractor(adata, library_key=library_key, patch_size=32, patch_scale=1.5)
    return np.stack([extractor[i] for i in range(adata.n_obs)])


def test_visium_folder_through_squidpy_and_spatialdata_io_gives_the_same_spots(visium):
    with quiet_third_party_imports():  # docrep's warnings about squidpy's docstrings
        import squidpy as sq

    root, xy, diameter, barcodes = visium
    by_squidpy = sq.read.visium(root / "outs", source_image_path=root / "image.tif")
    by_squidpy.obs["library_id"] = pd.Categorical([SAMPLE] * by_squidpy.n_obs)
    sdata = sdio.visium(root / "outs", dataset_id=SAMPLE, fullres_image_file=root / "image.tif")
    by_sdio = rbg.io.from_spatialdata(sdata, table_key="table")
    # the same spots, named and placed alike, in full-resolution pixels
    assert list(by_squidpy.obs_names) == list(by_sdio.obs_names) == barcodes
    assert list(by_sdio.uns["spatial"]) == list(by_squidpy.uns["spatial"]) == [SAMPLE]
    np.testing.assert_allclose(by_squidpy.obsm["spatial"], xy)
    np.testing.assert_allclose(by_sdio.obsm["spatial"], xy, atol=1e-6)
    found = [a.uns["spatial"][SAMPLE]["scalefactors"] for a in (by_squidpy, by_sdio)]
    assert found[0]["spot_diameter_fullres"] == pytest.approx(diameter)
    assert found[1]["spot_diameter_fullres"] == pytest.approx(diameter)
    assert (by_squidpy.X != by_sdio.X).nnz == 0
    # the same patches: both read the full-resolution image (a file, a lazy array)
    np.testing.assert_array_equal(_patches(by_squidpy), _patches(by_sdio))
    # and the model's setup takes either as it comes
    for adata in (by_squidpy, by_sdio):
        rbg.RankByGene.setup_anndata(adata)


@pytest.fixture(scope="module")
def visium_hd(tmp_path_factory):
    """A Visium HD run with bins of 8 and 16 um, as Space Ranger 3 lays out ``outs/``."""
    root = tmp_path_factory.mktemp("visium_hd")
    outs = root / "outs"
    mpp = 0.5
    truth = {}
    for size in (8, 16):
        bins = rbg.datasets.synthetic_visium_hd(
            size_um=320, bin_sizes_um=size, microns_per_pixel=mpp, n_genes=12, seed=2,
            as_anndata=True,
        )  # fmt: skip
        folder = outs / "binned_outputs" / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True)
        barcodes = [
            f"s_{size:03d}um_{r:05d}_{c:05d}-1"
            for r, c in zip(bins.obs["array_row"], bins.obs["array_col"], strict=True)
        ]
        xy = np.asarray(bins.obsm["spatial"], dtype=np.float64)
        pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": 1,
                "array_row": bins.obs["array_row"].to_numpy(),
                "array_col": bins.obs["array_col"].to_numpy(),
                "pxl_row_in_fullres": xy[:, 1],
                "pxl_col_in_fullres": xy[:, 0],
            }
        ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        factors = scalefactors(size / mpp, bin_size_um=float(size), microns_per_pixel=mpp)
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
        genes = list(bins.var_names)
        counts = sparse.csr_matrix(bins.X)
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes, genes, SAMPLE)
        image = np.ascontiguousarray(bins.uns["spatial"]["synthetic_hd"]["images"]["hires"])
        truth[size] = (barcodes, xy, counts, image)
    (outs / "spatial").mkdir()
    write_images(outs / "spatial", image)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors(16 / mpp)))
    layout = {"file_format": "1.0", "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    with h5py.File(outs / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps(layout)})
    tifffile.imwrite(root / "image.tif", image, photometric="rgb")
    return root, truth


def test_visium_hd_folder_through_spatialdata_io_gives_its_bins_and_pixels(visium_hd):
    root, truth = visium_hd
    sdata = sdio.visium_hd(root / "outs", dataset_id=SAMPLE, fullres_image_file=root / "image.tif")
    for size, (barcodes, xy, counts, image) in truth.items():
        bins = rbg.io.from_spatialdata(sdata, table_key=f"square_{size:03d}um")
        assert list(bins.obs_names) == barcodes
        assert list(bins.uns["spatial"]) == [SAMPLE]  # the section, at every bin size
        np.testing.assert_allclose(bins.obsm["spatial"], xy, atol=1e-6)
        entry = bins.uns["spatial"][SAMPLE]["scalefactors"]
        assert entry["bin_size_um"] == size
        assert entry["spot_diameter_fullres"] == pytest.approx(size / 0.5)
        assert (counts != bins.X).nnz == 0
        # the patches are the folder's image around each bin
        patches = PatchExtractor(bins, patch_size=int(size / 0.5))
        for i in (0, len(barcodes) // 2):
            x, y = np.rint(xy[i] - size / 0.5 / 2).astype(int)
            side = int(size / 0.5)
            np.testing.assert_array_equal(patches[i], image[y : y + side, x : x + side])
    spots = rbg.pp.aggregate_bins(rbg.io.from_spatialdata(sdata, table_key="square_008um"), 32)
    rbg.RankByGene.setup_anndata(spots)
