"""Slide-level features: tile embeddings pooled per slide, or kept as bags.

:func:`slide_features` pools the tile embeddings of each slide (mean) or keeps them as bags for
attention-based multiple-instance learning (:class:`~rankbygene.tl.SlideClassifier`); it reads
AnnData objects or the folder that :func:`~rankbygene.tl.embed_slides` writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np
import pandas as pd
from anndata import AnnData

from rankbygene._constants import IMAGE_EMBEDDING_KEY
from rankbygene._docs import d
from rankbygene._layout import spot_libraries
from rankbygene._logging import logger
from rankbygene.tl._slide_files import SUFFIX, partial_files

__all__ = ["check_bag", "mean_pool", "slide_features"]

SlideInput: TypeAlias = (
    AnnData | Sequence[AnnData] | Mapping[str, AnnData] | pd.DataFrame | pd.Series | str | Path
)
Bags = dict[str, np.ndarray]


@d.dedent
def slide_features(
    data: SlideInput,
    library_key: str | None = None,
    use_rep: str = IMAGE_EMBEDDING_KEY,
    method: Literal["mean", "attention"] = "mean",
) -> pd.DataFrame | Bags:
    """Slide-level features from tile (or spot) embeddings.

    Parameters
    ----------
    data
        Tiles of one or several slides: an AnnData (slides told apart by ``obs[library_key]``),
        a list of AnnData (one slide each; ids from their ``uns["spatial"]`` library), a
        mapping of slide id to AnnData, the DataFrame returned by
        :func:`~rankbygene.tl.embed_slides` or the folder it wrote, by any number of processes
        (its finished files, read without their images; slides still being written, or left
        unfinished by a killed process, are left out with a warning).
    %(library_key)s
        For an AnnData holding several slides.
    use_rep
        ``obsm`` key of the tile embeddings.
    method
        ``"mean"``: the mean embedding of each slide's tiles; ``"attention"``: each slide's tile
        embeddings as a bag, for :class:`~rankbygene.tl.SlideClassifier` (``method="abmil"``),
        which learns the attention pooling from the labels.

    Returns
    -------
    ``"mean"``: DataFrame of slides x features (index: slide id, columns ``<use_rep>_<j>``);
    ``"attention"``: dict of slide id to its ``(n_tiles, n_features)`` float32 array.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata.obsm["X_rankbygene"] = model.get_image_representation(adata)  # doctest: +SKIP
    >>> features = rbg.tl.slide_features(adata, library_key="library_id")  # doctest: +SKIP
    >>> bags = rbg.tl.slide_features(adata, "library_id", method="attention")  # doctest: +SKIP
    """
    if method not in ("mean", "attention"):
        raise ValueError(f"method must be 'mean' or 'attention'; got {method!r}.")
    bags = _collect_bags(data, library_key, use_rep)
    if method == "attention":
        return bags
    return mean_pool(bags, prefix=use_rep)


def mean_pool(bags: Bags, prefix: str = "feature") -> pd.DataFrame:
    """Mean of each bag's rows, as a slides x features DataFrame.

    Parameters
    ----------
    bags
        Slide id -> ``(n_tiles, n_features)`` array.
    prefix
        Column names are ``<prefix>_<j>``.

    Returns
    -------
    float64 DataFrame indexed by ``slide_id``, in the order of ``bags``.
    """
    ids = list(bags)
    matrix = np.stack([bags[s].mean(axis=0) for s in ids]).astype(np.float64)
    columns = [f"{prefix}_{j}" for j in range(matrix.shape[1])]
    return pd.DataFrame(matrix, index=pd.Index(ids, name="slide_id"), columns=columns)


def _collect_bags(data: SlideInput, library_key: str | None, use_rep: str) -> Bags:
    if isinstance(data, AnnData):
        bags = _bags_of_anndata(data, library_key, use_rep, None)
    elif isinstance(data, pd.DataFrame):
        if "output" not in data.columns:
            raise ValueError(
                "A DataFrame passed as data must be the result of embed_slides (an 'output' "
                f"column of .h5ad files); got columns {list(data.columns)}."
            )
        if "status" in data.columns and (data["status"] == "failed").any():
            failed = data.index[data["status"] == "failed"]
            logger.warning(
                f"Leaving out {len(failed)} slides that failed in embed_slides "
                f"(e.g. {list(failed[:3])}): they have no file."
            )
            data = data[data["status"] != "failed"]
        bags = {str(s): _read_rep(Path(p), use_rep) for s, p in data["output"].items()}
    elif isinstance(data, str | Path):
        folder = Path(data)
        if not folder.is_dir():
            raise FileNotFoundError(f"Folder of embedded slides not found: {folder}")
        files = sorted(folder.glob(f"*{SUFFIX}"))
        files = [f for f in files if not f.name.startswith(".")]
        if not files:
            raise FileNotFoundError(f"No {SUFFIX} file in {folder}: run embed_slides first.")
        bags = {f.name[: -len(SUFFIX)]: _read_rep(f, use_rep) for f in files}
        unfinished = sorted(set(partial_files(folder).values()) - set(bags))
        if unfinished:
            logger.warning(
                f"{len(unfinished)} slides in {folder} have no finished file, only a temporary "
                f"one (e.g. {unfinished[0]!r}): they are being embedded, or a killed process "
                "left them; they are left out. Run embed_slides again to finish them."
            )
    elif isinstance(data, Mapping):
        bags = {}
        for slide_id, adata in data.items():
            bags.update(_bags_of_anndata(adata, None, use_rep, str(slide_id)))
    elif isinstance(data, Sequence):
        bags = {}
        for adata in data:
            if not isinstance(adata, AnnData):
                raise TypeError(f"data must hold AnnData objects; got {type(adata).__name__}.")
            for slide_id, bag in _bags_of_anndata(adata, library_key, use_rep, None).items():
                if slide_id in bags:
                    raise ValueError(f"Slide {slide_id!r} appears in two AnnData objects.")
                bags[slide_id] = bag
    else:
        raise TypeError(
            "data must be an AnnData, a list or dict of AnnData, the DataFrame of embed_slides "
            f"or its folder; got {type(data).__name__}."
        )
    if not bags:
        raise ValueError("No slide found in data.")
    dims = {bag.shape[1] for bag in bags.values()}
    if len(dims) > 1:
        raise ValueError(
            f"Slides have embeddings of different sizes {sorted(dims)} in {use_rep!r}."
        )
    return bags


def _bags_of_anndata(
    adata: AnnData, library_key: str | None, use_rep: str, slide_id: str | None
) -> Bags:
    where = (
        f"adata.obsm[{use_rep!r}]" if slide_id is None else f"slide {slide_id!r}: obsm[{use_rep!r}]"
    )
    if use_rep not in adata.obsm:
        raise KeyError(
            f"{where} is missing (obsm keys: {list(adata.obsm.keys())}); store the tile "
            "embeddings there, e.g. adata.obsm['X_rankbygene'] = "
            "model.get_image_representation(adata)."
        )
    matrix = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    if slide_id is not None:
        return {slide_id: check_bag(matrix, where)}
    libraries = spot_libraries(adata, library_key)
    return {
        str(lib): check_bag(matrix[libraries == lib], f"{where} of slide {lib!r}")
        for lib in dict.fromkeys(libraries)
    }


def _read_rep(path: Path, use_rep: str) -> np.ndarray:
    import h5py

    if not path.is_file():
        raise FileNotFoundError(f"Embedded slide not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if f"obsm/{use_rep}" not in f:
                keys = list(f["obsm"].keys()) if "obsm" in f else []
                raise KeyError(f"{path} has no obsm[{use_rep!r}] (obsm keys: {keys}).")
            matrix = np.asarray(f[f"obsm/{use_rep}"][()], dtype=np.float32)
    except OSError as err:
        raise ValueError(f"Could not read {path}: {err}") from err
    return check_bag(matrix, f"{path} obsm[{use_rep!r}]")


def check_bag(matrix: np.ndarray, where: str) -> np.ndarray:
    """``matrix`` itself, once checked to be a non-empty, finite ``(n_tiles, n_features)`` bag.

    Parameters
    ----------
    matrix
        The tile features of one slide.
    where
        What ``matrix`` is, for the error message.

    Raises
    ------
    ValueError
        ``matrix`` is not 2-D, has no tile or has NaN or infinite values.
    """
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(
            f"{where} must be a non-empty (n_tiles, n_features) array; got {matrix.shape}."
        )
    if not np.isfinite(matrix).all():
        raise ValueError(f"{where} has NaN or infinite values.")
    return matrix
