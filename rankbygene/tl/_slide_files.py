"""The files of an embedded cohort: one verified ``.h5ad`` per slide, written atomically.

A slide's file is written as a hidden temporary file (``.<slide_id>.<8 characters>.partial.h5ad``),
synced to disk and renamed; it holds a SHA-256 of what it stands for, so that a file counts as
finished only when it can be read and matches its checksum, and is taken as done only when
it was made with the same settings (model weights, geometry, tiling) from the same slide file.
Any number of processes may write into one folder, each its own slides.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from anndata import AnnData

from rankbygene._constants import IMAGE_EMBEDDING_KEY, SLIDE_CHECKSUM_KEY, UNS_KEY
from rankbygene._layout._keys import SPATIAL_KEY
from rankbygene._logging import logger

if TYPE_CHECKING:
    from rankbygene.model import RankByGene

#: Suffix of a finished slide's file: ``<slide_id>.h5ad``.
SUFFIX = ".h5ad"
#: Temporary files of a slide being written: ``.<slide_id>.<8 characters>.partial.h5ad``.
_PARTIAL = ".partial.h5ad"
_PARTIAL_NAME = re.compile(r"\.(?P<slide_id>.+)\.[a-z0-9_]{8}" + re.escape(_PARTIAL))
#: ``obsm`` arrays of a finished file that its checksum covers.
_CHECKED_OBSM = (IMAGE_EMBEDDING_KEY, SPATIAL_KEY)


def file_stamp(path: str | Path) -> str:
    """Size and modification time of a slide file: a slide rewritten since is embedded again."""
    try:
        stat = Path(path).stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class Done(NamedTuple):
    """What a finished file says of itself."""

    fingerprint: str
    n_tiles: int
    stamp: str
    #: Whether a checksum was stored (and matched); files of earlier versions have none.
    verified: bool
    #: Why the file cannot be taken as done (unreadable, damaged); ``None`` when it can.
    problem: str | None


def read_done(path: Path) -> Done:
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
        return Done("", 0, "", False, f"is unreadable ({type(err).__name__}: {err})")
    problem = None
    if stored is not None and stored != checksum(fingerprint, stamp, arrays):
        problem = "is damaged (its contents do not match their checksum)"
    elif not np.isfinite(embedding).all():
        problem = "has NaN or infinite embeddings"
    return Done(fingerprint, int(embedding.shape[0]), stamp, stored is not None, problem)


def checked_arrays(obsm: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The ``obsm`` arrays that a finished file's checksum covers."""
    return {key: np.asarray(obsm[key]) for key in _CHECKED_OBSM if key in obsm}


def checksum(fingerprint: str, stamp: str, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of what a finished file stands for: settings, slide stamp and tile arrays."""
    digest = hashlib.sha256()
    for part in (fingerprint, stamp):
        digest.update(part.encode() + b"\0")
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_atomic(adata: AnnData, path: Path) -> None:
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
    """A new empty temporary file for ``path``, named as :func:`partial_files` expects."""
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{_PARTIAL}")
        try:
            # created as open() creates files, so the mode is what the umask gives (mkstemp's
            # would be 0600 whatever the umask); the rename keeps it
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def partial_files(out_dir: Path) -> dict[Path, str]:
    """Temporary files in ``out_dir``: slides being written, or left by a killed process.

    Returns
    -------
    Each temporary file, mapped to the id of its slide.
    """
    found = {}
    for candidate in sorted(out_dir.glob(f".*{_PARTIAL}")):
        match = _PARTIAL_NAME.fullmatch(candidate.name)
        if match and candidate.is_file():
            found[candidate] = match["slide_id"]
    return found


def remove_partials(out_dir: Path, slide_ids: Iterable[str]) -> None:
    """Remove the temporary files that a killed run left for these slides, and only those."""
    wanted = set(slide_ids)
    removed = []
    for candidate, slide_id in partial_files(out_dir).items():
        if slide_id in wanted:
            candidate.unlink(missing_ok=True)
            removed.append(candidate.name)
    if removed:
        logger.info(
            f"removed {len(removed)} unfinished files of an interrupted run from {out_dir}: "
            + ", ".join(sorted(removed)[:5])
        )


def model_fingerprint(model: RankByGene) -> dict[str, Any]:
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


def settings_differences(found: str, expected: dict[str, Any]) -> str:
    """Which settings of ``expected`` a finished file's fingerprint ``found`` differs in."""
    try:
        old = json.loads(found)
    except json.JSONDecodeError:
        return "unknown settings"
    keys = [k for k in expected if old.get(k) != json.loads(json.dumps(expected[k]))]
    return "different " + ", ".join(keys) if keys else "different settings"


def json_value(value: Any) -> Any:
    """``value`` as JSON can write it (numpy scalars, paths)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
