"""Saving and loading the RankByGene model: atomic, verified folders."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Self

import torch
from anndata import AnnData

from rankbygene._logging import quiet_scvi_info
from rankbygene.model._checkpoint import (
    StateMismatchError,
    check_finite_state,
    verify_checksums,
)
from rankbygene.model._model_attributes import ModelAttributes
from rankbygene.model._model_folder import (
    earlier_leftovers,
    remove_leftovers,
    replace_files,
    staging_folder,
)
from rankbygene.model._setup import check_var_names


class SaveLoadMixin(ModelAttributes):
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

        The files are written into a hidden folder inside ``dir_path``, flushed to disk, and then
        moved into place one by one, ``checksums.json`` (their SHA-256, checked by :meth:`load`)
        last: an interrupted save (Ctrl+C, a killed job) leaves the folder with a complete model,
        the one saved before or this one. With ``overwrite=True`` only the files of the save
        (``model.pt``, ``adata.h5ad``, ``checksums.json``, after ``prefix``) are replaced; other
        files in the folder (notes, figures, your own AnnData) are kept. What interrupted saves
        left behind is removed.

        Examples
        --------
        >>> model.save("model/", overwrite=True)
        >>> model = rbg.RankByGene.load("model/", adata=adata)
        """
        target = Path(dir_path)
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{target} is a file, not a folder to save the model in.")
        if target.exists() and not overwrite:
            raise ValueError(
                f"{target} already exists; pass overwrite=True to replace the model there."
            )
        target.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target, prefix)
        staging = staging_folder(target)
        try:
            super().save(
                str(staging), prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs
            )
            replace_files(staging, target, prefix)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for leftover in earlier_leftovers(target):
            shutil.rmtree(leftover, ignore_errors=True)

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
        or infinite values, or tensors whose shapes are not the model's, are refused. A folder
        without checksums (saved by an older version, or its ``checksums.json`` removed) still
        loads, with a :class:`UserWarning` that its files cannot be verified.

        Raises
        ------
        FileNotFoundError
            No saved model in ``dir_path``, or a saved file is missing.
        ValueError
            A file does not match its checksum or is corrupt, the weights are not finite or do
            not fit the model (naming the file and the tensor), the model is another one, or
            ``adata`` lacks the model's genes.
        """
        verified = verify_checksums(Path(dir_path), prefix)
        saved = peek_saved_model(Path(dir_path), prefix, cls.__name__)
        if not verified:
            warnings.warn(
                f"{saved['path']} cannot be verified: {dir_path} has no checksums for it (saved "
                "by an older version, or checksums.json removed), so a damaged file would load "
                "unnoticed. Save the model again to record them.",
                UserWarning,
                stacklevel=2,
            )
        if adata is not None:
            check_var_names(adata, saved["var_names"])
        try:
            with quiet_scvi_info():  # "File model.pt already downloaded" and setup lines
                return super().load(
                    str(dir_path),
                    adata=adata,
                    accelerator=accelerator,
                    device=device,
                    prefix=prefix,
                    **kwargs,
                )
        except StateMismatchError as err:
            raise StateMismatchError(
                f"The weights in {saved['path']} do not fit the model that its saved settings "
                f"build: {err}. The file was edited, or saved by another version."
            ) from err


def peek_saved_model(dir_path: Path, prefix: str | None, model_name: str) -> dict:
    """Open the saved file once to give clear errors before scvi-tools loads it."""
    from scvi.model.base._save_load import SAVE_KEYS

    path = dir_path / f"{prefix or ''}{SAVE_KEYS.MODEL_FNAME}"
    if not path.is_file():
        aside = [old for old in earlier_leftovers(dir_path) if (old / path.name).is_file()]
        hint = (
            f" An interrupted save of an earlier version left the previous model in {aside[-1]}:"
            f" move it back to {dir_path}."
            if aside
            else ""
        )
        raise FileNotFoundError(f"No saved model at {path}.{hint}")
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
    return {"var_names": saved[SAVE_KEYS.VAR_NAMES_KEY], "path": path}
