"""The RankByGene network: student/teacher image encoders, gene encoder and the three losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
from scvi.module.base import BaseModuleClass, LossOutput
from torch import nn

from rankbygene.data import BATCH_KEYS
from rankbygene.model._checkpoint import check_state_fits
from rankbygene.model._ema import make_teacher, update_ema
from rankbygene.model._encoders import Backbone, ProjectionHead
from rankbygene.model._losses import (
    cosine_similarity_matrix,
    distillation_loss,
    expression_similarity,
    get_rank_world_size,
    info_nce,
    rank_agreement,
    ranking_consistency_loss,
)

#: With ``rank_n_pairs="auto"``: the ranking loss takes every pair up to this many spots per
#: batch (at most a few per cent of a step on a GPU), and samples this many pairs per anchor
#: and scale above it (measured on an H200: 5 ms at 4096 spots, against 6.2 s for all pairs).
ALL_PAIRS_MAX_BATCH = 512
AUTO_N_PAIRS = 256


class RankByGeneModule(BaseModuleClass):
    """Student image encoder f, EMA teacher f_t and gene encoder h, trained with three losses.

    ``L = lambda_contrastive * InfoNCE(v, g) + lambda_rank * L_rank(S^I(v), S^G)
    + lambda_distill * InfoNCE(v, w)``, with ``v = f(strong view)``, ``w = f_t(weak view)``,
    ``g = h(log-normalised expression)``; all embeddings L2-normalised.

    Parameters
    ----------
    n_genes
        Panel size.
    backbone
        Image backbone; ``None`` when images are replaced by precomputed features.
    n_input_features
        Size of precomputed features (when ``backbone`` is ``None``).
    n_latent
        Embedding size.
    dropout
        Dropout in the projection heads.
    tau
        Temperature of the contrastive and distillation InfoNCE.
    tau_rank
        Temperature of the ranking loss.
    lambda_contrastive, lambda_rank, lambda_distill
        Weights of the three terms; 0 switches a term off (ablations are runs of the same code).
    lambda_regression
        Weight of a direct regression term: MSE between a linear map of the student's projected
        embedding (before L2 normalisation) and the log-normalised expression. With the other
        weights 0 this is the ST-Net-like baseline: the same backbone and projection head,
        trained by supervised regression instead of gene guidance.
    rank_scales
        Neighbourhood sizes of the multi-scale ranking loss; ``None`` = the whole batch.
    rank_delta
        Gene-side similarity differences at or below this are not ranked.
    rank_target
        Gene-side similarity: of gene embeddings (``"embedding"``) or of expression profiles.
    rank_n_pairs
        Sampled pairs per anchor and scale (``None``: all pairs); ``"auto"``: all pairs up to
        :data:`ALL_PAIRS_MAX_BATCH` spots per batch, :data:`AUTO_N_PAIRS` sampled pairs above
        (all pairs of a batch of ``B`` cost ``O(B^3)``: 3.4 times a training step at 4096).
    is_log_normalized
        Expression is already log-normalised; else counts are normalised to ``target_sum``
        and log1p-transformed here.
    feature_noise
        With precomputed features, dropout on the student's features (its "strong view").
    freeze_backbone
        Keep the image backbone's weights (a pretrained encoder) and train the heads only, on
        backbone features computed once per spot (given in the batch as ``"features"``); the
        heads see the features standardised with :meth:`set_feature_scaling`.
    """

    def __init__(
        self,
        n_genes: int,
        backbone: Backbone | None,
        n_input_features: int | None = None,
        n_latent: int = 256,
        dropout: float = 0.1,
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
        is_log_normalized: bool = False,
        target_sum: float = 1e4,
        feature_noise: float = 0.1,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        if backbone is None and n_input_features is None:
            raise ValueError("Give an image backbone or the size of precomputed features.")
        if rank_target not in ("embedding", "expression"):
            raise ValueError(
                f"rank_target must be 'embedding' or 'expression'; got {rank_target!r}."
            )
        if rank_n_pairs is not None and rank_n_pairs != "auto" and int(rank_n_pairs) < 1:
            raise ValueError(f"rank_n_pairs must be None, 'auto' or >= 1; got {rank_n_pairs!r}.")
        n_features = (
            backbone.n_features if backbone is not None else int(cast(int, n_input_features))
        )
        self.uses_features = backbone is None
        self.student_backbone = backbone.module if backbone is not None else nn.Identity()
        self.student_head = ProjectionHead(n_features, n_latent, dropout)
        self.teacher_backbone = make_teacher(self.student_backbone)
        self.teacher_head = make_teacher(self.student_head)
        self.gene_head = ProjectionHead(n_genes, n_latent, dropout)
        self.regression_head = nn.Linear(n_latent, n_genes) if lambda_regression else None
        self.freeze_backbone = bool(freeze_backbone) and backbone is not None
        if self.freeze_backbone:
            self.student_backbone.requires_grad_(False)
        on_features = self.uses_features or self.freeze_backbone
        self.feature_dropout = nn.Dropout(feature_noise) if on_features else nn.Identity()
        # standardisation of backbone features before the heads (identity unless set)
        self.register_buffer("feature_shift", torch.zeros(n_features))
        self.register_buffer("feature_scale", torch.ones(n_features))
        self.n_features = n_features
        self.n_latent = n_latent
        self.tau = tau
        self.tau_rank = tau_rank
        self.lambda_contrastive = lambda_contrastive
        self.lambda_rank = lambda_rank
        self.lambda_distill = lambda_distill
        self.lambda_regression = lambda_regression
        self.rank_scales = tuple(rank_scales)
        self.rank_delta = rank_delta
        self.rank_target = rank_target
        self.rank_n_pairs = rank_n_pairs
        self.is_log_normalized = is_log_normalized
        self.target_sum = target_sum

    # -- encoders -------------------------------------------------------------------------
    def log_normalize(self, expression: torch.Tensor) -> torch.Tensor:
        """Library-size normalisation and log1p, unless the input already is."""
        expression = expression.float()
        if self.is_log_normalized:
            return expression
        size = expression.sum(dim=1, keepdim=True).clamp_min(1.0)
        return torch.log1p(expression / size * self.target_sum)

    def set_feature_scaling(self, features: torch.Tensor) -> None:
        """Standardise backbone features before the heads with these features' mean and sd."""
        features = features.float()
        sd = features.std(dim=0)
        # features (nearly) constant here are left unscaled: on a new slide they may vary
        live = sd > 1e-3 * sd.max().clamp_min(1e-12)
        self.feature_shift.copy_(features.mean(dim=0))
        self.feature_scale.copy_(torch.where(live, sd, torch.ones_like(sd)))

    def _standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_shift) / self.feature_scale

    def embed_genes(self, expression: torch.Tensor) -> torch.Tensor:
        """L2-normalised gene embeddings g = h(e)."""
        return nn.functional.normalize(self.gene_head(self.log_normalize(expression)), dim=-1)

    def embed_images(
        self,
        images: torch.Tensor,
        teacher: bool = True,
        kind: Literal["embedding", "backbone"] = "embedding",
    ) -> torch.Tensor:
        """Image representations: backbone features or L2-normalised embeddings.

        The teacher (EMA) encoder is the one used for representations after training.
        """
        backbone = self.teacher_backbone if teacher else self.student_backbone
        head = self.teacher_head if teacher else self.student_head
        features = backbone(images)
        if kind == "backbone":
            return features
        return nn.functional.normalize(head(self._standardize(features)), dim=-1)

    def pairs_per_anchor(self, batch_size: int) -> int | None:
        """Sampled pairs per anchor of the ranking loss at this batch size (``None``: all)."""
        if self.rank_n_pairs != "auto":
            return self.rank_n_pairs
        return None if batch_size <= ALL_PAIRS_MAX_BATCH else AUTO_N_PAIRS

    def update_teacher(self, momentum: float) -> None:
        """EMA step of the teacher towards the student."""
        update_ema(self.student_backbone, self.teacher_backbone, momentum)
        update_ema(self.student_head, self.teacher_head, momentum)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As :meth:`torch.nn.Module.load_state_dict`; with ``strict``, a tensor of another
        name or shape raises a :class:`ValueError` naming it, before any weight is copied."""
        if strict:
            check_state_fits(self.state_dict(), state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- scvi-tools module interface ------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict:
        # features: precomputed ones (features_key) or the frozen backbone's, computed once
        precomputed = BATCH_KEYS.features in tensors
        key = BATCH_KEYS.features if precomputed else BATCH_KEYS.image
        weak_key = BATCH_KEYS.features_weak if precomputed else BATCH_KEYS.image_weak
        weak = tensors.get(weak_key, tensors[key])
        return {
            "images": tensors[key],
            "images_weak": weak,
            "expression": tensors[BATCH_KEYS.expression],
            "precomputed": precomputed,
        }

    def _get_generative_input(self, tensors: dict, inference_outputs: dict) -> dict:
        return {}

    def inference(
        self,
        images: torch.Tensor,
        images_weak: torch.Tensor,
        expression: torch.Tensor,
        precomputed: bool = False,
    ) -> dict[str, torch.Tensor]:
        features = images if precomputed else self.student_backbone(images)
        student_input = self.feature_dropout(self._standardize(features))
        projected = self.student_head(student_input)
        v = nn.functional.normalize(projected, -1)
        with torch.no_grad():
            if precomputed:
                w = self.teacher_head(self._standardize(images_weak))
                w = nn.functional.normalize(w, dim=-1)
            else:
                w = self.embed_images(images_weak, teacher=True)
        g = self.embed_genes(expression)
        return {
            "v": v,
            "w": w,
            "g": g,
            "projected": projected,
            "expression": self.log_normalize(expression),
        }

    def generative(self) -> dict:
        return {}

    def loss(self, tensors: dict, inference_outputs: dict, generative_outputs: dict) -> LossOutput:
        v, w, g = inference_outputs["v"], inference_outputs["w"], inference_outputs["g"]
        distributed = get_rank_world_size()[1] > 1
        zero = v.new_zeros(())
        contrastive = (
            info_nce(v, g, self.tau, gather_distributed=distributed)
            if self.lambda_contrastive
            else zero
        )
        image_sim = cosine_similarity_matrix(v)
        if self.rank_target == "expression":
            gene_sim = expression_similarity(inference_outputs["expression"])
        else:
            gene_sim = cosine_similarity_matrix(g)
        rank = (
            ranking_consistency_loss(
                image_sim,
                gene_sim,
                scales=self.rank_scales,
                tau=self.tau_rank,
                delta=self.rank_delta,
                n_pairs=self.pairs_per_anchor(v.shape[0]),
            )
            if self.lambda_rank
            else zero
        )
        distill = (
            distillation_loss(v, w, self.tau, gather_distributed=distributed)
            if self.lambda_distill
            else zero
        )
        regression = (
            nn.functional.mse_loss(
                self.regression_head(inference_outputs["projected"]).float(),
                inference_outputs["expression"],
            )
            if self.regression_head is not None
            else zero
        )
        total = (
            self.lambda_contrastive * contrastive
            + self.lambda_rank * rank
            + self.lambda_distill * distill
            + self.lambda_regression * regression
        )
        with torch.no_grad():
            agreement = rank_agreement(image_sim.detach(), gene_sim.detach())
        return LossOutput(
            loss=total,
            n_obs_minibatch=v.shape[0],
            extra_metrics={
                "contrastive": contrastive.detach(),
                "rank": rank.detach(),
                "distill": distill.detach(),
                "regression": regression.detach(),
                "rank_agreement": agreement,
            },
        )
