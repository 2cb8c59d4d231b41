"""Expression predicted from the image alone, with its provenance."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from torch import nn

from rankbygene._constants import PREDICTED_LAYER_KEY, UNS_KEY
from rankbygene._docs import d
from rankbygene._layout import (
    spatial_coordinates,
    spot_libraries,
)
from rankbygene._logging import logger
from rankbygene._version import __version__
from rankbygene.data import PatchExtractor
from rankbygene.model._model_attributes import ModelAttributes
from rankbygene.model._readout import (
    KnnPredictor,
    MlpPredictor,
    PredictionMethod,
    RidgePredictor,
    with_neighbor_context,
)


class PredictionMixin(ModelAttributes):
    """``predict_expression`` of :class:`~rankbygene.model.RankByGene`."""

    @torch.inference_mode()
    @d.dedent
    def predict_expression(
        self,
        adata: AnnData | None = None,
        method: PredictionMethod = "ridge",
        reference: AnnData | None = None,
        key_added: str = PREDICTED_LAYER_KEY,
        k: int = 50,
        representation: Literal["embedding", "backbone"] = "embedding",
        library_key: str | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        alpha: float | None = None,
        n_components: int | None = None,
        neighbor_context: int = 0,
        copy: bool = False,
        layer_added: str | None = None,
        precision: str | None = None,
    ) -> AnnData | None:
        """Predict each spot's expression of the model's genes from its image alone.

        As scanpy's functions: ``copy=False`` writes ``layers[key_added]`` and
        ``uns["rankbygene"]`` into ``adata`` and returns ``None``; ``copy=True`` leaves
        ``adata`` unchanged and returns a new AnnData with them.

        The genes rule: the prediction covers the model's genes. With ``copy=False``, ``adata``
        must have exactly those genes (in any order; the layer follows ``adata``'s order).
        An AnnData with other genes, or none (an image-only AnnData such as the tiles of
        :func:`~rankbygene.pp.tile_slide`), takes ``copy=True``; ``copy=False`` then raises,
        naming the genes that differ, before any work. With ``copy=True``, the new AnnData is
        a copy of ``adata`` when it has the model's genes; otherwise it has ``adata``'s
        ``obs``, ``obsm`` and ``uns``, the model's genes as ``var`` and the prediction in ``X``
        too.

        Parameters
        ----------
        %(adata_model)s
            Spots with images; expression is not needed.
        method
            ``"ridge"``: ridge regression on frozen teacher representations of the reference
            spots (closed form, the HEST-benchmark protocol); ``"knn"``: the ``k`` reference
            spots whose gene embeddings are closest to the query's image embedding, averaged
            (BLEEP's protocol); ``"mlp"``: a small MLP head on frozen representations.
        reference
            Spots with images and expression to fit on or retrieve from; default: the model's
            training spots. Must have the model's genes in the layer used at setup.
        %(key_added)s
            In ``layers``.
        k
            Neighbours for ``"knn"``.
        representation
            Teacher features for ``"ridge"``/``"mlp"``: the projected ``"embedding"`` or the
            ``"backbone"`` features.
        %(library_key_model)s
        %(batch_size)s
        %(num_workers)s
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
        %(copy)s
        layer_added
            Deprecated name of ``key_added`` (a ``FutureWarning``; removed in the next
            release).
        precision
            Of the image forward passes, as in :meth:`get_image_representation` (default:
            bf16-mixed on GPUs with bf16, else float32); the read-out always fits in float32.

        Returns
        -------
        ``None`` (``copy=False``: written into ``adata``) or the new AnnData (``copy=True``),
        with ``layers[key_added]``, the prediction, and ``uns["rankbygene"]``, its provenance.
        Values are log-normalised: ``log1p(counts / total * 1e4)`` with the total over the
        model's genes.

        Examples
        --------
        >>> model.predict_expression(new_adata)                   # layers["rankbygene_predicted"]
        >>> tiles = rbg.pp.tile_slide("slide.svs")
        >>> predicted = model.predict_expression(tiles, copy=True)  # the model's genes as var
        """
        if layer_added is not None:
            if key_added not in (PREDICTED_LAYER_KEY, layer_added):
                raise ValueError(
                    f"key_added={key_added!r} and layer_added={layer_added!r} disagree; "
                    "pass key_added only (layer_added is deprecated)."
                )
            warnings.warn(
                "predict_expression(layer_added=...) is deprecated and will be removed in the "
                "next release: use key_added=... (as scanpy's functions).",
                FutureWarning,
                stacklevel=3,  # the user's call, past torch.inference_mode's wrapper
            )
            key_added = layer_added
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
        same_genes = (
            query.n_vars == len(genes)
            and query.var_names.is_unique
            and set(query.var_names) == set(genes)
        )
        if not same_genes and not copy:
            raise ValueError(gene_mismatch_message(list(query.var_names), genes, key_added))
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
            PatchExtractor.from_settings(
                query, self.image_settings, library_key=library_key, out_of_bounds="pad"
            )
        embed = {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "progress": None,
            "precision": precision,
        }
        predictor: KnnPredictor | RidgePredictor | MlpPredictor
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
            "layer": key_added,
            "method": method,
            "representation": representation if method != "knn" else "embedding",
            "k": k if method == "knn" else None,
            "alpha": getattr(predictor, "alpha_", None),
            "alpha_selection": getattr(predictor, "selection_", None),
            "n_components": n_components if method == "ridge" else None,
            "neighbor_context": neighbor_context if method != "knn" else 0,
            "n_reference": len(ref_idx),
            "genes": len(genes),
            "scale": (
                "as given at setup (is_log_normalized=True)"
                if self.module.is_log_normalized
                else f"log1p(counts / total over the model's genes * {self.module.target_sum:g})"
            ),
        }
        if copy and same_genes:
            out = query.copy()
        elif copy:
            out = AnnData(
                X=predicted,
                obs=query.obs.copy(),
                var=pd.DataFrame(index=pd.Index(genes, name=None)),
                obsm={key: np.asarray(value).copy() for key, value in query.obsm.items()},
                uns={k: v for k, v in query.uns.items() if not k.startswith("_scvi")},
            )
        else:
            out = query
        order = pd.Index(genes).get_indexer(out.var_names)
        out.layers[key_added] = predicted[:, order]
        record_provenance(out, self, provenance)
        logger.info(
            "added layers[%r] and uns[%r]%s",
            key_added,
            UNS_KEY,
            " to a new AnnData of the model's genes" if copy and not same_genes else "",
        )
        return out if copy else None

    def _libraries(self, adata: AnnData, library_key: str | None) -> np.ndarray:
        """Each spot's library: ``library_key``, else the setup key where ``adata`` has it."""
        return spot_libraries(adata, self.image_settings.library_column(adata, library_key))

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


def gene_mismatch_message(query_genes: list[str], model_genes: list[str], key_added: str) -> str:
    """Why ``copy=False`` cannot write the prediction: how the query's genes differ.

    Parameters
    ----------
    query_genes
        The query's ``var_names``.
    model_genes
        The model's gene panel.
    key_added
        The layer of the prediction.

    Returns
    -------
    A message naming the missing, extra and repeated genes and what to do.

    Examples
    --------
    >>> gene_mismatch_message([], ["A", "B"], "rankbygene_predicted")[:40]
    'adata has no genes (an image-only AnnData'
    """
    n_model = len(model_genes)
    todo = (
        f"pass copy=True to get a new AnnData with the model's {n_model} genes (the "
        f"prediction in X and layers[{key_added!r}]), or subset adata to the model's genes "
        "(adata[:, model.adata.var_names])."
    )
    if not query_genes:
        return (
            "adata has no genes (an image-only AnnData, such as whole-slide tiles), so "
            f"layers[{key_added!r}] cannot be written into it: pass copy=True to get a new "
            f"AnnData with the model's {n_model} genes."
        )
    query_set, model_set = set(query_genes), set(model_genes)
    missing = [g for g in model_genes if g not in query_set]
    extra = [g for g in dict.fromkeys(query_genes) if g not in model_set]
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of the model's {n_model} genes are missing from it "
            f"(e.g. {missing[:3]})"
        )
    if extra:
        parts.append(
            f"{len(extra)} of its {len(query_set)} genes are not the model's (e.g. {extra[:3]})"
        )
    repeated = len(query_genes) - len(query_set)
    if repeated:
        parts.append(f"{repeated} of its gene names repeat")
    return (
        f"adata's genes differ from the model's, so layers[{key_added!r}] cannot be written "
        "into it: " + "; ".join(parts) + ". " + todo[0].upper() + todo[1:]
    )


def record_provenance(adata: AnnData, model: Any, prediction: dict) -> None:
    """What produced the outputs: the model's settings, the package version, the prediction."""
    entry = dict(adata.uns.get(UNS_KEY, {}))
    entry["version"] = __version__
    entry["model"] = {
        key: plain_value(value)
        for key, value in model.init_params_.get("non_kwargs", {}).items()
        if key not in ("adata", "registry")
    }
    entry["predicted"] = prediction
    adata.uns[UNS_KEY] = entry


def plain_value(value: Any) -> Any:
    """A value h5ad can store."""
    if value is None:
        return "None"
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, nn.Module):
        return type(value).__name__
    return str(value)
