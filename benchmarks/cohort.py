"""Benchmark: embedding a cohort with ``rbg.tl.embed_slides`` in one process and in several.

A synthetic cohort of slides of three sizes (``rbg.datasets.synthetic_cohort``: many small
slides, fewer large ones, JPEG tiles) is written once, and an untrained model saved once. Each
setting is started by ``torchrun --standalone --nproc-per-node P`` (P = 1 too, so that every
row pays the same launcher) and embeds the whole cohort ``--repeats`` times, each time into a
fresh folder: the processes meet at a barrier of their gloo group, and the time runs from
there until ``embed_slides`` returns in the first process (it returns once every slide is
done). Loading the model and starting the processes are not timed.

Columns: processes x torch threads each, tiles embedded, seconds (best and median of the
runs), tiles per second (best run), the ratio to the first setting (one process, one thread),
and whether every run's files are those of the first setting byte for byte. ``--workers``
sets the DataLoader workers of each process (default 0, so that a row's processes are the only
ones that compute); on a GPU, tiles per GPU-hour are printed too.

Usage::

    python benchmarks/cohort.py                      # CPU: 1 and 2 processes (ResNet-18, 32 px)
    python benchmarks/cohort.py --smoke              # tiny settings: checks the script runs
    python benchmarks/cohort.py --device cuda --encoder vit_base_patch16_224 --input-size 224 \\
        --settings 1x8 --workers 8                   # the GPU figure, one process per GPU
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]

FULL = {"sizes": [80, 160, 320], "counts": [12, 6, 4], "settings": ["1x1", "1x2", "2x1"]}
SMOKE = {"sizes": [12, 24], "counts": [4, 4], "settings": ["1x1", "2x1"]}


# ---------------------------------------------------------------- one process of a setting


def worker(spec: dict[str, Any]) -> None:
    import pandas as pd
    import torch
    import torch.distributed as dist

    import rankbygene as rbg

    torch.set_num_threads(spec["threads"])
    model = rbg.RankByGene.load(spec["model"])
    model.to_device(spec["device"])
    cohort = pd.read_csv(spec["cohort"], index_col="slide_id")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # embed_slides takes part in a running group
    seconds = []
    for repeat in range(spec["repeats"]):
        if dist.is_initialized():
            dist.barrier()  # the clock starts when every process is ready
        started = time.perf_counter()
        done = rbg.tl.embed_slides(
            model,
            cohort["path"],
            Path(spec["out"]) / f"repeat_{repeat}",
            tile_size_um=spec["tile_um"],
            batch_size=spec["batch_size"],
            num_workers=spec["workers"],
            progress=False,
        )
        seconds.append(time.perf_counter() - started)
        if not (done["status"] == "embedded").all():
            raise RuntimeError(f"not every slide was embedded: {done['status'].value_counts()}")
    if dist.is_initialized():
        dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        result = {"seconds": seconds, "tiles": int(done["n_tiles"].sum())}
        Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings (the tests)")
    parser.add_argument("--settings", nargs="+", help="PROCESSESxTHREADS, e.g. 1x1 1x2 2x1")
    parser.add_argument("--encoder", default="resnet18", help="timm model name")
    parser.add_argument("--input-size", type=int, default=32, help="encoder input in pixels")
    parser.add_argument("--tile-um", type=float, default=64.0, help="tile side in microns")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (best kept)")
    parser.add_argument("--out", type=Path, help="write the table as CSV here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0

    sys.path.insert(0, str(REPO))
    preset = SMOKE if args.smoke else FULL
    settings = [_setting(text) for text in args.settings or preset["settings"]]
    with tempfile.TemporaryDirectory(prefix="rbg_cohort_") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        cohort, model = write_inputs(folder, preset, args)
        print(
            f"{sum(preset['counts'])} slides ({', '.join(map(str, preset['counts']))} of "
            f"{', '.join(map(str, preset['sizes']))} spots), {args.encoder} at "
            f"{args.input_size} px on {args.device}, written in "
            f"{time.perf_counter() - started:.0f} s"
        )
        rows = []
        for processes, threads in settings:
            spec = {
                "model": str(model),
                "cohort": str(cohort),
                "out": str(folder / f"features_{processes}x{threads}"),
                "result": str(folder / f"result_{processes}x{threads}.json"),
                "tile_um": args.tile_um,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "repeats": 1 if args.smoke else args.repeats,
                "threads": threads,
                "device": args.device,
            }
            result = run_setting(folder, spec, processes, threads)
            if result is None:
                return 1
            digests = {_digest(folder) for folder in Path(spec["out"]).iterdir()}
            result["digest"] = digests.pop() if len(digests) == 1 else "repeats differ"
            rows.append({"processes": processes, "threads": threads, **result})
        table = summarise(rows, args.device)
    print_table(table, args.device)
    if args.out is not None:
        with args.out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return 0


def write_inputs(folder: Path, preset: dict[str, Any], args: argparse.Namespace) -> tuple:
    """The cohort (slides of several sizes, one table) and a saved untrained model."""
    import pandas as pd
    import scvi

    import rankbygene as rbg

    parts = []
    for size, count in zip(preset["sizes"], preset["counts"], strict=True):
        part = rbg.datasets.synthetic_cohort(
            folder / f"slides_{size}", n_slides=count, n_spots=size, compression="jpeg", seed=size
        )
        parts.append(part.set_axis([f"n{size}_{s}" for s in part.index]).rename_axis("slide_id"))
    cohort = pd.concat(parts)
    cohort.to_csv(folder / "cohort.csv")
    scvi.settings.seed = 0
    adata = rbg.datasets.synthetic(n_slides=1, n_spots=20, n_genes=10, seed=0)
    rbg.RankByGene.setup_anndata(adata, layer="counts")
    model = rbg.RankByGene(
        adata, image_encoder=args.encoder, input_size=args.input_size, n_latent=64
    )
    model.save(folder / "model")
    return folder / "cohort.csv", folder / "model"


def run_setting(folder: Path, spec: dict, processes: int, threads: int) -> dict[str, Any] | None:
    path = folder / f"spec_{processes}x{threads}.json"
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(processes), __file__, "--worker", str(path)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONWARNINGS": "ignore",
    }
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        print(f"{processes}x{threads}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f"  ran {processes}x{threads} ({time.perf_counter() - started:.0f} s with start-up)")
    return json.loads(Path(spec["result"]).read_text())


def summarise(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    base = rows[0]["tiles"] / min(rows[0]["seconds"])
    table = []
    for row in rows:
        rate = row["tiles"] / min(row["seconds"])
        entry = {
            "processes": row["processes"],
            "threads": row["threads"],
            "tiles": row["tiles"],
            "seconds": round(min(row["seconds"]), 2),
            "seconds_median": round(float(np.median(row["seconds"])), 2),
            "tiles_per_s": round(rate, 1),
            "ratio": round(rate / base, 2),
            "same_files": row["digest"] == rows[0]["digest"] != "repeats differ",
        }
        if device != "cpu":
            entry["tiles_per_gpu_hour"] = round(rate * 3600 / row["processes"])
        table.append(entry)
    return table


def print_table(table: list[dict[str, Any]], device: str) -> None:
    header = (
        "| processes x threads | tiles | seconds (best) | seconds (median) | tiles/s | x first row "
        "| same files |"
    )
    if device != "cpu":
        header += " tiles per GPU-hour |"
    print("\n" + header)
    print("|" + " --- |" * (header.count("|") - 1))
    for row in table:
        line = (
            f"| {row['processes']} x {row['threads']} | {row['tiles']:,} | {row['seconds']:.1f} | "
            f"{row['seconds_median']:.1f} | "
            f"{row['tiles_per_s']:,.1f} | {row['ratio']:.2f} | "
            f"{'yes' if row['same_files'] else 'NO'} |"
        )
        if device != "cpu":
            line += f" {row['tiles_per_gpu_hour']:,} |"
        print(line)
    print(
        "\ntiles/s from the best of the runs; x first row: over the first setting's; same "
        "files: every .h5ad of every run equal, byte for byte, to the first setting's."
    )


def _setting(text: str) -> tuple[int, int]:
    processes, _, threads = text.partition("x")
    return int(processes), int(threads or 1)


def _digest(folder: Path) -> str:
    """One SHA-256 over the names and bytes of a folder's files."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
