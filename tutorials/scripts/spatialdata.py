# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SpatialData and Visium HD: train on pseudo-spots, predict bins, write back
#
# This tutorial runs offline in a few minutes on a laptop CPU. A synthetic Visium-HD-like section
# (`rbg.datasets.synthetic_visium_hd`: tissue whose morphology drives expression, measured by
# square bins) comes as a SpatialData object with the elements spatialdata-io's Visium HD reader
# gives for a real run: an H&E image, square bins of 8 and 16 um, and one table per bin size. The
# 8 um bins are read into the package's AnnData layout and summed into 32 um pseudo-spots,
# RankByGene trains on them, predicts the expression of the 16 um bins from the image, and the
# predictions go back into the SpatialData object.
#
# With a real run, `spatialdata_io.visium_hd("path/to/outs")` (`pip install spatialdata-io`) gives
# the same elements, named after its dataset id.

# %%
from importlib.util import find_spec

import numpy as np
import rankbygene as rbg  # first: no import-time notices of other libraries
import scanpy as sc
import scvi
import squidpy as sq

scvi.settings.seed = 0
sc.settings.set_figure_params(dpi=70, frameon=False)

# %% [markdown]
# ## A Visium HD run as SpatialData

# %%
sdata = rbg.datasets.synthetic_visium_hd(
    size_um=640, bin_sizes_um=(8, 16), microns_per_pixel=0.5, n_genes=60, seed=0
)
sdata

# %% [markdown]
# ## Bins in the package's layout
#
# `rbg.io.from_spatialdata` reads one table, the squares it annotates and the sharpest image that
# shares a coordinate system with them. Each square's centroid becomes a spot centre in the
# image's pixels and its side the patch size; the bin size in microns (from the `square_008um`
# name) and the image's resolution are recorded in the scale factors. The full-resolution image
# stays a lazy dask array: patches are read where the bins are.

# %%
bins = rbg.io.from_spatialdata(sdata, table_key="square_008um")
library = bins.obs["library_id"].cat.categories[0]
bins.uns["spatial"][library]["scalefactors"]

# %%
sq.pl.spatial_scatter(
    bins, library_id=library, color="tissue_region", shape="square", img_res_key="hires"
)

# %% [markdown]
# ## Pseudo-spots
#
# An 8 um bin holds a cell or two and a few dozen counts. `rbg.pp.aggregate_bins` sums bins into
# square pseudo-spots of a chosen side (a whole multiple of the bin size): counts summed, centres
# averaged, the diameter the pseudo-spot's side, so patches cover the pseudo-spot. Here 4 x 4 bins
# make a 32 um pseudo-spot; those with fewer than 8 bins in the tissue are left out. Training on
# the 8 or 16 um bins themselves works the same way, on `bins`.

# %%
spots = rbg.pp.aggregate_bins(bins, size_um=32, min_bins=8)
median = [float(np.median(np.asarray(a.X.sum(axis=1)))) for a in (bins, spots)]
print(f"{bins.n_obs} bins of 8 um -> {spots.n_obs} pseudo-spots of 32 um")
print(f"median counts per bin {median[0]:.0f}, per pseudo-spot {median[1]:.0f}")
sq.pl.spatial_scatter(
    spots, library_id=library, color="tissue_region", shape="square", img_res_key="hires"
)

# %% [markdown]
# ## Train
#
# A small encoder at 32 pixels and a few epochs keep the tutorial fast (real work uses a
# pretrained encoder and more epochs). The patch of a pseudo-spot is its 32 um square: 64 pixels
# at 0.5 um per pixel, resized to the encoder's input.

# %%
rbg.RankByGene.setup_anndata(spots, library_key="library_id")
model = rbg.RankByGene(spots, image_encoder="resnet18", input_size=32, n_latent=32)
model.train(max_epochs=6, batch_size=64, enable_progress_bar=False)

# %% [markdown]
# ## Predict the 16 um bins from the image
#
# The 16 um bins were not used in training. Their expression is predicted from their own image
# patches (ridge regression on the teacher embedding, fitted on the training pseudo-spots) and
# scored against their counts, gene by gene.

# %%
coarse = rbg.io.from_spatialdata(sdata, table_key="square_016um")
coarse_library = coarse.obs["library_id"].cat.categories[0]
model.predict_expression(coarse)
scores = rbg.tl.evaluate_expression(coarse, library_key="library_id")
rbg.tl.summarize_expression_scores(scores)

# %% [markdown]
# ## Write back into the SpatialData object
#
# `rbg.io.to_spatialdata` matches the rows of `coarse` to the table's by its region and instance
# keys and writes the prediction into the table as a layer, next to the counts, where squidpy
# and spatialdata-plot find it.

# %%
rbg.io.to_spatialdata(coarse, sdata, table_key="square_016um")
sdata.tables["square_016um"]

# %% [markdown]
# ## Plot
#
# Observed (log-normalised) and predicted expression of a tumour and an immune marker on the
# 16 um bins, with squidpy; then the same prediction drawn from the SpatialData object with
# spatialdata-plot, when it is installed.

# %%
genes = [coarse.var_names[coarse.var["program"] == p][0] for p in ("tumor", "immune")]
rbg.pl.expression_maps(
    coarse,
    genes,
    layer_true=None,
    library_id=coarse_library,
    img_res_key="hires",
    shape="square",
)

# %%
if find_spec("spatialdata_plot"):
    import spatialdata_plot  # noqa: F401  (adds sdata.pl)

    dataset = coarse_library  # the section: its elements are named after it
    bins_element = coarse.uns["spatial"][coarse_library]["metadata"]["spatialdata_shapes"]
    (
        sdata.pl.render_images(f"{dataset}_full_image")
        .pl.render_shapes(
            bins_element,
            color=genes[0],
            table_name="square_016um",
            table_layer="rankbygene_predicted",
        )
        .pl.show(coordinate_systems=dataset, title=f"{genes[0]}, predicted")
    )

# %% [markdown]
# ## Save into a zarr store
#
# A SpatialData object lives on disk as a zarr store. spatialdata does not overwrite an element
# of the store an object was read from, so results join it as a new table: `key_added` writes
# the prediction into a new table annotating the same bins (the `square_016um` table stays as it
# was) and `write=True` adds that table to the store (a table of that name from an earlier run
# is replaced).

# %%
import warnings

import spatialdata as sd

store = "synthetic_hd.zarr"
del sdata.tables["square_016um"].layers["rankbygene_predicted"]  # the store starts clean
with warnings.catch_warnings():  # zarr announces its next release's default on every write
    warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
    sdata.write(store, overwrite=True)
on_disk = sd.read_zarr(store)
rbg.io.to_spatialdata(
    coarse, on_disk, table_key="square_016um", key_added="square_016um_rankbygene", write=True
)
sd.read_zarr(store).tables["square_016um_rankbygene"]
