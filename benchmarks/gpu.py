"""Benchmark: the GPU path, in one prepared run of a few minutes.

Three parts, each measured in this run and printed as a table (and written as CSV):

embedding
    For ResNet-50 and ViT-B/16 at 224 px: the bare encoder forward (teacher backbone and
    projection head on images already on the device, bf16 autocast, channels_last, batch 256)
    against the whole embedding pipeline a user runs, ``model.get_image_representation(adata)``
    with its default loader settings (read patches, resize, normalise, copy, forward). The ratio
    is the pipeline's throughput over the bare forward's.
training step
    One optimiser step (forward, backward, AdamW, EMA update of the teacher) at batch 256 with
    ResNet-50 at 224 px: the full loss against contrastive-only and direct regression, so the
    cost of the ranking and distillation terms shows as a ratio to contrastive-only.
ranking loss
    ``ranking_consistency_loss`` alone (forward and backward, scales 8, 32 and all) at batch
    256, 1024 and 4096: time and peak memory, with its automatic chunking.

Peak memory is ``torch.cuda.max_memory_allocated`` per measurement (resident memory on the CPU).

Usage::

    python benchmarks/gpu.py                  # on a GPU machine; about 3-5 minutes
    python benchmarks/gpu.py --cpu-smoke      # tiny settings on the CPU: checks the script runs
    python benchmarks/gpu.py --out gpu.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL = {
    "device": "cuda",
    "encoders": ["resnet50", "vit_base_patch16_224"],
    "input_size": 224,
    "batch_size": 256,
    "n_spots": 2048,
    "spot_diameter": 224,
    "train_encoder": "resnet50",
    "rank_batches": [256, 1024, 4096],
    "n_genes": 250,
    "repeats": 5,
}
SMOKE = {
    "device": "cpu",
    "encoders": ["resnet18", "vit_tiny_patch16_224"],
    "input_size": 32,
    "batch_size": 16,
    "n_spots": 48,
    "spot_diameter": 32,
    "train_encoder": "resnet18",
    "rank_batches": [16, 64],
    "n_genes": 20,
    "repeats": 2,
}
OBJECTIVES = {
    "full": {},
    "contrastive only": {"lambda_rank": 0.0, "lambda_distill": 0.0},
    "regression": {
        "lambda_contrastive": 0.0,
        "lambda_rank": 0.0,
        "lambda_distill": 0.0,
        "lambda_regression": 1.0,
    },
}


# ---------------------------------------------------------------- measuring


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(fn: Callable[[], Any], device: Any, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def autocast(device: Any) -> Any:
    import torch

    # bf16 where the device has it: no loss scaling, no fp16 overflow in the similarities
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------- parts


def make_data(spec: dict[str, Any]) -> Any:
    import rankbygene as rbg

    adata = rbg.datasets.synthetic(
        n_slides=1,
        n_spots=spec["n_spots"],
        n_genes=spec["n_genes"],
        spot_diameter=spec["spot_diameter"],
        seed=0,
    )
    rbg.RankByGene.setup_anndata(adata, layer="counts")
    return adata


def embedding_rows(spec: dict[str, Any], adata: Any, device: Any) -> list[dict[str, Any]]:
    import torch

    import rankbygene as rbg

    rows = []
    size, batch = spec["input_size"], spec["batch_size"]
    for encoder in spec["encoders"]:
        kwargs = {"img_size": size} if encoder.startswith("vit") else {}
        model = rbg.RankByGene(
            adata, image_encoder=encoder, input_size=size, n_latent=128, **kwargs
        )
        model.to_device(str(device))
        module = model.module.eval()
        images = torch.randn(batch, 3, size, size, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        module.teacher_backbone.to(memory_format=torch.channels_last)

        @torch.inference_mode()
        def forward(module=module, images=images) -> Any:
            with autocast(device):
                return module.embed_images(images, teacher=True)

        reset_peak(device)
        seconds = timed(forward, device, spec["repeats"])
        bare = batch / seconds
        rows.append(_row("embedding", f"{encoder} bare forward", batch, bare, 1.0, device))
        settings = rbg.model.inference_loader_settings(adata.n_obs, None, None, device)
        reset_peak(device)
        model.get_image_representation(progress=False)  # warm-up: workers, cudnn autotune
        start = time.perf_counter()
        model.get_image_representation(progress=False)
        synchronize(device)
        rate = adata.n_obs / (time.perf_counter() - start)
        name = (
            f"{encoder} pipeline (batch {settings['batch_size']}, "
            f"{settings['num_workers']} workers)"
        )
        rows.append(_row("embedding", name, settings["batch_size"], rate, rate / bare, device))
        del model, module, images
    return rows


def training_rows(spec: dict[str, Any], device: Any) -> list[dict[str, Any]]:
    import torch

    import rankbygene as rbg
    from rankbygene.data import BATCH_KEYS

    size, batch, n_genes = spec["input_size"], spec["batch_size"], spec["n_genes"]
    generator = torch.Generator().manual_seed(0)
    tensors = {
        BATCH_KEYS.image: torch.randn(batch, 3, size, size, generator=generator),
        BATCH_KEYS.image_weak: torch.randn(batch, 3, size, size, generator=generator),
        BATCH_KEYS.expression: torch.poisson(torch.full((batch, n_genes), 3.0)),
    }
    tensors = {k: v.to(device) for k, v in tensors.items()}
    rows, reference = [], None
    for objective, weights in OBJECTIVES.items():
        backbone = rbg.model.create_backbone(spec["train_encoder"], input_size=size)
        module = rbg.model.RankByGeneModule(n_genes, backbone, n_latent=128, **weights)
        module.to(device).train()
        module.student_backbone.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])

        def step(module=module, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                _, _, output = module(tensors)
            output.loss.backward()
            optimizer.step()
            module.update_teacher(0.99)

        reset_peak(device)
        seconds = timed(step, device, spec["repeats"])
        rate = batch / seconds
        reference = rate if objective == "contrastive only" else reference
        rows.append(_row("training step", objective, batch, rate, None, device))
        del module, optimizer
    for row in rows:
        row["ratio"] = row["items_per_s"] / reference
    return rows


def ranking_rows(spec: dict[str, Any], device: Any) -> list[dict[str, Any]]:
    import torch

    from rankbygene.losses import cosine_similarity_matrix, ranking_consistency_loss

    rows = []
    for batch in spec["rank_batches"]:
        generator = torch.Generator().manual_seed(batch)
        image = torch.randn(batch, 128, generator=generator).to(device).requires_grad_(True)
        genes = torch.randn(batch, 128, generator=generator).to(device)

        def loss(image=image, genes=genes) -> None:
            value = ranking_consistency_loss(
                cosine_similarity_matrix(image), cosine_similarity_matrix(genes)
            )
            value.backward()
            image.grad = None

        reset_peak(device)
        seconds = timed(loss, device, spec["repeats"])
        rows.append(_row("ranking loss", f"batch {batch}", batch, batch / seconds, None, device))
    return rows


def _row(
    part: str, name: str, batch: int, rate: float, ratio: float | None, device: Any
) -> dict[str, Any]:
    return {
        "part": part,
        "method": name,
        "batch": batch,
        "items_per_s": rate,
        "ms_per_batch": 1000 * batch / rate,
        "ratio": ratio,
        "peak_mb": peak_mb(device),
    }


# ---------------------------------------------------------------- driver


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print("\n" + header)
    line = f"{'part':14} {'method':52} {'batch':>6} {'items/s':>10} {'ms/batch':>9} "
    line += f"{'ratio':>6} {'peak MB':>9}"
    print(line)
    print("-" * len(line))
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(
            f"{row['part']:14} {row['method']:52} {row['batch']:6d} {row['items_per_s']:10.1f} "
            f"{row['ms_per_batch']:9.1f} {ratio:>6} {row['peak_mb']:9.0f}"
        )
    print(
        "\nratio: embedding, pipeline over bare forward of the same encoder; training step, "
        "over contrastive-only. peak MB: GPU memory allocated by torch (the CPU's resident "
        "memory on the CPU)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny settings on the CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_benchmark.csv"), help="CSV")
    parser.add_argument("--parts", nargs="+", default=["embedding", "training", "ranking"])
    args = parser.parse_args(argv)

    import torch

    spec = SMOKE if args.cpu_smoke else FULL
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to check the script on the CPU")
        return 1
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if "embedding" in args.parts:
        rows += embedding_rows(spec, make_data(spec), device)
    if "training" in args.parts:
        rows += training_rows(spec, device)
    if "ranking" in args.parts:
        rows += ranking_rows(spec, device)
    header = (
        f"{device_name(device)}; torch {torch.__version__}; inputs {spec['input_size']} px; "
        f"{time.perf_counter() - started:.0f} s"
    )
    print_table(rows, header)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "device"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "device": device_name(device)})
    print(f"rows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
