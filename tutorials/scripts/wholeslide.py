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
# # Whole-slide inference: expression maps, slide classification, survival
#
# The image encoder needs no spatial transcriptomics once trained. This tutorial trains RankByGene
# on synthetic ST slides, then applies its image encoder to a cohort of whole-slide images
# (pyramidal TIFFs) that have no ST: it tiles the tissue, predicts an expression map, embeds every
# slide of the cohort (resumable), and predicts a slide label and survival from the slide
# features. Everything runs offline on a CPU in a few minutes.
#
# With your own slides, replace the synthetic cohort by your files: `rbg.pp.tile_slide` reads
# pyramidal TIFF/SVS/OME-TIFF through tifffile, other vendor formats through OpenSlide
# (`pip install "rankbygene[openslide]"`), and plain images with `mpp=` given.

# %%
import rankbygene as rbg  # first: no import-time notices of other libraries
import scanpy as sc
import scvi
import squidpy as sq

scvi.settings.seed = 0
sc.settings.set_figure_params(dpi=70, frameon=False)

# %% [markdown]
# ## A model trained on spatial transcriptomics
#
# Two synthetic slides train a small model (a tiny encoder and a few epochs keep the tutorial
# fast; real work uses a pretrained encoder and more epochs).

# %%
st = rbg.datasets.synthetic(n_slides=2, n_spots=150, n_genes=40, seed=0)
rbg.RankByGene.setup_anndata(st, layer="counts", library_key="library_id")
model = rbg.RankByGene(st, image_encoder="resnet18", input_size=48, n_latent=32)
model.train(max_epochs=6, batch_size=32, enable_progress_bar=False)

# %% [markdown]
# ## A cohort of whole-slide images
#
# `synthetic_cohort` writes one pyramidal TIFF per slide and a table of outcomes: the label is 1
# when a slide has more tumour than the cohort's median, and the survival time shortens with the
# tumour fraction (censored for about a third of the slides).

# %%
cohort = rbg.datasets.synthetic_cohort(
    "cohort", n_slides=60, n_spots=60, n_regions=3, log_hazard_ratio=1.5, seed=0
)
cohort.head()

# %% [markdown]
# ## Tiles of one slide
#
# `tile_slide` finds the tissue (Otsu on a thumbnail) and returns one observation per tile in the
# squidpy layout, with the thumbnail in `uns["spatial"]`. Nothing is decoded at full resolution
# until a tile is read.

# %%
tiles = rbg.pp.tile_slide(cohort["path"].iloc[0], tile_size_um=64)
tiles

# %% [markdown]
# ## Predicted expression on the slide
#
# The tiles have no genes, so the prediction cannot be written into them: `copy=True` returns a
# new AnnData with the model's genes and the prediction in `layers["rankbygene_predicted"]`
# (ridge on the teacher embedding, fitted on the training spots). It chains with squidpy as any
# Visium slide does.

# %%
predicted = model.predict_expression(tiles, copy=True)
# One marker gene of each of three tissue programs.
drivers = [st.var_names[st.var["program"] == p][0] for p in ("tumor", "stroma", "immune")]
sq.pl.spatial_scatter(
    predicted, color=drivers, layer="rankbygene_predicted", shape="square", img_res_key="hires"
)

# %%
sq.gr.spatial_neighbors_grid(predicted, n_neighs=8)
sq.gr.spatial_autocorr(predicted, mode="moran", layer="rankbygene_predicted", genes=drivers)
predicted.uns["moranI"][["I", "pval_norm"]]

# %% [markdown]
# ## Embedding the cohort
#
# `embed_slides` tiles and embeds each slide and writes one `.h5ad` per slide. Run it again (after
# an interruption, or with more slides) and finished slides are skipped.

# %%
done = rbg.tl.embed_slides(model, cohort["path"], "features", tile_size_um=64)
done.head()

# %%
again = rbg.tl.embed_slides(model, cohort["path"], "features", tile_size_um=64)
again["status"].value_counts()

# %% [markdown]
# ## Slide classification
#
# Slide features are the mean of the tile embeddings (`method="mean"`) or the bags of tile
# embeddings for attention MIL (`method="attention"`). Both are scored by stratified 5-fold
# cross-validation.

# %%
features = rbg.tl.slide_features(done)
logistic = rbg.tl.fit_slide_classifier(features, cohort["label"])
logistic.summary

# %%
bags = rbg.tl.slide_features(done, method="attention")
abmil = rbg.tl.fit_slide_classifier(bags, cohort["label"])
abmil.summary

# %% [markdown]
# ## Survival
#
# A penalised Cox model (lifelines) on the slide features, cross-validated concordance index; the
# out-of-fold risk splits the slides into a high- and a low-risk group.

# %%
survival = rbg.tl.fit_survival(features, cohort["time"], cohort["event"])
survival.summary

# %% [markdown]
# For scale: the C-index of the true tumour fraction, the quantity the outcomes were drawn
# from, is the best any slide feature can do on this cohort.

# %%
from lifelines.utils import concordance_index

concordance_index(cohort["time"], -cohort["tumor_fraction"], cohort["event"])

# %%
rbg.pl.km_curves(survival, xlabel="months")
