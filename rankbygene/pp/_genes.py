"""Choose the gene panel used for training."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from scipy import sparse

from rankbygene._constants import PANEL_KEY
from rankbygene._docs import d
from rankbygene._logging import logger
from rankbygene._matrix import (
    check_counts,
    check_not_empty,
    get_matrix,
    light_adata,
    matrix_name,
)

__all__ = ["PANEL_KEY", "select_genes"]

#: Fewest genes that vary across spots for seurat_v3's loess fit of variance on mean (span 0.3,
#: degree 2): scikit-misc crashes the interpreter (segfault) on 3 points or fewer and fails with
#: "svddc failed in l2fit" or near-singularity errors up to about 15.
MIN_HVG_GENES = 16


def _read_gene_list(genes: Sequence[str] | str | os.PathLike) -> tuple[list[str], str]:
    """Gene names from a list or a text file (one per line; blank lines and ``#`` skipped)."""
    if isinstance(genes, str | os.PathLike):
        path = Path(genes)
        if not path.is_file():
            raise FileNotFoundError(
                f"gene list file {str(path)!r} not found (pass a list of names, or a text file "
                "with one gene per line)"
            )
        lines = path.read_text().splitlines()
        names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        source = f"file {str(path)!r}"
    else:
        names = [str(g) for g in genes]
        source = "the gene list"
    names = list(dict.fromkeys(names))  # drop duplicates, keep order
    if not names:
        raise ValueError(f"{source} is empty")
    return names, source


def _highly_expressed(adata: AnnData, x, n_top: int) -> np.ndarray:
    """Indices of the ``n_top`` genes with the highest mean library-size-normalised expression."""
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    if sparse.issparse(x):
        means = np.asarray((sparse.diags(scale) @ x).mean(axis=0)).ravel()
    else:
        means = (np.asarray(x, dtype=np.float64) * scale[:, None]).mean(axis=0)
    # Stable sort: ties keep the AnnData's gene order.
    return np.argsort(-means, kind="stable")[:n_top]


def _n_varying_genes(x) -> int:
    """Genes whose counts are not the same in every spot (0 with fewer than 2 spots)."""
    if x.shape[0] < 2:
        return 0  # seurat_v3's variance (ddof=1) is NaN: no gene counts as varying
    if sparse.issparse(x):
        # max/min of a sparse matrix include its implicit zeros
        high = np.asarray(x.max(axis=0).toarray()).ravel()
        low = np.asarray(x.min(axis=0).toarray()).ravel()
    else:
        high, low = np.max(x, axis=0), np.min(x, axis=0)
    return int(np.count_nonzero(high != low))


def _highly_variable(adata: AnnData, x, n_top: int) -> np.ndarray | None:
    """Indices of scanpy's seurat_v3 highly variable genes, computed on a throw-away AnnData.

    Returns ``None``, with a logged warning, when the input is too small or too degenerate for
    seurat_v3's loess fit; the caller then falls back to ``"heg"``.
    """
    n_varying = _n_varying_genes(x)
    if n_varying < MIN_HVG_GENES:
        # Checked before calling scanpy: on so few points scikit-misc's loess kills the
        # interpreter (a segfault) rather than raising.
        logger.warning(
            "flavor='hvg' needs at least %d genes that vary across at least 2 spots for "
            "seurat_v3's loess fit; %d spot(s) x %d genes have %d: selecting highly expressed "
            "genes (flavor='heg') instead",
            MIN_HVG_GENES,
            adata.n_obs,
            adata.n_vars,
            n_varying,
        )
        return None
    if x.dtype not in (np.float32, np.float64):
        # scanpy squares counts in their own dtype: uint16 (or int32 past 46,340) overflows to
        # negative variances, on which scikit-misc's loess segfaults
        x = x.astype(np.float32)
    light = light_adata(adata, x)
    # genes told apart by position: a repeated name would select its twins too
    light.var_names = pd.RangeIndex(adata.n_vars).astype(str)
    try:
        df = sc.pp.highly_variable_genes(
            light, flavor="seurat_v3", n_top_genes=n_top, inplace=False
        )
    except ImportError as err:  # seurat_v3 needs scikit-misc
        raise ImportError(
            "flavor='hvg' uses scanpy's seurat_v3 flavor, which needs scikit-misc: "
            "pip install scikit-misc"
        ) from err
    except ValueError as err:
        # scikit-misc's loess reports a singular fit as ValueError(b"svddc failed in l2fit."),
        # e.g. when the genes' means take only a few distinct values
        if not isinstance(err.args[0] if err.args else None, bytes):
            raise
        logger.warning(
            "flavor='hvg': seurat_v3's loess fit of variance on mean failed on %d varying "
            "genes (scikit-misc: %s): selecting highly expressed genes (flavor='heg') instead",
            n_varying,
            err.args[0].decode(errors="replace"),
        )
        return None
    hv = df["highly_variable"].reindex(light.var_names).fillna(False).to_numpy(dtype=bool)
    return np.flatnonzero(hv)


@d.dedent
def select_genes(
    adata: AnnData,
    n_top: int = 250,
    flavor: Literal["heg", "hvg"] = "heg",
    genes: Sequence[str] | str | os.PathLike | None = None,
    layer: str | None = None,
    subset: bool = False,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | pd.DataFrame | None:
    """Choose the gene panel that the model is trained on.

    As :func:`scanpy.pp.highly_variable_genes`: the panel is marked in
    ``var["rankbygene_panel"]`` (bool), and ``adata`` is subset to it only with ``subset=True``
    (what training needs: the model's genes are ``var_names`` at setup).

    Three ways to choose:

    - ``flavor="heg"`` (default): the ``n_top`` highly expressed genes, i.e. with the highest mean
      library-size-normalised expression over spots (the HEST / BLEEP convention);
    - ``flavor="hvg"``: the ``n_top`` highly variable genes of
      :func:`scanpy.pp.highly_variable_genes` with ``flavor="seurat_v3"`` on the counts (computed
      on a throw-away AnnData, so nothing but the panel is written into ``adata``). Its loess fit
      needs at least 16 genes that vary across spots (``MIN_HVG_GENES``); on smaller or
      degenerate data (e.g. one spot) the highly expressed genes are selected instead, with a
      logged warning;
    - ``genes``: an explicit list of names, or the path of a text file with one gene per line (such
      as the 785-gene HER2+ panel ``her_hvg_cut_1000.txt`` used by HisToGene and successors).
      Genes absent from ``adata`` are reported (how many, and the first few) and skipped; ``n_top``
      and ``flavor`` are then ignored.

    Parameters
    ----------
    %(adata)s
        Raw counts in ``layer`` (or ``X``); no spatial layout needed.
    n_top
        Number of genes to keep for ``"heg"`` and ``"hvg"``; capped at ``adata.n_vars``.
    flavor
        ``"heg"`` (highly expressed) or ``"hvg"`` (highly variable).
    genes
        Explicit panel: a sequence of gene names or a path to a text file.
    %(layer)s
        Raw counts.
    subset
        Also subset ``adata`` to the panel (in the AnnData's order for ``"heg"``/``"hvg"``, in
        the list's order for ``genes``). Default: mark it only, keeping every gene.
    inplace
        ``False``: change nothing and return the mark as a DataFrame (as scanpy's
        ``highly_variable_genes(inplace=False)``).
    %(copy)s

    Returns
    -------
    ``None`` (written into ``adata``), a copy of ``adata`` with ``copy=True``, or with
    ``inplace=False`` a DataFrame indexed by ``var_names`` with the bool column
    ``"rankbygene_panel"``. Written: ``var["rankbygene_panel"]`` (all ``True`` once subset).

    Raises
    ------
    KeyError
        If ``layer`` is not in ``adata.layers``.
    FileNotFoundError
        If ``genes`` is a path that does not exist.
    ValueError
        If ``n_top < 1``, ``flavor`` is unknown, the counts are empty or contain NaN or negative
        values, none of the listed genes is in ``adata``, or ``copy=True`` with
        ``inplace=False``.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.datasets.synthetic(n_slides=1, n_spots=100, n_genes=100)
    >>> rbg.pp.select_genes(adata, n_top=50)
    >>> adata.n_vars, int(adata.var["rankbygene_panel"].sum())
    (100, 50)
    >>> rbg.pp.select_genes(adata, n_top=50, subset=True)  # the training panel
    >>> adata.n_vars
    50
    >>> adata = rbg.datasets.synthetic(n_slides=1, n_spots=100)
    >>> panel = rbg.pp.select_genes(adata, genes=["TUMOR_1", "HK_2", "NOPE"], inplace=False)
    >>> int(panel["rankbygene_panel"].sum())
    2
    """
    # Validate everything before changing anything.
    if copy and not inplace:
        raise ValueError("copy=True returns a changed copy; it cannot go with inplace=False.")
    if genes is None:
        if flavor not in ("heg", "hvg"):
            raise ValueError(f"flavor must be 'heg' or 'hvg', got {flavor!r}")
        if isinstance(n_top, bool) or not isinstance(n_top, int | np.integer) or n_top < 1:
            raise ValueError(f"n_top must be an integer >= 1, got {n_top!r}")
    x = get_matrix(adata, layer)
    check_not_empty(x, layer, "select")
    check_counts(adata, x, layer)

    if genes is not None:
        wanted, source = _read_gene_list(genes)
        if not adata.var_names.is_unique:
            raise ValueError("adata.var_names are not unique; call adata.var_names_make_unique()")
        present_mask = adata.var_names.isin(wanted)
        known = set(adata.var_names[present_mask])
        present = [g for g in wanted if g in known]
        missing = [g for g in wanted if g not in known]
        if not present:
            raise ValueError(
                f"none of the {len(wanted)} genes in {source} is in adata.var_names "
                f"(first listed: {wanted[:5]}; first in adata: {list(adata.var_names[:5])})"
            )
        if missing:
            logger.warning(
                "%d of %d genes in %s are not in adata.var_names and are skipped, e.g. %s",
                len(missing),
                len(wanted),
                source,
                missing[:5],
            )
        idx = adata.var_names.get_indexer(present)
        how = f"{len(present)} genes from {source}"
    else:
        n = int(n_top)
        if n > adata.n_vars:
            logger.warning("n_top=%d > n_vars=%d: keeping all genes", n, adata.n_vars)
            n = adata.n_vars
        idx = _highly_variable(adata, x, n) if flavor == "hvg" else None
        if idx is not None:
            how = f"{len(idx)} highly variable genes (seurat_v3)"
        else:  # "heg", or "hvg" on data too small for seurat_v3 (warned)
            idx = np.sort(_highly_expressed(adata, x, n))
            how = f"{len(idx)} highly expressed genes (mean normalised expression)"
        how += f" from {matrix_name(layer)}"

    mask = np.zeros(adata.n_vars, dtype=bool)
    mask[idx] = True
    if not inplace:
        logger.info("selected %s", how)
        return pd.DataFrame({PANEL_KEY: mask}, index=adata.var_names.copy())
    if subset:
        if copy:
            out = adata[:, idx].copy()
        else:
            out = adata
            out._inplace_subset_var(idx)
        out.var[PANEL_KEY] = np.ones(out.n_vars, dtype=bool)
        logger.info("selected %s; added var[%r] and subset adata to them", how, PANEL_KEY)
    else:
        out = adata.copy() if copy else adata
        out.var[PANEL_KEY] = mask
        logger.info("selected %s; added var[%r]", how, PANEL_KEY)
    return out if copy else None
