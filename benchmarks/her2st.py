"""Leave-one-section-out expression prediction on the HER2+ sections: RankByGene vs baselines.

For each held-out section, every method trains on the other sections with the same backbone,
budget and seed; expression of the held-out section is then predicted from its images alone
(ridge on the frozen teacher representation of the training spots, the HEST protocol) and
scored per gene (Pearson over the section's spots, averaged over genes). Two gene sets are
scored: the 785-gene panel of ``her_hvg_cut_1000.txt`` (the panel of HisToGene, Hist2ST,
THItoGene, mclSTExp) and its 50 most highly expressed genes.

Methods (settings of the same code):

- ``rankbygene``: contrastive + ranking (lambda 5) + distillation (lambda 1)
- ``rankbygene_knn``: the same trained model, BLEEP-style retrieval instead of ridge
- ``contrastive_only``: BLEEP-like, lambda_rank = lambda_distill = 0
- ``no_distill``: lambda_distill = 0
- ``no_rank``: lambda_rank = 0
- ``regression``: ST-Net-like, the backbone trained by MSE regression only
- ``untrained``: ridge on the untrained encoder

Usage::

    python benchmarks/her2st.py --data ../shared/data/her2st
    python benchmarks/her2st.py --sections C2 C3 C4 --epochs 10 --input-size 112

Prints one table (method x held-out section: mean Pearson over genes; MAE; training time) and
writes it as CSV (``--out``).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

METHODS = {
    "rankbygene": {},
    "contrastive_only": {"lambda_rank": 0.0, "lambda_distill": 0.0},
    "no_distill": {"lambda_distill": 0.0},
    "no_rank": {"lambda_rank": 0.0},
    "regression": {
        "lambda_contrastive": 0.0,
        "lambda_rank": 0.0,
        "lambda_distill": 0.0,
        "lambda_regression": 1.0,
    },
    "untrained": None,
}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="her2st folder")
    parser.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--encoder", default="resnet18", help="timm backbone for every method")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--patch-scale", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-latent", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--representation",
        choices=["embedding", "backbone"],
        default="backbone",
        help="teacher features the ridge read-out uses (backbone: the HEST protocol)",
    )
    parser.add_argument("--smooth", action="store_true", help="3x3 smoothing of the targets")
    parser.add_argument(
        "--rank-target",
        choices=["embedding", "expression"],
        default="embedding",
        help="gene-side ordering of the ranking loss",
    )
    parser.add_argument("--lambda-rank", type=float, default=5.0, help="where ranking is on")
    parser.add_argument("--tau-rank", type=float, default=0.05)
    parser.add_argument("--n-top", type=int, default=50, help="highly expressed genes scored")
    parser.add_argument("--out", type=Path, default=Path("her2st_benchmark.csv"))
    return parser.parse_args(argv)


def load_sections(args: argparse.Namespace) -> tuple[ad.AnnData, list[str]]:
    import rankbygene as rbg

    if not args.data.is_dir():
        raise SystemExit(f"HER2+ data not found at {args.data}: pass --data.")
    slides = [rbg.datasets.her2st(section, path=args.data) for section in args.sections]
    adata = ad.concat(slides, join="inner", uns_merge="unique", merge="same")
    adata.obs["library_id"] = pd.Categorical(adata.obs["library_id"].astype(str))
    panel = rbg.datasets.her2st_genes(path=args.data / "her_hvg_cut_1000.txt")
    present = [g for g in panel if g in adata.var_names]
    adata = adata[:, present].copy()
    if args.smooth:
        # Smoothed targets for training only: held-out sections are scored on their own counts.
        rbg.pp.smooth_expression(
            adata, layer="counts", key_added="counts_smoothed", library_key="library_id"
        )
    return adata, present


def top_expressed(train: ad.AnnData, n_top: int) -> list[str]:
    from rankbygene.tl import log_normalize

    means = log_normalize(train.layers["counts"]).mean(axis=0)
    return list(train.var_names[np.argsort(-means)[:n_top]])


def run_fold(adata: ad.AnnData, held_out: str, method: str, seed: int, args) -> list[dict]:
    import scvi

    import rankbygene as rbg

    scvi.settings.seed = seed
    train = adata[adata.obs["library_id"] != held_out].copy()
    test = adata[adata.obs["library_id"] == held_out].copy()
    layer = "counts_smoothed" if args.smooth else "counts"
    rbg.RankByGene.setup_anndata(train, layer=layer, library_key="library_id")
    settings = {
        "rank_target": args.rank_target,
        "tau_rank": args.tau_rank,
        "lambda_rank": args.lambda_rank,
        **(METHODS[method] or {}),
    }
    model = rbg.RankByGene(
        train,
        image_encoder=args.encoder,
        input_size=args.input_size,
        patch_scale=args.patch_scale,
        n_latent=args.n_latent,
        **settings,
    )
    started = time.perf_counter()
    if METHODS[method] is not None:
        model.train(
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            train_size=1.0,
            accelerator="auto",
            enable_progress_bar=False,
        )
    train_seconds = time.perf_counter() - started
    heg = set(top_expressed(train, args.n_top))
    protocols = [(method, "ridge")] + (
        [("rankbygene_knn", "knn")] if method == "rankbygene" else []
    )
    rows = []
    for name, protocol in protocols:
        if protocol == "knn":
            model.predict_expression(test, method="knn", k=50)
        else:
            model.predict_expression(test, method="ridge", representation=args.representation)
        scores = rbg.tl.evaluate_expression(test, layer_true="counts", library_key="library_id")
        for gene_set, table in (
            ("panel", scores),
            (f"top{args.n_top}", scores[scores.gene.isin(heg)]),
        ):
            rows.append(
                {
                    "method": name,
                    "held_out": held_out,
                    "seed": seed,
                    "genes": gene_set,
                    "n_genes": int(table["pearson"].notna().sum()),
                    "pearson": float(table["pearson"].mean()),
                    "mae": float(table["mae"].mean()),
                    "train_seconds": round(train_seconds, 1),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  lightning sets its log level on import: quiet it after

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.perf_counter()
    adata, panel = load_sections(args)
    print(
        f"{adata.n_obs} spots, {len(panel)} panel genes, sections {args.sections}; "
        f"{args.encoder} at {args.input_size}px, {args.epochs} epochs, seeds {args.seeds}",
        flush=True,
    )
    rows = []
    for held_out in args.sections:
        for method in args.methods:
            for seed in args.seeds:
                fold = run_fold(adata, held_out, method, seed, args)
                rows.extend(fold)
                for panel_row, top_row in zip(fold[::2], fold[1::2], strict=True):
                    print(
                        f"  {held_out:>3} {panel_row['method']:<17} seed {seed}: pearson "
                        f"panel {panel_row['pearson']:.3f}, top{args.n_top} "
                        f"{top_row['pearson']:.3f} ({panel_row['train_seconds']:.0f} s)",
                        flush=True,
                    )
    results = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out, index=False)
    print_table(results, args)
    print(
        f"\nmachine: {platform.machine()}, {_cpu_count()} CPU cores, "
        f"{'GPU' if _has_gpu() else 'no GPU'}; total {time.perf_counter() - started:.0f} s; "
        f"rows written to {args.out}"
    )
    return results


def print_table(results: pd.DataFrame, args: argparse.Namespace) -> None:
    mean = results.groupby(["genes", "method", "held_out"])["pearson"].mean().unstack("held_out")
    mean["overall"] = mean.mean(axis=1)
    extra = results.groupby(["genes", "method"])[["mae", "train_seconds"]].mean()
    table = mean.join(extra).round(3)
    for genes, block in table.groupby(level="genes"):
        block = block.droplevel("genes").sort_values("overall", ascending=False)
        print(f"\nmean Pearson r over {genes} genes (held-out section), MAE, train s / fold:")
        print(block.to_string())


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
