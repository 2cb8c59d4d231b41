"""Benchmark: per-spot patch extraction, rankbygene's PatchExtractor against squidpy.

Every method extracts the patches of the same spots (all spots of the her2st sections, or of a
synthetic data set when the her2st folder is absent), resized to the same size, in a fresh
subprocess, so that its peak resident memory (``getrusage`` maxrss) is its own. Each subprocess
imports the same libraries (torch, squidpy, rankbygene) before measuring, so baselines match.

Methods
-------
squidpy
    ``sq.im.ImageContainer(image, lazy=False)`` per library (one image in memory at a time), then
    ``generate_spot_crops(..., scale=patch_size / crop_side, as_array="image")``.
rbg no cache (cold)
    ``PatchExtractor(cache=None)``, spots in AnnData order; includes decoding each image.
rbg memory: materialize
    ``PatchExtractor(cache="memory").materialize()``: decoding and filling the cache.
rbg memory: cached reads
    Reading every patch again from the filled memory cache (same process as the row above).
rbg disk: materialize / rbg disk: reuse (new process)
    Filling a disk cache, then, in a fresh process, reading every patch from it (a later run).
rbg DataLoader, 2 workers
    ``SpotPatchDataset`` (``eval_transform``: normalised float tensors) through a ``DataLoader``
    with 2 workers and no cache (each worker decodes the images it needs); the workers' peak
    memory is reported in its own column.
rbg DataLoader, 2 workers, cached
    The same after ``materialize()`` of a memory cache in the main process (the training set-up);
    only the pass over the loader is timed.

Usage::

    python benchmarks/patches.py                       # her2st if found, else synthetic
    python benchmarks/patches.py --data /path/her2st --sections C2 C3
    python benchmarks/patches.py --synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "her2st"
SQUIDPY = "squidpy"
METHODS = {
    SQUIDPY: "squidpy generate_spot_crops",
    "nocache": "rbg no cache (cold)",
    "memory": "rbg memory: materialize",
    "memory_warm": "rbg memory: cached reads",
    "disk": "rbg disk: materialize",
    "disk_reuse": "rbg disk: reuse (new process)",
    "loader": "rbg DataLoader, 2 workers",
    "loader_cached": "rbg DataLoader, 2 workers, cached",
}
N_SAMPLES = 8  # patches saved per method to check that all methods see the same pixels


# ---------------------------------------------------------------- data


def build_adata(spec: dict[str, Any]) -> Any:
    """The AnnData of the benchmark: her2st sections (images on disk) or synthetic (in memory)."""
    import pandas as pd
    from anndata import AnnData

    if spec["data"] is None:
        from rankbygene.datasets._synthetic import synthetic

        return synthetic(n_slides=2, n_spots=spec["synthetic_spots"], n_genes=10, seed=0)
    root = Path(spec["data"])
    frames, spatial = [], {}
    for section in spec["sections"]:
        spots = pd.read_csv(root / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
        spots = spots[spots["selected"] == 1]
        images = sorted((root / "ST-imgs" / section[0] / section).glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"No image for section {section} under {root / 'ST-imgs'}")
        xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=float)
        # Spots are 100 um across and 200 um apart: half the median neighbour distance.
        distance = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
        np.fill_diagonal(distance, np.inf)
        diameter = float(np.median(distance.min(axis=1))) / 2
        frames.append(
            pd.DataFrame(
                {"library_id": section, "x": xy[:, 0], "y": xy[:, 1]},
                index=[f"{section}_{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)],
            )
        )
        spatial[section] = {
            "images": {},
            "scalefactors": {"spot_diameter_fullres": diameter},
            "metadata": {"source_image_path": str(images[0])},
        }
    obs = pd.concat(frames)
    adata = AnnData(
        np.zeros((len(obs), 1), dtype=np.float32),
        obs=obs[["library_id"]],
        obsm={"spatial": obs[["x", "y"]].to_numpy()},
    )
    adata.uns["spatial"] = spatial
    return adata


# ---------------------------------------------------------------- methods (in a subprocess)


def run_squidpy(adata: Any, spec: dict[str, Any]) -> tuple[int, list[np.ndarray]]:
    import squidpy as sq

    n, samples = 0, []
    for lib in adata.obs["library_id"].unique():
        sub = adata[adata.obs["library_id"] == lib]
        entry = sub.uns["spatial"][lib]
        path = entry["metadata"].get("source_image_path")
        image = path if path else entry["images"]["hires"]
        container = sq.im.ImageContainer(image, layer="image", lazy=False)
        diameter = entry["scalefactors"]["spot_diameter_fullres"]
        side = 2 * int(round(diameter // 2 * spec["patch_scale"])) + 1  # squidpy's crop side
        crops = container.generate_spot_crops(
            sub,
            library_id=lib,
            spot_scale=spec["patch_scale"],
            scale=spec["patch_size"] / side,
            as_array="image",
            squeeze=True,
        )
        for crop in crops:
            n += 1
            if len(samples) < N_SAMPLES:
                samples.append(np.asarray(crop))
        del container, crops
    return n, samples


def make_extractor(adata: Any, spec: dict[str, Any], **kwargs: Any) -> Any:
    from rankbygene.data import PatchExtractor

    return PatchExtractor(
        adata,
        library_key="library_id",
        patch_scale=spec["patch_scale"],
        patch_size=spec["patch_size"],
        out_of_bounds="pad",
        **kwargs,
    )


def read_all(patches: Any) -> tuple[int, list[np.ndarray]]:
    n, samples = 0, []
    for i in patches.indices:
        patch = patches[i]
        n += 1
        if len(samples) < N_SAMPLES:
            samples.append(patch)
    return n, samples


def run_loader(patches: Any) -> tuple[int, list[np.ndarray]]:
    from torch.utils.data import DataLoader

    from rankbygene.data import SpotPatchDataset, eval_transform

    dataset = SpotPatchDataset(patches, transform=eval_transform())
    n = 0
    for batch in DataLoader(dataset, batch_size=32, num_workers=2):
        n += len(batch["index"])
    return n, []


def worker(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one method; return its timings and memory."""
    import squidpy  # noqa: F401 - same imports in every subprocess, for comparable baselines
    import torch  # noqa: F401

    import rankbygene.data  # noqa: F401

    adata = build_adata(spec)
    cache_dir = Path(spec["cache_dir"])
    rows = []
    base = _maxrss_mb()
    start = time.perf_counter()
    if method == SQUIDPY:
        n, samples = run_squidpy(adata, spec)
    elif method == "nocache":
        n, samples = read_all(make_extractor(adata, spec))
    elif method == "memory":
        patches = make_extractor(adata, spec, cache="memory").materialize(progress=False)
        rows.append(("memory", len(patches.indices), time.perf_counter() - start, _maxrss_mb()))
        start = time.perf_counter()
        n, samples = read_all(patches)
        method = "memory_warm"
    elif method == "disk":
        patches = make_extractor(adata, spec, cache="disk", cache_dir=cache_dir)
        patches.materialize(progress=False)
        n, samples = len(patches.indices), []
    elif method == "disk_reuse":
        patches = make_extractor(adata, spec, cache="disk", cache_dir=cache_dir)
        if patches.n_cached != len(patches.indices):
            raise RuntimeError("the disk cache of the previous run was not found")
        n, samples = read_all(patches)
    elif method == "loader":
        n, samples = run_loader(make_extractor(adata, spec))
    elif method == "loader_cached":
        patches = make_extractor(adata, spec, cache="memory").materialize(progress=False)
        base = _maxrss_mb()
        start = time.perf_counter()
        n, samples = run_loader(patches)
    else:
        raise ValueError(f"unknown method {method!r}")
    rows.append((method, n, time.perf_counter() - start, _maxrss_mb()))
    if samples:
        np.save(cache_dir / f"samples_{method}.npy", np.stack([_as_uint8(s) for s in samples]))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "rows": [
            {"method": m, "n": k, "seconds": s, "peak_mb": peak, "base_mb": base}
            for m, k, s, peak in rows
        ],
        "children_mb": children if method.startswith("loader") else None,
    }


def _as_uint8(patch: np.ndarray) -> np.ndarray:
    patch = np.asarray(patch)
    if patch.dtype != np.uint8:
        scale = 255.0 if patch.max() <= 1.0 else 1.0
        patch = np.clip(patch * scale + 0.5, 0, 255).astype(np.uint8)
    return patch[..., :3]


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="her2st folder")
    parser.add_argument("--sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    parser.add_argument("--synthetic", action="store_true", help="use synthetic data")
    parser.add_argument("--synthetic-spots", type=int, default=400, help="spots per slide")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--patch-scale", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "memory_warm"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))))
        return 0

    use_her2st = not args.synthetic and args.data.is_dir()
    if not use_her2st and not args.synthetic:
        print(f"her2st not found at {args.data}: using synthetic data.")
    with tempfile.TemporaryDirectory(prefix="rbg_bench_") as tmp:
        spec = {
            "data": str(args.data) if use_her2st else None,
            "sections": args.sections,
            "synthetic_spots": args.synthetic_spots,
            "patch_size": args.patch_size,
            "patch_scale": args.patch_scale,
            "cache_dir": tmp,
        }
        describe(spec)
        results = {}
        for method in args.methods:
            if method == "disk_reuse" and "disk" not in results:
                continue  # needs the cache that "disk" fills
            results.update(run_subprocess(method, spec))
        print_table(results, spec, Path(tmp))
    return 0


def describe(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(REPO))
    adata = build_adata(spec)
    libs = adata.obs["library_id"].value_counts(sort=False).to_dict()
    where = f"her2st {spec['data']}" if spec["data"] else "synthetic (in-memory images)"
    print(f"data: {where}; {adata.n_obs} spots in {len(libs)} libraries {libs}")
    print(
        f"patch: spot diameter x {spec['patch_scale']} resized to "
        f"{spec['patch_size']} px; {os.cpu_count()} CPUs\n"
    )


def run_subprocess(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", method, "--spec", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("PYTHONWARNINGS", "ignore")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        print(f"{METHODS[method]}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return {}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  ran {METHODS[method]} ({time.perf_counter() - started:.0f} s with start-up)")
    out = {}
    for row in result["rows"]:
        row["children_mb"] = result["children_mb"]
        out[row["method"]] = row
    return out


def print_table(results: dict[str, Any], spec: dict[str, Any], tmp: Path) -> None:
    reference = results.get(SQUIDPY)
    header = (
        f"{'method':34} {'patches':>7} {'seconds':>8} {'patches/s':>10} {'x squidpy':>9} "
        f"{'peak RSS MB':>11} {'over base MB':>12} {'mem x squidpy':>13} {'workers MB':>10}"
    )
    print("\n" + header)
    print("-" * len(header))
    for method, row in results.items():
        rate = row["n"] / row["seconds"]
        over = row["peak_mb"] - row["base_mb"]
        speed = mem = "-"
        workers = f"{row['children_mb']:.0f}" if row["children_mb"] else "-"
        if reference is not None:
            speed = f"{rate / (reference['n'] / reference['seconds']):.2f}"
            ref_over = reference["peak_mb"] - reference["base_mb"]
            if ref_over > 0 and not row["children_mb"]:
                mem = f"{over / ref_over:.2f}"
        print(
            f"{METHODS[method]:34} {row['n']:7d} {row['seconds']:8.2f} {rate:10.1f} {speed:>9} "
            f"{row['peak_mb']:11.0f} {over:12.0f} {mem:>13} {workers:>10}"
        )
    print(
        "\npeak RSS: the main process's maximum resident memory; over base: above its RSS after "
        "imports and building the AnnData (for 'cached' loader: after materialize); workers MB: "
        "the largest DataLoader worker's peak RSS (it counts pages shared with the parent)."
    )
    compare_samples(tmp)


def compare_samples(tmp: Path) -> None:
    """Mean absolute pixel difference of the first patches between methods (same spots?)."""
    samples = {p.stem.removeprefix("samples_"): np.load(p) for p in sorted(tmp.glob("samples_*"))}
    if SQUIDPY not in samples or "nocache" not in samples:
        return
    ours, theirs = samples["nocache"].astype(float), samples[SQUIDPY].astype(float)
    if ours.shape != theirs.shape:
        print(f"sample shapes differ: ours {ours.shape}, squidpy {theirs.shape}")
        return
    diff = np.abs(ours - theirs).mean()
    spread = np.abs(ours - ours[::-1]).mean()
    print(
        f"first {len(ours)} patches, mean |rbg - squidpy| = {diff:.1f} grey levels "
        f"(vs {spread:.1f} between different spots): same spots, same field of view."
    )
    for method in ("memory_warm", "disk_reuse"):
        if method in samples:
            same = np.array_equal(samples[method], samples["nocache"])
            print(f"{METHODS[method]}: identical to no cache: {same}")


if __name__ == "__main__":
    sys.exit(main())
