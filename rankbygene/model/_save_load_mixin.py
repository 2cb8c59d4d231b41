"""Saving and loading the RankByGene model: atomic, verified folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Self

import torch
from anndata import AnnData

from rankbygene._logging import logger, quiet_scvi_info
from rankbygene.model._checkpoint import check_finite_state, verify_checksums, write_checksums
from rankbygene.model._setup import check_var_names


class SaveLoadMixin:
    """``save``/``load`` of :class:`~rankbygene.model.RankByGene`: atomic and verified."""

    def save(
        self,
        dir_path: str | Path,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the model (weights, settings, gene panel) to a directory, as scvi-tools does.

        The files are written into a temporary folder beside ``dir_path``, flushed to disk, and
        only then put in its place: an interrupted save (Ctrl+C, a killed job) leaves a model
        saved before untouched. Their SHA-256 checksums go to ``checksums.json`` in the folder,
        and :meth:`load` checks them.

        Examples
        --------
        >>> model.save("model/", overwrite=True)
        >>> model = rbg.RankByGene.load("model/", adata=adata)
        """
        target = Path(dir_path)
        if target.exists() and not overwrite:
            raise ValueError(
                f"{target} already exists; pass overwrite=True to replace the model there."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        old = None
        try:
            super().save(
                str(staging), prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs
            )
            write_checksums(staging, prefix)
            fsync_tree(staging)
            if target.exists():
                old = target.with_name(f".{target.name}.old-{staging.name.rsplit('-', 1)[-1]}")
                target.rename(old)
            staging.rename(target)
        except BaseException:
            if old is not None and not target.exists():
                old.rename(target)  # put the previous model back
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if old is not None and target.exists():
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load a saved model; with ``adata``, check its genes are the model's and attach it.

        Without ``adata`` the model still embeds images of any AnnData
        (:meth:`get_image_representation`).

        The saved files are checked against the checksums saved with them, and weights with NaN
        or infinite values are refused. Folders saved before checksums were recorded still load,
        with a logged warning.

        Raises
        ------
        FileNotFoundError
            No saved model in ``dir_path``, or a saved file is missing.
        ValueError
            A file does not match its checksum or is corrupt, the weights are not finite, the
            model is another one, or ``adata`` lacks the model's genes.
        """
        verified = verify_checksums(Path(dir_path), prefix)
        saved = peek_saved_model(Path(dir_path), prefix, cls.__name__)
        if not verified:
            logger.warning(
                f"{dir_path} has no checksums (saved by an older version): its files are not "
                "verified; save the model again to add them."
            )
        if adata is not None:
            check_var_names(adata, saved["var_names"])
        with quiet_scvi_info():  # "File model.pt already downloaded" and setup lines
            return super().load(
                str(dir_path),
                adata=adata,
                accelerator=accelerator,
                device=device,
                prefix=prefix,
                **kwargs,
            )


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder, and the folder, to disk before it is renamed into place."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def peek_saved_model(dir_path: Path, prefix: str | None, model_name: str) -> dict:
    """Open the saved file once to give clear errors before scvi-tools loads it."""
    from scvi.model.base._save_load import SAVE_KEYS

    path = dir_path / f"{prefix or ''}{SAVE_KEYS.MODEL_FNAME}"
    if not path.is_file():
        raise FileNotFoundError(f"No saved model at {path}.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"Could not read the saved model {path}: corrupt file ({err}).") from err
    if not isinstance(saved, dict) or SAVE_KEYS.ATTR_DICT_KEY not in saved:
        raise ValueError(f"{path} is not a saved scvi-tools model.")
    registry = saved[SAVE_KEYS.ATTR_DICT_KEY].get("registry_", {})
    name = registry.get("model_name")
    if name != model_name:
        raise ValueError(f"{path} holds a {name} model, not a {model_name} model.")
    check_finite_state(saved[SAVE_KEYS.MODEL_STATE_DICT_KEY], path)
    return {"var_names": saved[SAVE_KEYS.VAR_NAMES_KEY]}
