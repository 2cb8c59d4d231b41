"""Benchmark: whole-slide inference, tiling + embedding against the bare encoder forward.

A pyramidal TIFF of at least 50,000 tissue tiles is generated once (a mosaic of synthetic H&E
sections, JPEG tiles of 256 px, levels halving in SubIFDs, ``mpp`` in the resolution tags; its
tiles are streamed to tifffile, so the slide is never in memory). Each method then runs on it in
a fresh subprocess, so that its peak resident memory (``getrusage`` maxrss) is its own; each
subprocess imports the same libraries and builds the same (untrained) model before measuring.

Methods
-------
tile_slide
    ``rbg.pp.tile_slide``: tissue detection on a thumbnail and the grid of tiles.
rbg embed, W workers
    The whole pipeline a user runs: ``tiles = rbg.pp.tile_slide(path)`` then
    ``model.get_image_representation(tiles, num_workers=W, batch_size=B)`` (read each tile from
    the pyramid, resize, normalise, forward), timed from the file to the embeddings.
rbg embed, defaults
    The same with ``model.get_image_representation(tiles)``: workers and batch size chosen by
    the package from the machine (``rbg.model.inference_loader_settings``).
bare forward
    The reference: the time spent in the model's image encoder (teacher backbone and projection
    head, ``module.embed_images``) on the same tiles in the same run (the 0-worker run, where
    nothing else runs at the same time; CUDA is synchronised around each call).
read + resize + normalise
    The rest of the 0-worker run: what the pipeline adds to the bare forward.

Library rows (``wsidata``/``lazyslide``/``tiffslide``, the ``wsi`` extra; left out when missing):

tile_slide on WSIData
    ``rbg.pp.tile_slide(wsidata.open_wsi(path, reader="tiffslide"))``: the package's tiler
    reading the slide through wsidata's TiffSlide reader.
LazySlide find_tissues + tile_tissues
    LazySlide's tissue detection and tiling (tiles of the same side at level 0, kept with at
    least half of their area on tissue, as ``tile_slide``), from opening the slide.
reader: rankbygene / wsidata tiffslide / wsidata openslide
    Reading the same level-0 tiles (the first ``--max-tiles`` of ``tile_slide``'s grid, in its
    order) with the package's reader (``TiffImage.read_region``) and wsidata's readers
    (``reader.get_region``). OpenSlide does not see pyramid levels kept in SubIFDs (the mosaic
    has them): it opens the slide as one level.
LazySlide feature_extraction
    ``lazyslide.tl.feature_extraction(wsi, rbg.model.FeatureExtractor(model))`` on LazySlide's
    tiles of the same side in microns, read at the coarsest level that suffices (``tile_tissues``
    with ``mpp``), the same batch size and 0 workers.

The ratio column is the method's throughput over the bare forward's (1.0: I/O costs nothing).

Usage::

    python benchmarks/wsi.py                            # resnet18, input 32, CPU, >= 50k tiles
    python benchmarks/wsi.py --input-size 224 --encoder resnet50 --device cuda --workers 0 4 8
    python benchmarks/wsi.py --slide /data/big.svs --tile-um 112   # a real slide instead
    python benchmarks/wsi.py --max-tiles 5000 --workers 0          # short: embed/read 5000 tiles
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
SECTION = 3072  # side of one mosaic cell, divisible by 2**10 so that every level aligns
TILE = 256


# ---------------------------------------------------------------- the slide


def write_mosaic(path: Path, cells: tuple[int, int], mpp: float, n_sections: int = 4) -> Path:
    """A mosaic of synthetic sections written tile by tile as a JPEG pyramidal TIFF."""
    import tifffile
    from PIL import Image

    from rankbygene.datasets import synthetic

    adata = synthetic(n_slides=n_sections, n_spots=1000, n_genes=5, n_regions=3, seed=0)
    sections = []
    for lib in adata.uns["spatial"]:
        image = adata.uns["spatial"][lib]["images"]["hires"]
        sections.append(np.ascontiguousarray(image[:SECTION, :SECTION]))
    n_levels = 1
    while max(cells) * SECTION >> n_levels > 1024:
        n_levels += 1
    pyramids = [[s] for s in sections]
    for pyramid in pyramids:
        for level in range(1, n_levels):
            side = SECTION >> level
            pyramid.append(
                np.asarray(Image.fromarray(pyramid[0]).resize((side, side), Image.Resampling.BOX))
            )
    rows, cols = cells

    def tiles(level: int):
        cell = SECTION >> level
        height, width = rows * cell, cols * cell
        for y0 in range(0, height, TILE):
            for x0 in range(0, width, TILE):
                out = np.full((TILE, TILE, 3), 241, dtype=np.uint8)
                # fill from the (at most four) cells the tile overlaps
                for cy in range(y0 // cell, min(rows, (y0 + TILE - 1) // cell + 1)):
                    for cx in range(x0 // cell, min(cols, (x0 + TILE - 1) // cell + 1)):
                        image = pyramids[(cy * 3 + cx) % len(pyramids)][level]
                        ty0, tx0 = max(y0, cy * cell), max(x0, cx * cell)
                        ty1 = min(y0 + TILE, (cy + 1) * cell, height)
                        tx1 = min(x0 + TILE, (cx + 1) * cell, width)
                        out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0] = image[
                            ty0 - cy * cell : ty1 - cy * cell, tx0 - cx * cell : tx1 - cx * cell
                        ]
                yield out

    options = {
        "dtype": np.uint8,
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": 90},
        "metadata": None,
        "resolutionunit": "CENTIMETER",
    }
    tmp = path.with_suffix(".partial.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level in range(n_levels):
            cell = SECTION >> level
            ppcm = 1e4 / (mpp * 2**level)
            extra = (
                {"subifds": n_levels - 1, "description": f"rankbygene benchmark|MPP = {mpp}"}
                if level == 0
                else {"subfiletype": 1}
            )
            tif.write(
                tiles(level),
                shape=(rows * cell, cols * cell, 3),
                resolution=(ppcm, ppcm),
                **options,
                **extra,
            )
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- methods (in a subprocess)


def make_model(spec: dict[str, Any]) -> Any:
    import scvi

    import rankbygene as rbg

    scvi.settings.seed = 0
    adata = rbg.datasets.synthetic(n_slides=1, n_spots=20, n_genes=10, seed=0)
    rbg.RankByGene.setup_anndata(adata, layer="counts")
    model = rbg.RankByGene(
        adata, image_encoder=spec["encoder"], input_size=spec["input_size"], n_latent=64
    )
    model.to_device(spec["device"])
    return model


def worker(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import rankbygene as rbg

    torch.set_num_threads(spec["threads"])
    model = make_model(spec)
    base = _maxrss_mb()
    tile_args = {"tile_size_um": spec["tile_um"], "mpp": spec["mpp"]}
    children = forward_seconds = chosen = None
    limit = spec.get("max_tiles")
    start = time.perf_counter()
    if method == "tile":
        n = rbg.pp.tile_slide(spec["slide"], **tile_args).n_obs
    elif method == "tile_wsi":
        n = rbg.pp.tile_slide(_open_wsi(spec, "tiffslide"), **tile_args).n_obs
    elif method == "zs_tile":
        import lazyslide as zs

        wsi = _open_wsi(spec, "tiffslide")
        zs.pp.find_tissues(wsi)
        side = int(round(spec["tile_um"] / wsi.properties.mpp))
        zs.pp.tile_tissues(wsi, side, background_fraction=0.5)
        n = len(wsi.shapes["tiles"])
    elif method.startswith("read_"):
        # the tiles' corners were written by the driver: this process's peak is the reads'
        corners = np.load(spec["corners"])
        side = int(corners[0, 2])
        if method == "read_rbg":
            reader = rbg.io.open_image(spec["slide"], mpp=spec["mpp"])
            read = lambda x, y: reader.read_region(x, y, side, side)  # noqa: E731
        else:
            wsi = _open_wsi(spec, method.split("_")[1])
            read = lambda x, y: wsi.reader.get_region(x, y, side, side, level=0)  # noqa: E731
        start = time.perf_counter()
        checksum = 0
        for x, y, _ in corners:
            checksum += int(read(int(x), int(y))[side // 2, side // 2, 0])
        n = len(corners)
    elif method == "zs_embed":
        import lazyslide as zs
        from spatialdata.models import ShapesModel

        wsi = _open_wsi(spec, "tiffslide")
        zs.pp.find_tissues(wsi)
        # tiles of tile_um microns at the encoder's input size: read from the coarsest level
        size = spec["input_size"]
        zs.pp.tile_tissues(wsi, size, mpp=spec["tile_um"] / size, background_fraction=0.5)
        if limit is not None:
            wsi.shapes["tiles"] = ShapesModel.parse(wsi.shapes["tiles"].iloc[:limit])
        extractor = rbg.model.FeatureExtractor(model)
        start = time.perf_counter()
        features = zs.tl.feature_extraction(
            wsi,
            extractor,
            batch_size=spec["batch_size"],
            num_workers=0,
            pbar=False,
            device=spec["device"],
            return_features=True,
        )
        n = len(features)
    elif method.startswith("embed"):
        workers = None if method == "embed_default" else int(method.split("_")[1])
        forward_seconds = _time_forward(model.module, torch.device(spec["device"]))
        tiles = rbg.pp.tile_slide(spec["slide"], **tile_args)
        if limit is not None:
            tiles = tiles[:limit].copy()
        loader = {"batch_size": spec["batch_size"], "num_workers": workers}
        if workers is None:
            loader = rbg.model.inference_loader_settings(tiles.n_obs, None, None, model.device)
            chosen = {k: loader[k] for k in ("batch_size", "num_workers")}
            workers, loader = loader["num_workers"], {}
        embedding = model.get_image_representation(tiles, progress=False, **loader)
        n = len(embedding)
        forward_seconds = forward_seconds[0]
        if workers:
            children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    else:
        raise ValueError(f"unknown method {method!r}")
    return {
        "n": n,
        "seconds": time.perf_counter() - start,
        "forward_seconds": forward_seconds,
        "peak_mb": _maxrss_mb(),
        "base_mb": base,
        "children_mb": children,
        "chosen": chosen,
    }


def _time_forward(module: Any, device: Any) -> list[float]:
    """Wrap ``module.embed_images`` to add its time to the returned one-item list."""
    import torch

    total = [0.0]
    embed = module.embed_images

    def timed(*args: Any, **kwargs: Any) -> Any:
        if device.type == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        out = embed(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total[0] += time.perf_counter() - tick
        return out

    module.embed_images = timed
    return total


def _open_wsi(spec: dict[str, Any], reader: str) -> Any:
    import wsidata

    wsi = wsidata.open_wsi(spec["slide"], store=None, reader=reader)
    if spec["mpp"] is not None:
        wsi.set_mpp(spec["mpp"])
    return wsi


def has_wsi_libraries() -> bool:
    """Whether wsidata, lazyslide and tiffslide are installed (the ``wsi`` extra)."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("wsidata", "lazyslide", "tiffslide"))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ---------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, help="a slide to use instead of the mosaic")
    parser.add_argument("--slide-dir", type=Path, help="where the mosaic is kept (reused)")
    parser.add_argument("--cells", type=int, nargs=2, default=[9, 11], help="mosaic rows, cols")
    parser.add_argument("--mpp", type=float, default=None, help="override the slide's mpp")
    parser.add_argument("--tile-um", type=float, default=112.0, help="tile side in microns")
    parser.add_argument("--encoder", default="resnet18", help="timm model name")
    parser.add_argument("--input-size", type=int, default=32, help="encoder input in pixels")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        help="embed and read only the first N tiles (default: all); tiling is whole-slide",
    )
    parser.add_argument(
        "--no-library",
        action="store_true",
        help="leave out the wsidata/LazySlide rows (they need the wsi extra)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
        help="torch threads (default: OMP_NUM_THREADS, else every CPU)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))))
        return 0

    with tempfile.TemporaryDirectory(prefix="rbg_wsi_") as tmp:
        slide = args.slide
        if slide is None:
            folder = args.slide_dir or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            slide = folder / f"mosaic_{args.cells[0]}x{args.cells[1]}.tif"
            if not slide.is_file():
                started = time.perf_counter()
                sys.path.insert(0, str(REPO))
                write_mosaic(slide, tuple(args.cells), mpp=1.0)
                took = time.perf_counter() - started
                print(f"wrote {slide} ({slide.stat().st_size / 1e6:.0f} MB) in {took:.0f} s")
        spec = {
            "slide": str(slide),
            "mpp": args.mpp,
            "tile_um": args.tile_um,
            "encoder": args.encoder,
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "device": args.device,
            "threads": args.threads,
            "max_tiles": args.max_tiles,
        }
        workers = [0] + [w for w in args.workers if w != 0]
        methods = ["tile"] + [f"embed_{w}" for w in workers] + ["embed_default"]
        library = not args.no_library and has_wsi_libraries()
        if library:
            methods[1:1] = ["tile_wsi", "zs_tile", "read_rbg", "read_tiffslide", "read_openslide"]
            methods.append("zs_embed")
        elif not args.no_library:
            print(
                "wsidata, lazyslide or tiffslide missing (pip install 'rankbygene[wsi]'): "
                "no library rows."
            )
        if library:
            spec["corners"] = write_corners(spec, Path(tmp) / "corners.npy")
        results = {}
        for method in methods:
            result = run_subprocess(method, spec)
            if result is None:
                return 1
            results[method] = result
        print_table(results, spec)
        if library:
            print_formats()
        if args.slide is None and results["tile"]["n"] < 50_000:
            print(f"\nonly {results['tile']['n']} tiles: pass larger --cells for 50,000 or more.")
    return 0


def write_corners(spec: dict[str, Any], path: Path) -> str:
    """Top-left corners and side of the first ``max_tiles`` tiles of ``tile_slide``'s grid."""
    sys.path.insert(0, str(REPO))
    import rankbygene as rbg

    tiles = rbg.pp.tile_slide(spec["slide"], tile_size_um=spec["tile_um"], mpp=spec["mpp"])
    library = tiles.obs["library_id"].iloc[0]
    side = int(tiles.uns["spatial"][library]["scalefactors"]["spot_diameter_fullres"])
    corners = (tiles.obsm["spatial"][: spec["max_tiles"]] - side / 2).astype(np.int64)
    np.save(path, np.column_stack([corners, np.full(len(corners), side)]))
    return str(path)


def run_subprocess(method: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    command = [sys.executable, __file__, "--worker", method, "--spec", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("PYTHONWARNINGS", "ignore")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        print(f"{label(method)}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f"  ran {label(method)} ({time.perf_counter() - started:.0f} s with start-up)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def label(method: str) -> str:
    if method == "embed_default":
        return "rbg embed, defaults"
    if method.startswith("embed"):
        return f"rbg embed, {method.split('_')[1]} workers"
    return {
        "tile": "tile_slide",
        "forward": "bare forward",
        "rest": "read + resize + normalise",
        "tile_wsi": "tile_slide on WSIData",
        "zs_tile": "LazySlide tissue + tiles",
        "read_rbg": "reader: rankbygene",
        "read_tiffslide": "reader: wsidata tiffslide",
        "read_openslide": "reader: wsidata openslide",
        "zs_embed": "LazySlide embed, 0 workers",
    }[method]


def print_formats() -> None:
    """The file formats each reader opens (by extension)."""
    import wsidata

    print("\nformats (by extension):")
    print(
        "  rankbygene: tifffile .tif .tiff .svs .btf .ome.tif(f) .qptiff (pyramids in pages or "
        "SubIFDs); OpenSlide (openslide extra) .ndpi .mrxs .vms .vmu .scn .bif .svslide; PIL "
        "JPEG/PNG/other images; in-memory and lazy (dask/zarr) arrays"
    )
    for name in ("tiffslide", "openslide", "bioformats", "pylibczi", "isyntax", "cucim"):
        try:
            reader = wsidata.READERS[name]
        except KeyError:
            continue
        here = "installed" if reader.is_available() else "not installed"
        extensions = " ".join(reader.extensions or ()) or "any (tried by content)"
        print(f"  wsidata {name} ({here}): {extensions}")


def print_table(results: dict[str, Any], spec: dict[str, Any]) -> None:
    import torch

    embed = results["embed_0"]
    rows = {"forward": {**embed, "seconds": embed["forward_seconds"], "children_mb": None}}
    rows["rest"] = {**rows["forward"], "seconds": embed["seconds"] - embed["forward_seconds"]}
    rows.update(results)
    ref_rate = embed["n"] / embed["forward_seconds"]
    print(
        f"\nslide {spec['slide']}; tiles of {spec['tile_um']} um; {spec['encoder']} at "
        f"{spec['input_size']} px, batch {spec['batch_size']}, {spec['device']}, "
        f"{spec['threads']} torch threads, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    header = (
        f"{'method':26} {'tiles':>7} {'seconds':>8} {'tiles/s':>9} {'x forward':>9} "
        f"{'peak RSS MB':>11} {'over base MB':>12} {'workers MB':>10}"
    )
    print("\n" + header)
    print("-" * len(header))
    for method, row in rows.items():
        rate = row["n"] / row["seconds"]
        workers = f"{row['children_mb']:.0f}" if row.get("children_mb") else "-"
        memory = (
            f"{row['peak_mb']:11.0f} {row['peak_mb'] - row['base_mb']:12.0f}"
            if method not in ("forward", "rest")
            else f"{'-':>11} {'-':>12}"
        )
        print(
            f"{label(method):26} {row['n']:7d} {row['seconds']:8.1f} {rate:9.1f} "
            f"{rate / ref_rate:9.2f} {memory} {workers:>10}"
        )
    chosen = results["embed_default"]["chosen"]
    print(
        f"\ndefaults chose batch {chosen['batch_size']} and {chosen['num_workers']} workers "
        f"on this machine: {results['embed_default']['seconds']:.1f} s against "
        f"{embed['forward_seconds']:.1f} s of bare forward."
    )
    print(
        "\nx forward: throughput over the bare forward's (tile_slide: tiles found per second). "
        "bare forward and read + resize + normalise split the 0-worker run. peak RSS: the "
        "process's maximum resident memory; over base: above its RSS after imports and building "
        "the model; workers MB: the largest DataLoader worker's peak RSS."
    )
    if "zs_tile" in results:
        print(
            "Library rows: tile_slide on WSIData and LazySlide tissue + tiles tile the whole "
            "slide (tiles found per second); reader rows read the same level-0 tiles (the first "
            "--max-tiles of tile_slide's grid); LazySlide embed runs the package's encoder as a "
            "LazySlide feature extractor on LazySlide's tiles of the same size in microns."
        )


if __name__ == "__main__":
    sys.exit(main())
