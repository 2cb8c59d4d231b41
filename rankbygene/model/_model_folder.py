"""A saved model's folder: its files replaced in place, never the user's files beside them.

A save writes its files into a hidden staging folder inside the model's folder (the same file
system, so that renames are atomic), then moves them into place one by one with ``os.replace``.
A checksum record that accepts each file old or new is put in place first, the final record
last: at every instant the folder holds a complete model, the old one or the new one, and
:func:`~rankbygene.model._checkpoint.verify_checksums` accepts it. Only files of the save are
replaced, and only files the package recorded are removed. The next save removes what an
interrupted one left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from rankbygene.model._checkpoint import (
    file_entry,
    fsync_folder,
    record_path,
    recorded_entries,
    write_record,
)

__all__ = ["earlier_leftovers", "remove_leftovers", "replace_files", "staging_folder"]

#: Hidden folder inside the model's folder where a save writes its files before moving them.
STAGING_PREFIX = ".rankbygene-save-"
# tempfile.mkdtemp's random part: 8 of [a-z0-9_]
_RANDOM = r"[a-z0-9_]{8}"


def staging_folder(target: Path) -> Path:
    """A new, empty hidden folder inside ``target`` for a save's files."""
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))


def replace_files(staging: Path, target: Path, prefix: str | None) -> None:
    """Move a save's files from ``staging`` into ``target``, the folder complete at every step.

    1. the new files are flushed to disk;
    2. a checksum record accepting each file old or new replaces the old record (when ``target``
       holds files of a save);
    3. each new file replaces its old version (``os.replace``);
    4. files of the previous save that this one does not write (``adata.h5ad`` when saved
       before with ``save_anndata=True``) are removed, when they still are what was saved;
    5. the record of the new files replaces the transitional one.

    Parameters
    ----------
    staging
        Folder holding the new files, inside ``target``.
    target
        The model's folder.
    prefix
        scvi-tools' file-name prefix of the save.
    """
    record = record_path(target, prefix)
    names = sorted(path.name for path in staging.iterdir() if path.is_file())
    for name in names:
        with open(staging / name, "rb") as handle:
            os.fsync(handle.fileno())
    files = {name: file_entry(staging / name) for name in names}
    previous = recorded_entries(target, prefix, names)
    if previous:
        write_record(record, files, previous)
    for name in names:
        os.replace(staging / name, target / name)
    fsync_folder(target)
    for name, entry in previous.items():
        # only a file the package recorded, unchanged since: anything else is the user's
        if name not in files and entry is not None:
            (target / name).unlink(missing_ok=True)
    write_record(record, files)


def remove_leftovers(target: Path, prefix: str | None) -> None:
    """Remove what interrupted saves left inside ``target``: staging folders, a record's temp."""
    staging = re.compile(rf"{re.escape(STAGING_PREFIX)}{_RANDOM}")
    for path in target.iterdir():
        if path.is_dir() and not path.is_symlink() and staging.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
    record = record_path(target, prefix)
    record.with_name(f".{record.name}.tmp").unlink(missing_ok=True)


def earlier_leftovers(target: Path) -> list[Path]:
    """Hidden folders beside ``target`` left by interrupted saves of earlier versions.

    Those saves moved the old folder aside (``.NAME.old-*``) and the new one in from
    ``.NAME.partial-*``; a save killed in between left the model only in the ``old`` folder.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-{_RANDOM}")
    if not target.parent.is_dir():
        return []
    return sorted(
        path
        for path in target.parent.iterdir()
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink()
    )
