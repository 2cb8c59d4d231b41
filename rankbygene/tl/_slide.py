"""Slide-level features: embedding whole-slide images tile by tile, and pooling tiles per slide.

:func:`embed_slides` tiles and embeds a cohort slide by slide, one ``.h5ad`` per slide written
atomically, so that an interrupted run resumes where it stopped; :func:`slide_features` pools the
tile embeddings of each slide (mean) or keeps them as bags for attention-based multiple-instance
learning (:class:`~rankbygene.tl.SlideClassifier`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from anndata import AnnData

from rankbygene import __version__
from rankbygene._constants import (
    IMAGE_EMBEDDING_KEY,
    SLIDE_CHECKSUM_KEY,
    SPATIAL_KEY,
    UNS_KEY,
)
from rankbygene._docs import d
from rankbygene._layout import ImageSource, spot_libraries
from rankbygene._logging import logger

if TYPE_CHECKING:
    from rankbygene.model import RankByGene

__all__ = ["embed_slides", "slide_features"]

SlideInput = (
    AnnData | Sequence[AnnData] | Mapping[str, AnnData] | pd.DataFrame | pd.Series | str | Path
)
Bags = dict[str, np.ndarray]

_SUFFIX = ".h5ad"
#: Temporary files of a slide being written: ``.<slide_id>.<8 characters>.partial.h5ad``.
_PARTIAL = ".partial.h5ad"
_PARTIAL_NAME = re.compile(r"\.(?P<slide_id>.+)\.[a-z0-9_]{8}" + re.escape(_PARTIAL))
#: ``obsm`` arrays of a finished file that its checksum covers.
_CHECKED_OBSM = (IMAGE_EMBEDDING_KEY, SPATIAL_KEY)


# ------------------------------------------------------------------------------ embedding


def embed_slides(
    model: RankByGene,
    paths: Sequence[str | Path] | Mapping[str, str | Path] | pd.Series,
    out_dir: str | Path,
    tile_size_um: float = 112.0,
    mpp: float | None = None,
    kind: Literal["embedding", "backbone"] = "embedding",
    batch_size: int | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    on_error: Literal["skip", "raise"] = "skip",
    **tile_kwargs: Any,
) -> pd.DataFrame:
    """Tile and embed each slide of a cohort, one ``.h5ad`` per slide; resumable.

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
    batch_size, num_workers
        Of the embedding DataLoader (``num_workers`` processes read tiles in parallel);
        default: chosen from the machine, as in :meth:`RankByGene.get_image_representation`.
    overwrite
        Redo slides already done (also those done with other settings, which otherwise raise).
    progress
        Progress bars (default: a bar over slides, and one per slide of more than 10 batches).
    on_error
        ``"skip"``: a slide that fails is reported and the others go on (see above; rerunning
        retries the failed slides only); ``"raise"``: the first failure stops the run, with
        the slides finished so far kept.
    **tile_kwargs
        Passed to :func:`~rankbygene.pp.tile_slide` (``tissue_threshold``, ``level``, ...).

    Returns
    -------
    DataFrame indexed by ``slide_id``: ``path``, ``output`` (the ``.h5ad``), ``n_tiles``,
    ``status`` (``"embedded"``, ``"skipped"`` or ``"failed"``) and ``error`` (the error of a
    failed slide, else ``None``). Pass it to :func:`slide_features`, which leaves out the failed
    slides (they have no file) with a warning.

    Raises
    ------
    FileNotFoundError, ValueError
        Before any slide is embedded: a slide is missing or cannot be opened, has no microns
        per pixel (and ``mpp`` is not given), two slides share an id, or a finished file was
        written with other settings (without ``overwrite``).
    Exception
        Whatever a slide raised: every slide failed, or ``on_error="raise"``.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> cohort = rbg.datasets.synthetic_cohort("cohort/", n_slides=40)  # doctest: +SKIP
    >>> done = rbg.tl.embed_slides(model, cohort["path"], "features/")  # doctest: +SKIP
    >>> features = rbg.tl.slide_features(done)  # mean over tiles  # doctest: +SKIP
    """
    from rankbygene._progress import progress_bar
    from rankbygene.data import PatchExtractor
    from rankbygene.pp._tile import open_slide, tile_slide

    if model.features_key is not None:
        raise ValueError(
            "This model embeds precomputed features (features_key="
            f"{model.features_key!r}), not pixels: it cannot embed whole-slide images."
        )
    if kind not in ("embedding", "backbone"):
        raise ValueError(f"kind must be 'embedding' or 'backbone'; got {kind!r}.")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}.")
    slides = _slide_paths(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_partials(out_dir, slides)
    settings = {
        "model": _model_fingerprint(model),
        "kind": kind,
        "tile_size_um": float(tile_size_um),
        "mpp": None if mpp is None else float(mpp),
        "tile_kwargs": {key: _plain(value) for key, value in sorted(tile_kwargs.items())},
    }
    fingerprint = json.dumps(settings, sort_keys=True)

    # Everything that can fail cheaply fails here, before the first slide is embedded.
    status: dict[str, str] = {}
    n_tiles: dict[str, int] = {}
    mismatched = []
    unverified = []
    for slide_id, path in slides.items():
        output = out_dir / f"{slide_id}{_SUFFIX}"
        if output.is_file() and not overwrite:
            found = _read_done(output)
            if found.problem is not None:
                logger.warning(f"{output} {found.problem}: slide {slide_id!r} is embedded again.")
            elif found.fingerprint != fingerprint:
                mismatched.append(f"{output} ({_differences(found.fingerprint, settings)})")
                continue
            elif found.stamp != _file_stamp(path):
                logger.info(f"{path} changed since {output} was written: embedded again.")
            else:
                if not found.verified:
                    unverified.append(slide_id)
                status[slide_id], n_tiles[slide_id] = "skipped", found.n_tiles
                continue
        with open_slide(path, mpp=mpp, backend=tile_kwargs.get("backend", "auto")) as reader:
            # the tiles tile_slide will make, checked now rather than when the slide is reached
            geometry = ImageSource(
                slide_id,
                round(tile_size_um / reader.mpp),
                path=Path(path).resolve(),
                tile_size_um=tile_size_um,
            )
            PatchExtractor.check_resolution(
                {slide_id: geometry}, model.patch_scale, model.input_size
            )
        status[slide_id] = "pending"
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} slides in {out_dir} were embedded with other settings: "
            + "; ".join(mismatched[:5])
            + ". Pass overwrite=True to redo them, or use another out_dir."
        )
    if unverified:
        logger.warning(
            f"{len(unverified)} finished slides in {out_dir} (e.g. {unverified[0]!r}) have no "
            "checksum, having been written by an earlier rankbygene: they are only checked for "
            "NaN embeddings. Pass overwrite=True to redo them."
        )
    todo = [slide_id for slide_id, state in status.items() if state == "pending"]
    if len(todo) < len(slides):
        logger.info(f"{len(slides) - len(todo)} of {len(slides)} slides already embedded")
    show = len(todo) > 1 if progress is None else progress
    embed = {"kind": kind, "batch_size": batch_size, "num_workers": num_workers}
    errors: dict[str, str] = {}
    first_error: Exception | None = None
    for slide_id in progress_bar(todo, desc="Slides", unit="slide", disable=not show):
        path = slides[slide_id]
        output = out_dir / f"{slide_id}{_SUFFIX}"
        try:
            tiles = tile_slide(
                path, tile_size_um=tile_size_um, mpp=mpp, library_id=slide_id, **tile_kwargs
            )
            _embed_and_write(model, tiles, path, output, fingerprint, progress=progress, **embed)
        except Exception as err:  # any failure of one slide; interruptions still stop the run
            err.add_note(f"Raised while embedding slide {slide_id!r} ({path}).")
            if on_error == "raise":
                raise
            # the traceback stays for re-raising, without the frames' tiles and tensors
            traceback.clear_frames(err.__traceback__)
            first_error = first_error or err
            errors[slide_id] = f"{type(err).__name__}: {err}"
            status[slide_id], n_tiles[slide_id] = "failed", 0
            logger.warning(f"Slide {slide_id!r} failed, going on: {errors[slide_id]}")
            continue
        status[slide_id], n_tiles[slide_id] = "embedded", tiles.n_obs
        logger.info(f"wrote {output}: {tiles.n_obs} tiles of slide {slide_id!r}")
    if first_error is not None:
        listed = "; ".join(f"{s!r}: {e}" for s, e in list(errors.items())[:10])
        more = f"; and {len(errors) - 10} more" if len(errors) > 10 else ""
        logger.warning(
            f"{len(errors)} of {len(slides)} slides failed and have no file in {out_dir}: "
            f"{listed}{more}. They have status 'failed' in the result; a rerun retries them "
            "alone."
        )
        if len(errors) == len(slides):
            if len(slides) > 1:
                first_error.add_note(
                    f"All {len(slides)} slides failed; this is the first one's error (the log "
                    "lists them all)."
                )
            raise first_error
    return pd.DataFrame(
        {
            "path": [str(slides[s]) for s in slides],
            "output": [str(out_dir / f"{s}{_SUFFIX}") for s in slides],
            "n_tiles": [n_tiles[s] for s in slides],
            "status": [status[s] for s in slides],
            "error": [errors.get(s) for s in slides],
        },
        index=pd.Index(list(slides), name="slide_id"),
    )


def _embed_and_write(
    model: RankByGene,
    tiles: AnnData,
    path: Path,
    output: Path,
    fingerprint: str,
    **embed: Any,
) -> None:
    """Embed a slide's tiles and write them, with their checksum, to ``output``."""
    embedding = model.get_image_representation(tiles, **embed)
    bad = ~np.isfinite(embedding).all(axis=1)
    if bad.any():
        raise ValueError(
            f"The model gave NaN or infinite values for {int(bad.sum())} of the {len(bad)} "
            "tiles; nothing was written."
        )
    tiles.obsm[IMAGE_EMBEDDING_KEY] = embedding
    stamp = _file_stamp(path)
    tiles.uns[UNS_KEY] = {
        "fingerprint": fingerprint,
        "version": __version__,
        "kind": embed["kind"],
        "source_image_path": str(Path(path).resolve()),
        "source_stamp": stamp,
        SLIDE_CHECKSUM_KEY: _checksum(fingerprint, stamp, _checked_arrays(tiles.obsm)),
    }
    _write_atomic(tiles, output)


def _slide_paths(
    paths: Sequence[str | Path] | Mapping[str, str | Path] | pd.Series,
) -> dict[str, Path]:
    if isinstance(paths, str | Path):
        raise TypeError("paths must be a list of slide files (or a mapping of id to file).")
    if isinstance(paths, pd.Series | Mapping):
        items = [(str(key), Path(value)) for key, value in paths.items()]
    else:
        from rankbygene.pp._tile import slide_id

        items = [(slide_id(p), Path(p)) for p in paths]
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


def _model_fingerprint(model: RankByGene) -> dict[str, Any]:
    """What determines the features: the teacher's weights and the patch geometry."""
    h = hashlib.blake2b(digest_size=12)
    module = model.module
    for part in (module.teacher_backbone, module.teacher_head):
        for name, tensor in part.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return {
        "weights": h.hexdigest(),
        "input_size": int(model.input_size),
        "patch_scale": float(model.patch_scale),
        "image_key": model.image_key,
    }


def _file_stamp(path: str | Path) -> str:
    """Size and modification time of a slide file: a slide rewritten since is embedded again."""
    try:
        stat = Path(path).stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class _Done(NamedTuple):
    """What a finished file says of itself."""

    fingerprint: str
    n_tiles: int
    stamp: str
    #: Whether a checksum was stored (and matched); files of earlier versions have none.
    verified: bool
    #: Why the file cannot be taken as done (unreadable, damaged); ``None`` when it can.
    problem: str | None


def _read_done(path: Path) -> _Done:
    """Settings fingerprint, tile count and slide stamp of a finished file, once verified."""
    import h5py

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    try:
        with h5py.File(path, "r") as f:
            entry = f[f"uns/{UNS_KEY}"]
            fingerprint = text(entry["fingerprint"][()])
            stamp = text(entry["source_stamp"][()])
            stored = text(entry[SLIDE_CHECKSUM_KEY][()]) if SLIDE_CHECKSUM_KEY in entry else None
            arrays = {key: f[f"obsm/{key}"][()] for key in _CHECKED_OBSM if f"obsm/{key}" in f}
            embedding = arrays[IMAGE_EMBEDDING_KEY]
    except Exception as err:  # h5py raises many types for a truncated or damaged file
        return _Done("", 0, "", False, f"is unreadable ({type(err).__name__}: {err})")
    problem = None
    if stored is not None and stored != _checksum(fingerprint, stamp, arrays):
        problem = "is damaged (its contents do not match their checksum)"
    elif not np.isfinite(embedding).all():
        problem = "has NaN or infinite embeddings"
    return _Done(fingerprint, int(embedding.shape[0]), stamp, stored is not None, problem)


def _checked_arrays(obsm: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {key: np.asarray(obsm[key]) for key in _CHECKED_OBSM if key in obsm}


def _checksum(fingerprint: str, stamp: str, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of what a finished file stands for: settings, slide stamp and tile arrays."""
    digest = hashlib.sha256()
    for part in (fingerprint, stamp):
        digest.update(part.encode() + b"\0")
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _differences(found: str, expected: dict[str, Any]) -> str:
    try:
        old = json.loads(found)
    except json.JSONDecodeError:
        return "unknown settings"
    keys = [k for k in expected if old.get(k) != json.loads(json.dumps(expected[k]))]
    return "different " + ", ".join(keys) if keys else "different settings"


def _write_atomic(adata: AnnData, path: Path) -> None:
    """Write ``adata`` to ``path`` through a temporary file, synced, then renamed."""
    tmp = _new_partial(path)
    try:
        adata.write_h5ad(tmp)
        # on disk before the rename: a crash leaves the previous file or none, never a stub
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_partial(path: Path) -> Path:
    """A new empty temporary file for ``path``, named as :func:`_remove_partials` expects."""
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{_PARTIAL}")
        try:
            # created as open() creates files, so the mode is what the umask gives (mkstemp's
            # would be 0600 whatever the umask); the rename keeps it
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _remove_partials(out_dir: Path, slide_ids: Iterable[str]) -> None:
    """Remove the temporary files that a killed run left for these slides, and only those."""
    wanted = set(slide_ids)
    removed = []
    for candidate in out_dir.glob(f".*{_PARTIAL}"):
        match = _PARTIAL_NAME.fullmatch(candidate.name)
        if match and match["slide_id"] in wanted and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate.name)
    if removed:
        logger.info(
            f"removed {len(removed)} unfinished files of an interrupted run from {out_dir}: "
            + ", ".join(sorted(removed)[:5])
        )


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------ pooling


@d.dedent
def slide_features(
    data: SlideInput,
    library_key: str | None = None,
    use_rep: str = IMAGE_EMBEDDING_KEY,
    method: Literal["mean", "attention"] = "mean",
) -> pd.DataFrame | Bags:
    """Slide-level features from tile (or spot) embeddings.

    Parameters
    ----------
    data
        Tiles of one or several slides: an AnnData (slides told apart by ``obs[library_key]``),
        a list of AnnData (one slide each; ids from their ``uns["spatial"]`` library), a
        mapping of slide id to AnnData, the DataFrame returned by :func:`embed_slides` or the
        folder it wrote (files are read without their images).
    %(library_key)s
        For an AnnData holding several slides.
    use_rep
        ``obsm`` key of the tile embeddings.
    method
        ``"mean"``: the mean embedding of each slide's tiles; ``"attention"``: each slide's tile
        embeddings as a bag, for :class:`~rankbygene.tl.SlideClassifier` (``method="abmil"``),
        which learns the attention pooling from the labels.

    Returns
    -------
    ``"mean"``: DataFrame of slides x features (index: slide id, columns ``<use_rep>_<j>``);
    ``"attention"``: dict of slide id to its ``(n_tiles, n_features)`` float32 array.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata.obsm["X_rankbygene"] = model.get_image_representation(adata)  # doctest: +SKIP
    >>> features = rbg.tl.slide_features(adata, library_key="library_id")  # doctest: +SKIP
    >>> bags = rbg.tl.slide_features(adata, "library_id", method="attention")  # doctest: +SKIP
    """
    if method not in ("mean", "attention"):
        raise ValueError(f"method must be 'mean' or 'attention'; got {method!r}.")
    bags = _collect_bags(data, library_key, use_rep)
    if method == "attention":
        return bags
    return mean_pool(bags, prefix=use_rep)


def mean_pool(bags: Bags, prefix: str = "feature") -> pd.DataFrame:
    """Mean of each bag's rows, as a slides x features DataFrame.

    Parameters
    ----------
    bags
        Slide id -> ``(n_tiles, n_features)`` array.
    prefix
        Column names are ``<prefix>_<j>``.

    Returns
    -------
    float64 DataFrame indexed by ``slide_id``, in the order of ``bags``.
    """
    ids = list(bags)
    matrix = np.stack([bags[s].mean(axis=0) for s in ids]).astype(np.float64)
    columns = [f"{prefix}_{j}" for j in range(matrix.shape[1])]
    return pd.DataFrame(matrix, index=pd.Index(ids, name="slide_id"), columns=columns)


def _collect_bags(data: SlideInput, library_key: str | None, use_rep: str) -> Bags:
    if isinstance(data, AnnData):
        bags = _bags_of_anndata(data, library_key, use_rep, None)
    elif isinstance(data, pd.DataFrame):
        if "output" not in data.columns:
            raise ValueError(
                "A DataFrame passed as data must be the result of embed_slides (an 'output' "
                f"column of .h5ad files); got columns {list(data.columns)}."
            )
        if "status" in data.columns and (data["status"] == "failed").any():
            failed = data.index[data["status"] == "failed"]
            logger.warning(
                f"Leaving out {len(failed)} slides that failed in embed_slides "
                f"(e.g. {list(failed[:3])}): they have no file."
            )
            data = data[data["status"] != "failed"]
        bags = {str(s): _read_rep(Path(p), use_rep) for s, p in data["output"].items()}
    elif isinstance(data, str | Path):
        folder = Path(data)
        if not folder.is_dir():
            raise FileNotFoundError(f"Folder of embedded slides not found: {folder}")
        files = sorted(folder.glob(f"*{_SUFFIX}"))
        files = [f for f in files if not f.name.startswith(".")]
        if not files:
            raise FileNotFoundError(f"No {_SUFFIX} file in {folder}: run embed_slides first.")
        bags = {f.name[: -len(_SUFFIX)]: _read_rep(f, use_rep) for f in files}
    elif isinstance(data, Mapping):
        bags = {}
        for slide_id, adata in data.items():
            bags.update(_bags_of_anndata(adata, None, use_rep, str(slide_id)))
    elif isinstance(data, Sequence):
        bags = {}
        for adata in data:
            if not isinstance(adata, AnnData):
                raise TypeError(f"data must hold AnnData objects; got {type(adata).__name__}.")
            for slide_id, bag in _bags_of_anndata(adata, library_key, use_rep, None).items():
                if slide_id in bags:
                    raise ValueError(f"Slide {slide_id!r} appears in two AnnData objects.")
                bags[slide_id] = bag
    else:
        raise TypeError(
            "data must be an AnnData, a list or dict of AnnData, the DataFrame of embed_slides "
            f"or its folder; got {type(data).__name__}."
        )
    if not bags:
        raise ValueError("No slide found in data.")
    dims = {bag.shape[1] for bag in bags.values()}
    if len(dims) > 1:
        raise ValueError(
            f"Slides have embeddings of different sizes {sorted(dims)} in {use_rep!r}."
        )
    return bags


def _bags_of_anndata(
    adata: AnnData, library_key: str | None, use_rep: str, slide_id: str | None
) -> Bags:
    where = (
        f"adata.obsm[{use_rep!r}]" if slide_id is None else f"slide {slide_id!r}: obsm[{use_rep!r}]"
    )
    if use_rep not in adata.obsm:
        raise KeyError(
            f"{where} is missing (obsm keys: {list(adata.obsm.keys())}); store the tile "
            "embeddings there, e.g. adata.obsm['X_rankbygene'] = "
            "model.get_image_representation(adata)."
        )
    matrix = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    if slide_id is not None:
        return {slide_id: check_bag(matrix, where)}
    libraries = spot_libraries(adata, library_key)
    return {
        str(lib): check_bag(matrix[libraries == lib], f"{where} of slide {lib!r}")
        for lib in dict.fromkeys(libraries)
    }


def _read_rep(path: Path, use_rep: str) -> np.ndarray:
    import h5py

    if not path.is_file():
        raise FileNotFoundError(f"Embedded slide not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if f"obsm/{use_rep}" not in f:
                keys = list(f["obsm"].keys()) if "obsm" in f else []
                raise KeyError(f"{path} has no obsm[{use_rep!r}] (obsm keys: {keys}).")
            matrix = np.asarray(f[f"obsm/{use_rep}"][()], dtype=np.float32)
    except OSError as err:
        raise ValueError(f"Could not read {path}: {err}") from err
    return check_bag(matrix, f"{path} obsm[{use_rep!r}]")


def check_bag(matrix: np.ndarray, where: str) -> np.ndarray:
    """``matrix`` itself, once checked to be a non-empty, finite ``(n_tiles, n_features)`` bag.

    Parameters
    ----------
    matrix
        The tile features of one slide.
    where
        What ``matrix`` is, for the error message.

    Raises
    ------
    ValueError
        ``matrix`` is not 2-D, has no tile or has NaN or infinite values.
    """
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(
            f"{where} must be a non-empty (n_tiles, n_features) array; got {matrix.shape}."
        )
    if not np.isfinite(matrix).all():
        raise ValueError(f"{where} has NaN or infinite values.")
    return matrix
