"""Embedding a cohort of whole-slide images, one verified ``.h5ad`` per slide; resumable.

:func:`embed_slides` tiles and embeds slide by slide, in one process or in many: the ranks of a
``torch.distributed`` job (``torchrun``) share out the slides left to do, largest first, and
the tasks of a job array each take a fixed shard. The files are the same whichever way they
were made, and a rerun embeds only what no process finished.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd
from anndata import AnnData

from rankbygene._constants import IMAGE_EMBEDDING_KEY, SLIDE_CHECKSUM_KEY, UNS_KEY
from rankbygene._docs import d
from rankbygene._layout import ImageSource
from rankbygene._logging import logger
from rankbygene._progress import progress_bar
from rankbygene._version import __version__
from rankbygene.data import PatchExtractor
from rankbygene.pp._tile import open_slide, tile_slide
from rankbygene.pp._tile import slide_id as slide_id_of
from rankbygene.tl._processes import (
    Processes,
    Shard,
    balance,
    joined_processes,
    portable,
    resolve_shard,
)
from rankbygene.tl._slide_files import (
    SUFFIX,
    checked_arrays,
    checksum,
    file_stamp,
    json_value,
    model_fingerprint,
    read_done,
    remove_partials,
    settings_differences,
    write_atomic,
)

if TYPE_CHECKING:
    from rankbygene.model import RankByGene

__all__ = ["embed_slides"]

#: Columns of the table that :func:`embed_slides` returns.
_COLUMNS = ["path", "output", "n_tiles", "status", "error"]


@d.dedent
def embed_slides(
    model: RankByGene,
    paths: Sequence[str | Path] | Mapping[str, str | Path] | pd.Series,
    out_dir: str | Path,
    tile_size_um: float = 112.0,
    mpp: float | None = None,
    kind: Literal["embedding", "backbone"] = "embedding",
    batch_size: int | None = None,
    num_workers: int | None = None,
    precision: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    on_error: Literal["skip", "raise"] = "skip",
    shard: Shard = None,
    **tile_kwargs: Any,
) -> pd.DataFrame:
    """Tile and embed each slide of a cohort, one ``.h5ad`` per slide; resumable, parallel.

    For each slide: :func:`rankbygene.pp.tile_slide`, then
    :meth:`RankByGene.get_image_representation` of the tiles, written to
    ``out_dir/<slide_id>.h5ad`` (the tiles' AnnData with ``obsm["X_rankbygene"]`` and
    ``uns["rankbygene"]``) through a temporary file, synced to disk and renamed when complete,
    with the file mode the umask gives new files. Slides whose file exists, written with the
    same model and settings from the same slide file (size and modification time), are skipped:
    an interrupted run resumes without redoing finished slides. A finished file is verified
    first: ``uns["rankbygene"]["sha256"]`` holds the SHA-256 of its settings, slide stamp,
    ``obsm["X_rankbygene"]`` and ``obsm["spatial"]``, and a file that cannot be read, does not
    match its checksum or has NaN embeddings is embedded again, with a logged warning (files
    written before checksums were stored are only checked for NaN). Temporary files that a
    killed run left for these slides are removed at the start, so two runs must not embed the
    same slides into the same ``out_dir`` at once. Every slide is opened and its microns per
    pixel checked before any work starts.

    A slide that fails later (a truncated file that only breaks when its tiles are decoded, an
    error in the model) does not stop the cohort by default: it is logged as a warning, its row
    gets status ``"failed"`` and the error, the other slides go on, and a summary of the
    failures is logged at the end. If every slide fails, the first error is raised.

    **Several processes.** Called in every process of a ``torch.distributed`` job (a script run
    with ``torchrun --nproc-per-node N``, or inside a running process group), the processes
    check the finished files together, then share out the slides left to do, largest file
    first to the process with the least work so far, so that they finish together; each
    embeds on the GPU of its local rank when the model is on a GPU (the model is moved there),
    and all of them return the whole table once every slide is done. With ``shard``, the call
    is one task of a job array (SLURM, Grid Engine): it takes only its fixed share of the
    cohort, divided by file size the same way. Both combine (an array of ``torchrun`` jobs),
    and every way writes the same files as one process does: a slide finished by any process
    is skipped by all, and one that a killed process left half-written is embedded again.
    ``out_dir`` must be a folder that all processes see (a shared file system).

    Parameters
    ----------
    model
        A trained image model (not one on precomputed features).
    paths
        Slide files; slide ids are the file names without extension, or the keys/index of a
        mapping/Series (e.g. ``cohort["path"]`` of :func:`~rankbygene.datasets.synthetic_cohort`).
    out_dir
        Folder of the per-slide files (created if needed).
    tile_size_um, mpp
        Tile side in microns; microns per pixel overriding the files' (for every slide).
    kind
        ``"embedding"`` (projected, L2-normalised) or ``"backbone"`` features.
    %(batch_size)s
    %(num_workers)s
    precision
        Of the encoder's forward pass, as in :meth:`RankByGene.get_image_representation`
        (default: bf16-mixed on GPUs with bf16, else float32).
    overwrite
        Redo slides already done (also those done with other settings, which otherwise raise).
    progress
        Progress bars (default: a bar over slides, and one per slide of more than 10 batches;
        in the first process only, when there are several).
    on_error
        ``"skip"``: a slide that fails is reported and the others go on (see above; rerunning
        retries the failed slides only); ``"raise"``: the first failure stops the run, with
        the slides finished so far kept (under ``torchrun``, the launcher then stops the other
        processes).
    shard
        ``(index, count)``: embed only shard ``index`` (0-based) of ``count``, one task of a job
        array; ``"array"``: the same, read from the job array's environment
        (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT`` and
        ``SLURM_ARRAY_TASK_STEP``, or Grid Engine's ``SGE_TASK_ID``, ``SGE_TASK_FIRST``,
        ``SGE_TASK_LAST`` and ``SGE_TASK_STEPSIZE``); ``None``: the whole cohort.
    **tile_kwargs
        Passed to :func:`~rankbygene.pp.tile_slide` (``tissue_threshold``, ``level``, ...).

    Returns
    -------
    DataFrame indexed by ``slide_id``: ``path``, ``output`` (the ``.h5ad``), ``n_tiles``,
    ``status`` (``"embedded"``, ``"skipped"`` or ``"failed"``) and ``error`` (the error of a
    failed slide, else ``None``); with ``shard``, the rows of the shard's slides. Pass it to
    :func:`slide_features`, which leaves out the failed slides (they have no file) with a
    warning, or pass it ``out_dir`` once every task is done.

    Raises
    ------
    FileNotFoundError, ValueError
        Before any slide is embedded (in every process): a slide is missing or cannot be
        opened, has no microns per pixel (and ``mpp`` is not given), two slides share an id, a
        finished file was written with other settings (without ``overwrite``), or ``shard`` is
        out of range or not found in the environment.
    Exception
        Whatever a slide raised: every slide failed, or ``on_error="raise"``.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> cohort = rbg.datasets.synthetic_cohort("cohort/", n_slides=40)  # doctest: +SKIP
    >>> done = rbg.tl.embed_slides(model, cohort["path"], "features/")  # doctest: +SKIP
    >>> features = rbg.tl.slide_features(done)  # mean over tiles  # doctest: +SKIP

    One task of a SLURM job array (``sbatch --array=0-99``), or one of ``torchrun``'s processes:

    >>> rbg.tl.embed_slides(model, cohort["path"], "features/", shard="array")  # doctest: +SKIP
    >>> rbg.tl.embed_slides(model, cohort["path"], "features/")  # in each rank  # doctest: +SKIP
    """
    if model.features_key is not None:
        raise ValueError(
            "This model embeds precomputed features (features_key="
            f"{model.features_key!r}), not pixels: it cannot embed whole-slide images."
        )
    if kind not in ("embedding", "backbone"):
        raise ValueError(f"kind must be 'embedding' or 'backbone'; got {kind!r}.")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}.")
    index, count = resolve_shard(shard)
    slides = _slide_paths(paths)
    n_cohort = len(slides)
    if count > 1:
        ids = list(slides)
        taken = sorted(balance([_file_size(p) for p in slides.values()], count)[index])
        slides = {ids[i]: slides[ids[i]] for i in taken}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": model_fingerprint(model),
        "kind": kind,
        "tile_size_um": float(tile_size_um),
        "mpp": None if mpp is None else float(mpp),
        "tile_kwargs": {key: json_value(value) for key, value in sorted(tile_kwargs.items())},
    }
    run = _Run(
        model,
        slides,
        out_dir,
        settings,
        tile_size_um=tile_size_um,
        mpp=mpp,
        tile_kwargs=tile_kwargs,
        embed_kwargs={
            "kind": kind,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "precision": precision,
        },
    )
    if not slides:
        logger.info(f"Shard {index} of {count} has no slide: the cohort has {n_cohort}.")
        return run.table()
    with joined_processes() as processes:
        run.check(processes, overwrite)
        run.embed(processes, on_error, progress)
    return run.table()


@dataclass
class _Run:
    """One process's part in embedding a cohort (its shard), and what became of each slide."""

    model: RankByGene
    slides: dict[str, Path]
    out_dir: Path
    settings: dict[str, Any]
    tile_size_um: float
    mpp: float | None
    tile_kwargs: dict[str, Any]
    embed_kwargs: dict[str, Any]
    status: dict[str, str] = field(default_factory=dict)
    n_tiles: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return json.dumps(self.settings, sort_keys=True)

    def output(self, slide_id: str) -> Path:
        return self.out_dir / f"{slide_id}{SUFFIX}"

    def check(self, processes: Processes, overwrite: bool) -> None:
        """Find the finished slides and check the others can be embedded: everything that can
        fail cheaply fails here, in every process, before the first slide is embedded."""
        # each process checks a share of the slides, and all of them learn every result
        ids = list(self.slides)[processes.rank :: processes.size]
        remove_partials(self.out_dir, ids)
        checked = processes.gather(self._check(ids, overwrite, processes))
        own = checked[processes.rank]
        errors = [found["error"] for found in checked if found["error"] is not None]
        if errors:
            raise own["error"] or errors[0]
        merged: dict[str, dict[str, Any]] = {key: {} for key in ("status", "n_tiles", "mismatched")}
        unverified = set()
        for found in checked:
            for key in merged:
                merged[key].update(found[key])
            unverified.update(found["unverified"])
        self.status = {s: merged["status"][s] for s in self.slides if s in merged["status"]}
        self.n_tiles = merged["n_tiles"]
        mismatched = [merged["mismatched"][s] for s in self.slides if s in merged["mismatched"]]
        if mismatched:
            raise ValueError(
                f"{len(mismatched)} slides in {self.out_dir} were embedded with other settings: "
                + "; ".join(mismatched[:5])
                + ". Pass overwrite=True to redo them, or use another out_dir."
            )
        if processes.rank != 0:
            return
        if unverified:
            first = next(s for s in self.slides if s in unverified)
            logger.warning(
                f"{len(unverified)} finished slides in {self.out_dir} (e.g. {first!r}) have no "
                "checksum, having been written by an earlier rankbygene: they are only checked "
                "for NaN embeddings. Pass overwrite=True to redo them."
            )
        n_done = sum(state == "skipped" for state in self.status.values())
        if n_done:
            logger.info(f"{n_done} of {len(self.slides)} slides already embedded")

    def _check(self, ids: list[str], overwrite: bool, processes: Processes) -> dict[str, Any]:
        found: dict[str, Any] = {
            "status": {},
            "n_tiles": {},
            "mismatched": {},
            "unverified": [],
            "error": None,
        }
        fingerprint = self.fingerprint
        backend = self.tile_kwargs.get("backend", "auto")
        try:
            for slide_id in ids:
                path, output = self.slides[slide_id], self.output(slide_id)
                if output.is_file() and not overwrite:
                    done = read_done(output)
                    if done.problem is not None:
                        logger.warning(
                            f"{output} {done.problem}: slide {slide_id!r} is embedded again."
                        )
                    elif done.fingerprint != fingerprint:
                        found["mismatched"][slide_id] = (
                            f"{output} ({settings_differences(done.fingerprint, self.settings)})"
                        )
                        continue
                    elif done.stamp != file_stamp(path):
                        logger.info(f"{path} changed since {output} was written: embedded again.")
                    else:
                        if not done.verified:
                            found["unverified"].append(slide_id)
                        found["status"][slide_id] = "skipped"
                        found["n_tiles"][slide_id] = done.n_tiles
                        continue
                with open_slide(path, mpp=self.mpp, backend=backend) as reader:
                    # the tiles tile_slide will make, checked now, not when the slide is reached
                    geometry = ImageSource(
                        slide_id,
                        round(self.tile_size_um / float(cast(float, reader.mpp))),
                        path=Path(path).resolve(),
                        tile_size_um=self.tile_size_um,
                    )
                    PatchExtractor.check_resolution(
                        {slide_id: geometry}, self.model.patch_scale, self.model.input_size
                    )
                found["status"][slide_id] = "pending"
        except Exception as err:  # raised in every process once all have checked
            if processes.size > 1:
                err.add_note(f"Raised in process {processes.rank} of {processes.size}.")
            found["error"] = portable(err)
        return found

    def embed(self, processes: Processes, on_error: str, progress: bool | None) -> None:
        """Embed the slides left to do, shared out between the processes by file size."""
        todo = [slide_id for slide_id, state in self.status.items() if state == "pending"]
        share = balance([_file_size(self.slides[s]) for s in todo], processes.size)
        mine = [todo[i] for i in sorted(share[processes.rank])]  # each in the cohort's order
        if processes.size > 1:
            _take_local_gpu(self.model, processes.local_rank)
        if progress is None and processes.rank != 0:
            progress = False
        show = len(mine) > 1 if progress is None else progress
        first_error: Exception | None = None
        for slide_id in progress_bar(mine, desc="Slides", unit="slide", disable=not show):
            path, output = self.slides[slide_id], self.output(slide_id)
            try:
                tiles = tile_slide(
                    path,
                    tile_size_um=self.tile_size_um,
                    mpp=self.mpp,
                    library_id=slide_id,
                    **self.tile_kwargs,
                )
                self._embed_and_write(tiles, path, output, progress)
            except Exception as err:  # any failure of one slide; interruptions stop the run
                err.add_note(f"Raised while embedding slide {slide_id!r} ({path}).")
                if on_error == "raise":
                    raise
                # the traceback stays for re-raising, without the frames' tiles and tensors
                traceback.clear_frames(err.__traceback__)
                first_error = first_error or err
                self.errors[slide_id] = f"{type(err).__name__}: {err}"
                self.status[slide_id], self.n_tiles[slide_id] = "failed", 0
                logger.warning(f"Slide {slide_id!r} failed, going on: {self.errors[slide_id]}")
                continue
            self.status[slide_id], self.n_tiles[slide_id] = "embedded", tiles.n_obs
            logger.info(f"wrote {output}: {tiles.n_obs} tiles of slide {slide_id!r}")
        # every process learns what became of every slide (and waits for the last one)
        ours = {s: (self.status[s], self.n_tiles[s], self.errors.get(s)) for s in mine}
        gathered = processes.gather((ours, None if first_error is None else portable(first_error)))
        for results, _ in gathered:
            for slide_id, (state, n, error) in results.items():
                self.status[slide_id], self.n_tiles[slide_id] = state, n
                if error is not None:
                    self.errors[slide_id] = error
        self.errors = {s: self.errors[s] for s in self.slides if s in self.errors}
        if self.errors:
            first_error = first_error or next(e for _, e in gathered if e is not None)
            self._report_failures(first_error, log=processes.rank == 0)

    def _report_failures(self, first_error: Exception, log: bool) -> None:
        n_failed, n_slides = len(self.errors), len(self.slides)
        listed = "; ".join(f"{s!r}: {e}" for s, e in list(self.errors.items())[:10])
        more = f"; and {n_failed - 10} more" if n_failed > 10 else ""
        if log:
            logger.warning(
                f"{n_failed} of {n_slides} slides failed and have no file in {self.out_dir}: "
                f"{listed}{more}. They have status 'failed' in the result; a rerun retries "
                "them alone."
            )
        if n_failed == n_slides:
            if n_slides > 1:
                first_error.add_note(
                    f"All {n_slides} slides failed; this is the first one's error (the log "
                    "lists them all)."
                )
            raise first_error

    def _embed_and_write(
        self, tiles: AnnData, path: Path, output: Path, progress: bool | None
    ) -> None:
        """Embed a slide's tiles and write them, with their checksum, to ``output``."""
        embedding = self.model.get_image_representation(
            tiles, progress=progress, **self.embed_kwargs
        )
        bad = ~np.isfinite(embedding).all(axis=1)
        if bad.any():
            raise ValueError(
                f"The model gave NaN or infinite values for {int(bad.sum())} of the {len(bad)} "
                "tiles; nothing was written."
            )
        tiles.obsm[IMAGE_EMBEDDING_KEY] = embedding
        stamp = file_stamp(path)
        fingerprint = self.fingerprint
        tiles.uns[UNS_KEY] = {
            "fingerprint": fingerprint,
            "version": __version__,
            "kind": self.embed_kwargs["kind"],
            "source_image_path": str(Path(path).resolve()),
            "source_stamp": stamp,
            SLIDE_CHECKSUM_KEY: checksum(fingerprint, stamp, checked_arrays(tiles.obsm)),
        }
        write_atomic(tiles, output)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "path": [str(self.slides[s]) for s in self.slides],
                "output": [str(self.output(s)) for s in self.slides],
                "n_tiles": np.array([self.n_tiles.get(s, 0) for s in self.slides], np.int64),
                "status": [self.status.get(s) for s in self.slides],
                "error": [self.errors.get(s) for s in self.slides],
            },
            index=pd.Index(list(self.slides), name="slide_id"),
            columns=_COLUMNS,
        )


def _take_local_gpu(model: RankByGene, local_rank: int) -> None:
    """Move a model on a GPU to the GPU of this process's local rank (one GPU per process)."""
    import torch

    if torch.device(model.device).type != "cuda" or torch.cuda.device_count() < 2:
        return
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    if torch.device(model.device) != device:
        model.to_device(device)


def _file_size(path: Path) -> int:
    """Bytes of a slide file, the measure of its work (a missing file fails its check later)."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _slide_paths(
    paths: Sequence[str | Path] | Mapping[str, str | Path] | pd.Series,
) -> dict[str, Path]:
    if isinstance(paths, str | Path):
        raise TypeError("paths must be a list of slide files (or a mapping of id to file).")
    if isinstance(paths, pd.Series | Mapping):
        items = [(str(key), Path(value)) for key, value in paths.items()]
    else:
        items = [(slide_id_of(p), Path(p)) for p in paths]
    if not items:
        raise ValueError("paths is empty: no slide to embed.")
    seen: dict[str, Path] = {}
    for slide_id, path in items:
        if slide_id in seen:
            raise ValueError(
                f"Two slides have the id {slide_id!r} ({seen[slide_id]} and {path}): pass a "
                "mapping of unique ids to files."
            )
        seen[slide_id] = path
    return seen
