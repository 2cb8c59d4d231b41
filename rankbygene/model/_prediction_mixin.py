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

from rankbygene import __version__
from rankbygene._constants import PREDICTED_LAYER_KEY, SPATIAL_KEY, UNS_KEY
from rankbygene._layout import (
    spatial_coordinates,
    spot_libraries,
)
from rankbygene._logging import logger
from rankbygene.data import PatchExtractor
from rankbygene.model._prediction import (
    KnnPredictor,
    MlpPredictor,
    PredictionMethod,
    RidgePredictor,
    with_neighbor_context,
)


class PredictionMixin:
    """``predict_expression`` of :class:`~rankbygene.model.RankByGene`."""

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
        precision: str | None = None,
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
        precision
            Of the image forward passes, as in :meth:`get_image_representation` (default:
            bf16-mixed on GPUs with bf16, else float32); the read-out always fits in float32.

        Returns
        -------
        ``None`` when ``adata`` has exactly the model's genes: the prediction is written to
        ``adata.layers[layer_added]`` and its provenance to ``adata.uns["rankbygene"]``.
        Otherwise (an image-only AnnData) a new AnnData with the same ``obs``, ``obsm`` and
        ``uns`` and the model's genes as ``var``, the prediction in ``X`` and
        ``layers[layer_added]``; a query that has genes, but not exactly the model's, gets
        the new AnnData too, with a ``UserWarning`` saying how its genes differ. Values are
        log-normalised: ``log1p(counts / total * 1e4)`` with the total over the model's genes.

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
            PatchExtractor.from_settings(
                query, self.image_settings, library_key=library_key, out_of_bounds="pad"
            )
        embed = {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "progress": None,
            "precision": precision,
        }
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
            "scale": (
                "as given at setup (is_log_normalized=True)"
                if self.module.is_log_normalized
                else f"log1p(counts / total over the model's genes * {self.module.target_sum:g})"
            ),
        }
        same_genes = query.n_vars == len(genes) and set(query.var_names) == set(genes)
        if same_genes:
            order = pd.Index(genes).get_indexer(query.var_names)
            query.layers[layer_added] = predicted[:, order]
            record_provenance(query, self, provenance)
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
        record_provenance(out, self, provenance)
        if query.n_vars:
            # a query with genes expects the prediction in its own layers; say why it is not
            warnings.warn(
                gene_mismatch_message(list(query.var_names), genes, layer_added),
                UserWarning,
                stacklevel=3,  # the user's call, past torch.inference_mode's wrapper
            )
        else:
            logger.info("image-only query: returned a new AnnData with layers[%r]", layer_added)
        return out

    def _libraries(self, adata: AnnData, library_key: str | None) -> np.ndarray:
        """Each spot's library: ``library_key``, else the setup key where ``adata`` has it."""
        library_key = self.image_settings.library_column(adata, library_key)
        if library_key is None and len(adata.uns.get(SPATIAL_KEY, {})) > 1:
            return np.zeros(adata.n_obs, dtype=str)  # unknown: one group, no library-wise CV
        return spot_libraries(adata, library_key)

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


def gene_mismatch_message(query_genes: list[str], model_genes: list[str], layer: str) -> str:
    """Why a query with genes got a new AnnData: how its genes differ from the model's.

    Parameters
    ----------
    query_genes
        The query's ``var_names``.
    model_genes
        The model's gene panel.
    layer
        The layer of the prediction.

    Returns
    -------
    A message naming the missing, extra and repeated genes and what was returned.
    """
    query_set, model_set = set(query_genes), set(model_genes)
    missing = [g for g in model_genes if g not in query_set]
    extra = [g for g in dict.fromkeys(query_genes) if g not in model_set]
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of the model's {len(model_genes)} genes are missing from it "
            f"(e.g. {missing[:3]})"
        )
    if extra:
        parts.append(
            f"{len(extra)} of its {len(query_set)} genes are not the model's (e.g. {extra[:3]})"
        )
    repeated = len(query_genes) - len(query_set)
    if repeated:
        parts.append(f"{repeated} of its gene names repeat")
    hint = (
        ""
        if missing
        else " Subset it to the model's genes to get the prediction in its own layers."
    )
    return (
        "The query's genes differ from the model's: "
        + "; ".join(parts)
        + f". The prediction was returned as a new AnnData with the model's {len(model_genes)} "
        f"genes (X and layers[{layer!r}]); the query was left unchanged.{hint}"
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
