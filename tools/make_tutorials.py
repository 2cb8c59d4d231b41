"""Write the tutorial notebooks of ``tutorials/`` from the cell lists below.

The notebooks are the product; this script keeps them reviewable as plain Python. Run it after
changing a tutorial (``python tools/make_tutorials.py``), then execute them
(``python tools/make_tutorials.py --execute``) to refresh the outputs of the offline ones.
"""

from __future__ import annotations

import argparse
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
        """import matplotlib.pyplot as plt
import scanpy as sc
import scvi
import squidpy as sq

import rankbygene as rbg

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
        """slide = adata[adata.obs["library_id"] == "slide_0"]
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
model = rbg.RankByGene(train, image_encoder="resnet18", input_size=48, n_latent=64)
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
import squidpy as sq

import rankbygene as rbg

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
        """c2 = adata[adata.obs["library_id"] == "C2"]
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
        """import numpy as np
import scvi
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

TUTORIALS = {"quickstart": QUICKSTART, "her2st": HER2ST, "encoders": ENCODERS}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execute", action="store_true", help="run and keep the outputs")
    args = parser.parse_args()
    ROOT.mkdir(exist_ok=True)
    for name, cells in TUTORIALS.items():
        notebook = build(name, cells)
        path = ROOT / f"{name}.ipynb"
        if args.execute and name not in WITHOUT_OUTPUTS:
            from nbclient import NotebookClient

            NotebookClient(notebook, timeout=1200, resources={"metadata": {"path": ROOT}}).execute()
        nbformat.write(notebook, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
