"""Image and gene representations of the RankByGene model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from anndata import AnnData
from scipy import sparse
from scvi import settings

from rankbygene._docs import d
from rankbygene._precision import inference_autocast
from rankbygene._progress import progress_bar
from rankbygene.data import normalize_batch
from rankbygene.model._constants import REGISTRY_KEYS
from rankbygene.model._data import image_loader
from rankbygene.model._model_attributes import ModelAttributes
from rankbygene.model._setup import check_var_names

#: Batches of embeddings kept on the device before one copy to the host.
OUTPUTS_PER_COPY = 16


class RepresentationMixin(ModelAttributes):
    """Image and gene embeddings of :class:`~rankbygene.model.RankByGene`."""

    @torch.inference_mode()
    @d.dedent
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
        precision: str | None = None,
    ) -> np.ndarray:
        """Teacher image embeddings (or backbone features) of each spot's patch.

        Works on any AnnData in the spatial layout, with or without expression (a new slide
        without ST, the tiles of a whole-slide image).

        Parameters
        ----------
        %(adata_model)s
            With precomputed features, ``obsm[features_key]`` stands in for the images.
        indices
            Spots to embed (default: all).
        %(batch_size)s
        kind
            ``"embedding"``: the L2-normalised projected embedding (``n_latent``);
            ``"backbone"``: the backbone features.
        %(library_key_model)s
        %(num_workers)s
        out_of_bounds
            Patches leaving the image are padded (default) or raise.
        progress
            Show a progress bar (default: for more than 10 batches).
        augmented
            Embed a random stain-jittered, flipped and rotated view of each patch
            (:func:`~rankbygene.data.stain_transform`) instead of the patch itself, e.g. to
            precompute augmented views of frozen features.
        precision
            Of the encoder's forward pass, in Lightning's names: ``"bf16-mixed"`` (the default on
            GPUs with bf16), ``"16-mixed"`` or ``"32-true"`` (the default elsewhere). Colour
            statistics and normalisation run in float32 in every case; embeddings from
            bf16-mixed differ from float32 ones by about 0.01 in cosine distance.

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
            self.image_settings,
            adata,
            indices=indices,
            batch_size=batch_size,
            library_key=library_key,
            num_workers=num_workers,
            out_of_bounds=out_of_bounds,
            device=self.device,
            n_features=self.module.n_features,
            augmented=augmented,
        )
        return self._embed_batches(loader, kind, progress, precision)

    def _embed_batches(
        self,
        loader: torch.utils.data.DataLoader,
        kind: Literal["embedding", "backbone"],
        progress: bool | None,
        precision: str | None,
    ) -> np.ndarray:
        module = self.module
        module.eval()
        device = self.device
        key = "features" if module.uses_features else "image"
        show = len(loader) > 10 if progress is None else progress
        # NHWC is what cuDNN's tensor-core convolutions read without transposing
        channels_last = torch.device(device).type == "cuda" and not module.uses_features
        if channels_last:
            module.teacher_backbone.to(memory_format=torch.channels_last)
        settings = self.image_settings
        outputs, pending = [], []
        for batch in progress_bar(loader, desc="Embedding", disable=not show, unit="batch"):
            images = batch[key].to(device, non_blocking=True)
            if images.dtype == torch.uint8:  # patches travel as uint8, normalised here
                images = normalize_batch(images, settings.mean, settings.std)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with inference_autocast(device, precision):
                pending.append(module.embed_images(images, teacher=True, kind=kind).float())
            # copying each batch back would make the GPU wait for the host between batches
            if len(pending) == OUTPUTS_PER_COPY:
                outputs.append(torch.cat(pending).cpu().numpy())
                pending = []
        if pending:
            outputs.append(torch.cat(pending).cpu().numpy())
        if not outputs:
            width = module.n_latent if kind == "embedding" else module.n_features
            return np.zeros((0, width), dtype=np.float32)
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
            Spots per forward pass; ``None``: ``scvi.settings.batch_size``.

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
        check_var_names(adata, self._gene_panel())  # also for a model loaded without AnnData
        return self._validate_anndata(adata)

    def _gene_panel(self) -> list[str]:
        return (
            [str(g) for g in self.adata_manager.adata.var_names]
            if self.adata_manager
            else [
                str(g)
                for g in self.registry_["field_registries"][REGISTRY_KEYS.X_KEY][
                    "state_registry"
                ].get("column_names", [])
            ]
        )

    @d.dedent
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        library_key: str | None = None,
        num_workers: int | None = None,
    ) -> np.ndarray:
        """The latent space of scvi-tools models: here the image representation.

        The L2-normalised teacher image embedding of each spot's patch, the same array as
        :meth:`get_image_representation` with ``kind="embedding"``: the representation that
        works on slides without spatial transcriptomics. The gene side is
        :meth:`get_gene_representation`.

        Parameters
        ----------
        %(adata_model)s
        indices
            Spots to embed (default: all).
        %(batch_size)s
        %(library_key_model)s
        %(num_workers)s

        Returns
        -------
        ``(n_spots, n_latent)`` float32 array; store it as ``adata.obsm["X_rankbygene"]``.

        Examples
        --------
        >>> adata.obsm["X_rankbygene"] = model.get_latent_representation()
        >>> sc.pp.neighbors(adata, use_rep="X_rankbygene")
        """
        return self.get_image_representation(
            adata,
            indices=indices,
            batch_size=batch_size,
            library_key=library_key,
            num_workers=num_workers,
        )
