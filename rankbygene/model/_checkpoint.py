"""Verified model folders: SHA-256 checksums of the saved files, and finite weights."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKSUMS_FNAME",
    "StateMismatchError",
    "check_finite_state",
    "check_state_fits",
    "file_entry",
    "file_sha256",
    "fsync_folder",
    "record_path",
    "recorded_entries",
    "verify_checksums",
    "write_checksums",
    "write_record",
]

#: Sidecar file of a saved model folder (after scvi-tools' prefix) listing each file's checksum.
CHECKSUMS_FNAME = "checksums.json"
_FORMAT = 1
_CHUNK = 2**20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    The 64-character hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: str | Path) -> dict[str, Any]:
    """The checksum record's entry of a file: its SHA-256 and size in bytes."""
    return {"sha256": file_sha256(path), "bytes": Path(path).stat().st_size}


def record_path(dir_path: str | Path, prefix: str | None = None) -> Path:
    """The checksum file of a saved model folder: ``{prefix}checksums.json`` in it."""
    return Path(dir_path) / f"{prefix or ''}{CHECKSUMS_FNAME}"


def write_record(
    record: Path,
    files: Mapping[str, Mapping[str, Any]],
    previous: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> None:
    """Write a checksum record under a temporary name, flush it, then rename it into place.

    Parameters
    ----------
    record
        The checksum file.
    files
        File name to its entry (:func:`file_entry`).
    previous
        While a save replaces the files one by one: the entries of the files it replaces (or
        ``None`` for a file whose content was not verified), so that a folder whose save was
        interrupted verifies with each file either old or new.
    """
    content: dict[str, Any] = {"format": _FORMAT, "algorithm": "sha256", "files": dict(files)}
    if previous is not None:
        content["previous"] = dict(previous)
    tmp = record.with_name(f".{record.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(content, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, record)  # never a half-written record under the real name
    fsync_folder(record.parent)


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (names created, renamed, removed) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checksums(dir_path: str | Path, prefix: str | None = None) -> Path:
    """Record the SHA-256 and size of every file in a freshly saved model folder.

    Parameters
    ----------
    dir_path
        The folder, holding only this save's files (model.pt, maybe adata.h5ad).
    prefix
        scvi-tools' file-name prefix of the save.

    Returns
    -------
    The path of the checksum file, ``{prefix}checksums.json`` in ``dir_path``.
    """
    folder = Path(dir_path)
    record = record_path(folder, prefix)
    files = {
        path.name: file_entry(path)
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != record.name
    }
    write_record(record, files)
    return record


def recorded_entries(
    dir_path: str | Path, prefix: str | None, names: Iterable[str]
) -> dict[str, dict[str, Any] | None]:
    """Entries of the files of a model folder that are there now: what a new save replaces.

    Parameters
    ----------
    dir_path
        The saved model folder.
    prefix
        scvi-tools' file-name prefix of the save.
    names
        Further file names to look for (those the new save writes).

    Returns
    -------
    For each file listed in the folder's checksum record, or named in ``names``, that exists:
    its entry when it matches one recorded for it, else ``None`` (not written by the package, or
    changed since).
    """
    folder = Path(dir_path)
    record = record_path(folder, prefix)
    recorded: dict[str, list[dict[str, Any]]] = {}
    if record.is_file():
        try:
            files, previous = _read_record(record)
        except ValueError:
            files, previous = {}, {}
        for source in (files, previous or {}):
            for name, entry in source.items():
                recorded.setdefault(name, [])
                if entry is not None:
                    recorded[name].append(entry)
    found: dict[str, dict[str, Any] | None] = {}
    for name in sorted(set(recorded) | set(names)):
        path = folder / name
        if not path.is_file():
            continue
        entry = file_entry(path)
        found[name] = entry if entry in recorded.get(name, []) else None
    return found


def verify_checksums(dir_path: str | Path, prefix: str | None = None) -> bool:
    """Check every file listed in a model folder's checksum file against its checksum.

    A save replaces a folder's files one by one, after a record that lists both the old and
    the new entries: a folder whose save was interrupted verifies with each file old or new.

    Parameters
    ----------
    dir_path
        The saved model folder.
    prefix
        scvi-tools' file-name prefix of the save.

    Returns
    -------
    ``True`` when every listed file matches; ``False`` when the folder has no checksum file
    (saved by an older version of the package), or a file left by an interrupted save is one
    that was never verified.

    Raises
    ------
    FileNotFoundError
        A listed file is missing.
    ValueError
        A file does not match its checksum (changed on disk since it was saved: truncated,
        flipped bytes), or the checksum file itself is damaged. The message names the file.
    """
    folder = Path(dir_path)
    record = record_path(folder, prefix)
    if not record.is_file():
        return False
    files, previous = _read_record(record)
    replacing = previous is not None  # a save was interrupted while replacing the files
    previous = previous or {}
    verified = True
    for name in sorted(set(files) | set(previous)):
        path = folder / name
        if not path.is_file():
            if not replacing or (name in files and name in previous):
                raise FileNotFoundError(f"{path} is listed in {record} but missing.")
            continue  # the old or the new save lacks it
        expected = [entry for entry in (files.get(name), previous.get(name)) if entry]
        size = path.stat().st_size
        sized = [entry for entry in expected if entry["bytes"] == size]
        if sized and file_sha256(path) in {entry["sha256"] for entry in sized}:
            continue
        if name in previous and previous[name] is None:
            verified = False  # a file never verified, which an interrupted save was replacing
            continue
        if not sized:
            raise ValueError(
                f"{path} does not match its checksum in {record}: {size} bytes where "
                f"{expected[0]['bytes']} were saved. The file is corrupt (truncated or "
                "overwritten)."
            )
        raise ValueError(
            f"{path} does not match its SHA-256 checksum in {record}: the file is corrupt "
            "(changed on disk since it was saved). Restore it from a copy or save it again."
        )
    return verified


def _read_record(
    record: Path,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any] | None] | None]:
    """The ``files`` and ``previous`` entries of a checksum record (``previous``: ``None``
    unless the record is that of a save replacing the files)."""
    try:
        content = json.loads(record.read_text())
        files = content["files"]
        previous = content.get("previous")
        if content.get("algorithm") != "sha256" or not (
            isinstance(files, dict) and isinstance(previous, dict | None)
        ):
            raise ValueError("not a sha256 record")
        others = (previous or {}).values()
        for entry in [*files.values(), *(e for e in others if e is not None)]:
            if not (isinstance(entry["sha256"], str) and isinstance(entry["bytes"], int)):
                raise ValueError("an entry lacks sha256 or bytes")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"The checksum file {record} is damaged ({err}).") from err
    return files, previous


def check_finite_state(state_dict: Mapping[str, Any], source: str | Path) -> None:
    """Refuse a state dict with NaN or infinite values in a floating-point tensor.

    Parameters
    ----------
    state_dict
        Tensor name to tensor, as ``module.state_dict()``.
    source
        Where the state dict comes from, for the message.

    Raises
    ------
    ValueError
        Naming the first tensor (and counting all) with non-finite values.
    """
    bad = []
    for name, tensor in state_dict.items():
        if not (torch.is_tensor(tensor) and (tensor.is_floating_point() or tensor.is_complex())):
            continue
        n_bad = int((~torch.isfinite(tensor)).sum())
        if n_bad:
            bad.append((name, n_bad, tensor.numel()))
    if bad:
        name, n_bad, numel = bad[0]
        more = f" ({len(bad) - 1} more tensors too)" if len(bad) > 1 else ""
        raise ValueError(
            f"The weights in {source} have NaN or infinite values: tensor {name!r} has {n_bad} "
            f"of {numel}{more}. The file is corrupt, or the model diverged before it was saved."
        )


class StateMismatchError(ValueError):
    """Saved weights whose tensors are not those of the module they are loaded into."""


def check_state_fits(expected: Mapping[str, Any], state_dict: Mapping[str, Any]) -> None:
    """Refuse a state dict whose tensor names or shapes differ from a module's.

    PyTorch's own error names no file and comes after the model is built; this one names the
    first tensor that differs and counts the others.

    Parameters
    ----------
    expected
        The module's ``state_dict()``.
    state_dict
        The state dict to load.

    Raises
    ------
    StateMismatchError
        A tensor with another shape, missing, or not in the module.
    """
    problems = []
    for name, tensor in expected.items():
        if name not in state_dict:
            problems.append(f"tensor {name!r} is missing from the saved weights")
            continue
        saved = state_dict[name]
        if torch.is_tensor(tensor) and torch.is_tensor(saved) and saved.shape != tensor.shape:
            problems.append(
                f"tensor {name!r} has shape {tuple(saved.shape)} in the saved weights and "
                f"{tuple(tensor.shape)} in the model"
            )
    problems.extend(
        f"tensor {name!r} of the saved weights is not in the model"
        for name in state_dict
        if name not in expected
    )
    if problems:
        more = f" ({len(problems) - 1} more tensors differ)" if len(problems) > 1 else ""
        raise StateMismatchError(f"{problems[0]}{more}")
