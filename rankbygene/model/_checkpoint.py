"""Verified model folders: SHA-256 checksums of the saved files, and finite weights."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKSUMS_FNAME",
    "check_finite_state",
    "file_sha256",
    "verify_checksums",
    "write_checksums",
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
    record = folder / f"{prefix or ''}{CHECKSUMS_FNAME}"
    files = {
        path.name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != record.name
    }
    content = {"format": _FORMAT, "algorithm": "sha256", "files": files}
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, record)  # never a half-written record under the real name
    return record


def verify_checksums(dir_path: str | Path, prefix: str | None = None) -> bool:
    """Check every file listed in a model folder's checksum file against its checksum.

    Parameters
    ----------
    dir_path
        The saved model folder.
    prefix
        scvi-tools' file-name prefix of the save.

    Returns
    -------
    ``True`` when every listed file matches; ``False`` when the folder has no checksum file
    (saved by an older version of the package).

    Raises
    ------
    FileNotFoundError
        A listed file is missing.
    ValueError
        A file does not match its checksum (changed on disk since it was saved: truncated,
        flipped bytes), or the checksum file itself is damaged. The message names the file.
    """
    folder = Path(dir_path)
    record = folder / f"{prefix or ''}{CHECKSUMS_FNAME}"
    if not record.is_file():
        return False
    files = _read_record(record)
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {record} but missing.")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise ValueError(
                f"{path} does not match its checksum in {record}: {size} bytes where "
                f"{expected['bytes']} were saved. The file is corrupt (truncated or overwritten)."
            )
        if file_sha256(path) != expected["sha256"]:
            raise ValueError(
                f"{path} does not match its SHA-256 checksum in {record}: the file is corrupt "
                "(changed on disk since it was saved). Restore it from a copy or save it again."
            )
    return True


def _read_record(record: Path) -> dict[str, dict[str, Any]]:
    try:
        content = json.loads(record.read_text())
        files = content["files"]
        if content.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("not a sha256 record")
        for entry in files.values():
            if not (isinstance(entry["sha256"], str) and isinstance(entry["bytes"], int)):
                raise ValueError("an entry lacks sha256 or bytes")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"The checksum file {record} is damaged ({err}).") from err
    return files


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
