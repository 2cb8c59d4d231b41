"""The HER2+ breast cancer Spatial Transcriptomics data set (Andersson et al. 2021), by section.

Public source: the ``data/`` folder of the GitHub repository ``almaan/her2st`` (branch
``master``), which holds the files unencrypted in their original layout::

    ST-cnts/<section>.tsv.gz                  spots x genes raw counts
    ST-spotfiles/<section>_selection.tsv      spot positions and selection
    ST-imgs/<patient>/<section>/<name>.jpg    H&E image (file names differ per section)

The same data is also on Zenodo (record 3957257, "Spatial Deconvolution of HER2-positive Breast
Tumors Reveals Novel Intercellular Relationships") as 7z-encrypted archives
(``count-matrices.zip``, ``images.zip``, ``spot-selections.zip``, ``meta.zip``) whose passwords
are published in the README of ``almaan/her2st``. Pooch cannot open those archives: extract them
yourself (``7z x -p<password> count-matrices.zip``, ...) and pass the folder as ``path=``; the
extracted layout (``count-matrices/``, ``spot-selections/``, ``images/HE/<section>.jpg``) is
recognised as well as the original one.

No hashes are published for these files, so downloads are not hash-checked.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
from anndata import AnnData

from rankbygene._constants import PATIENT_KEY
from rankbygene._logging import logger
from rankbygene.io._st import read_st

__all__ = ["HER2ST_BASE_URL", "HER2ST_GENES_URL", "HER2ST_SECTIONS", "her2st", "her2st_genes"]

#: Where :func:`her2st` downloads from: the ``data/`` folder of ``almaan/her2st`` on GitHub.
HER2ST_BASE_URL = "https://raw.githubusercontent.com/almaan/her2st/master/data/"
#: The 785-gene panel of HisToGene/Hist2ST (``her_hvg_cut_1000``), as published by Hist2ST.
HER2ST_GENES_URL = (
    "https://raw.githubusercontent.com/biomed-AI/Hist2ST/main/data/her_hvg_cut_1000.npy"
)
#: The 36 sections of the data set: patients A-D with six sections each, E-H with three.
HER2ST_SECTIONS: tuple[str, ...] = tuple(
    f"{patient}{i}"
    for patient, n in zip("ABCDEFGH", (6, 6, 6, 6, 3, 3, 3, 3), strict=True)
    for i in range(1, n + 1)
)
# Image names known from the public repository; others are found by listing the section folder.
_KNOWN_IMAGES = {
    "B4": "BT10737_D2_HE.jpg",
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_GENES_NAME = "her_hvg_cut_1000"
_CACHE_SUBDIR = "her2st"
_TIMEOUT_S = 60


def her2st(
    section: str,
    path: str | Path | None = None,
    base_url: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> AnnData:
    """One section of the HER2+ breast cancer ST data set (Andersson et al. 2021).

    Legacy Spatial Transcriptomics, 36 sections of 8 patients (A-H), a few hundred spots of
    100 um each, H&E images of about 9,300 x 9,900 px. Read with :func:`rankbygene.io.read_st`.

    Parameters
    ----------
    section
        Section name, e.g. ``"B4"`` or ``"C2"``; its first letter is the patient.
    path
        A local copy in the original layout (the repository's ``data/`` folder, or the
        repository itself), or the extracted Zenodo archives. Nothing is downloaded then.
    base_url
        Where to download from when ``path`` is None; defaults to :data:`HER2ST_BASE_URL`.
        ``http(s)://`` and ``file://`` URLs of a folder in the original layout work.
    cache_dir
        Download cache; files go to ``cache_dir/her2st/`` in the original layout. Defaults to
        ``pooch.os_cache("rankbygene")``. Files already there are not downloaded again.
    progress
        Show download progress bars.

    Returns
    -------
    AnnData as :func:`rankbygene.io.read_st` returns it, with ``library_id`` = the section and
    ``obs["patient"]``.

    Raises
    ------
    ValueError
        Unknown section name, or both ``path`` and ``base_url`` given.
    FileNotFoundError
        The section's files are not in ``path``, or not at ``base_url``.
    ConnectionError
        A download failed.

    Notes
    -----
    The default source is the ``data/`` folder of the GitHub repository ``almaan/her2st``,
    which holds the files unencrypted. The Zenodo copy of the data set (record 3957257) is a set
    of 7z-encrypted archives that cannot be downloaded this way: extract them with the
    passwords published in the repository's README and pass the folder as ``path=``.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> adata = rbg.datasets.her2st("C2")  # doctest: +SKIP
    >>> adata = rbg.datasets.her2st("C2", path="her2st/data")  # doctest: +SKIP
    """
    section = _check_section(section, strict=path is None)
    if path is not None and base_url is not None:
        raise ValueError(
            "Pass either path (a local copy) or base_url (a download source), not both."
        )
    if path is not None:
        counts, spots, image = _local_files(Path(path).expanduser(), section)
    else:
        counts, spots, image = _download_files(section, base_url, cache_dir, progress)
    adata = read_st(counts, spots, image, library_id=section)
    adata.obs[PATIENT_KEY] = pd.Categorical([section[0]] * adata.n_obs)
    logger.info(f"added obs[{PATIENT_KEY!r}]")
    return adata


def her2st_genes(
    path: str | Path | None = None,
    url: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> list[str]:
    """The 785-gene panel used on the HER2+ data by HisToGene, Hist2ST, THItoGene and mclSTExp.

    Parameters
    ----------
    path
        ``her_hvg_cut_1000.txt`` (one gene per line) or ``.npy``, or a folder holding one.
    url
        Download source when ``path`` is None (``.txt`` or ``.npy``; ``http(s)://`` or
        ``file://``); defaults to :data:`HER2ST_GENES_URL`.
    cache_dir
        Download cache, as in :func:`her2st`.
    progress
        Show a download progress bar.

    Returns
    -------
    Gene symbols, in the file's order.

    Examples
    --------
    >>> import rankbygene as rbg
    >>> genes = rbg.datasets.her2st_genes()  # doctest: +SKIP
    >>> len(genes)  # doctest: +SKIP
    785
    """
    if path is not None:
        file = _gene_file(Path(path).expanduser())
    else:
        url = url or HER2ST_GENES_URL
        suffix = ".npy" if urlparse(url).path.lower().endswith(".npy") else ".txt"
        file = _fetch(url, f"{_GENES_NAME}{suffix}", _cache_root(cache_dir), progress)
    return _read_genes(file)


# --- sections and local files ---------------------------------------------------------------


def _check_section(section: str, strict: bool) -> str:
    if not isinstance(section, str) or not re.fullmatch(r"[A-Za-z]\d+", section.strip()):
        raise ValueError(
            f"section must be a name like 'B4' or 'C2' (patient letter, section number); "
            f"got {section!r}."
        )
    section = section.strip().upper()
    if strict and section not in HER2ST_SECTIONS:
        raise ValueError(
            f"Unknown section {section!r}; the public data set has {', '.join(HER2ST_SECTIONS)}."
        )
    return section


def _local_files(root: Path, section: str) -> tuple[Path, Path, Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"her2st folder not found: {root}")
    patient = section[0]
    for base in (root, root / "data"):
        layouts = (
            (
                [base / "ST-cnts" / f"{section}.tsv.gz", base / "ST-cnts" / f"{section}.tsv"],
                [
                    base / "ST-spotfiles" / f"{section}_selection.tsv",
                    base / "ST-spotfiles" / f"{section}_selection.tsv.gz",
                ],
                base / "ST-imgs" / patient / section,
            ),
            (  # the extracted Zenodo archives
                [base / "count-matrices" / f"{section}.tsv.gz"],
                [
                    base / "spot-selections" / f"{section}_selection.tsv.gz",
                    base / "spot-selections" / f"{section}_selection.tsv",
                ],
                base / "images" / "HE",
            ),
        )
        for count_candidates, spot_candidates, image_dir in layouts:
            counts = next((p for p in count_candidates if p.is_file()), None)
            if counts is None:
                continue
            spots = next((p for p in spot_candidates if p.is_file()), None)
            if spots is None:
                raise FileNotFoundError(
                    f"Spot file of section {section} not found; looked for "
                    f"{[str(p) for p in spot_candidates]}."
                )
            return counts, spots, _find_image(image_dir, section)
    available = sorted(
        p.name.split(".")[0]
        for sub in ("ST-cnts", "data/ST-cnts", "count-matrices", "data/count-matrices")
        for p in (root / sub).glob("*.tsv*")
    )
    raise FileNotFoundError(
        f"Count table of section {section} not found under {root} (looked for "
        f"ST-cnts/{section}.tsv.gz and count-matrices/{section}.tsv.gz, also under data/). "
        f"Sections there: {available or 'none'}."
    )


def _find_image(folder: Path, section: str) -> Path:
    if folder.name == "HE":  # Zenodo layout: images/HE/<section>.jpg
        found = [p for p in folder.glob(f"{section}.*") if p.suffix.lower() in _IMAGE_SUFFIXES]
    else:
        found = sorted(
            p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )
    if len(found) != 1:
        raise FileNotFoundError(
            f"Expected one H&E image of section {section} in {folder}; found "
            f"{[p.name for p in found] or 'none'}."
        )
    return found[0]


def _gene_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for base in (path, path / "data"):
            for suffix in (".txt", ".npy"):
                if (base / f"{_GENES_NAME}{suffix}").is_file():
                    return base / f"{_GENES_NAME}{suffix}"
        raise FileNotFoundError(f"No {_GENES_NAME}.txt or .npy in {path} (or its data/ folder).")
    raise FileNotFoundError(f"Gene list not found: {path}")


def _read_genes(path: Path) -> list[str]:
    if path.suffix.lower() == ".npy":
        values = _load_npy(path)
        genes = [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]
    else:
        with open(path) as handle:
            genes = [line.strip() for line in handle]
    genes = [g for g in genes if g]
    if not genes:
        raise ValueError(f"Gene list {path} is empty.")
    return genes


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy object arrays and nothing else: a downloaded file must not run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        if name == "_reconstruct":
            return _reconstruct()
        return super().find_class(module, name)


def _reconstruct() -> Any:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    return multiarray._reconstruct


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError:
        pass  # an object array (lists of str saved with dtype=object)
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            _, _, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"Unsupported .npy format version {version} in {path}.")
        if not dtype.hasobject:
            raise ValueError(f"Could not read {path} as a numpy array.")
        try:
            array = _ArrayUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise ValueError(f"Could not read gene list {path}: {err}") from err
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} does not hold an array.")
    return array


# --- downloads ------------------------------------------------------------------------------


def _cache_root(cache_dir: str | Path | None) -> Path:
    import pooch

    base = (
        Path(cache_dir).expanduser()
        if cache_dir is not None
        else Path(pooch.os_cache("rankbygene"))
    )
    return base / _CACHE_SUBDIR


def _download_files(
    section: str, base_url: str | None, cache_dir: str | Path | None, progress: bool
) -> tuple[Path, Path, Path]:
    base = (base_url or HER2ST_BASE_URL).rstrip("/") + "/"
    scheme = urlparse(base).scheme
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"base_url must be an http(s):// or file:// URL; got {base!r}.")
    cache = _cache_root(cache_dir)
    patient = section[0]
    counts = _fetch(
        base + f"ST-cnts/{section}.tsv.gz", f"ST-cnts/{section}.tsv.gz", cache, progress
    )
    spot_name = f"ST-spotfiles/{section}_selection.tsv"
    spots = _fetch(base + spot_name, spot_name, cache, progress)

    image_dir = f"ST-imgs/{patient}/{section}"
    cached = sorted(p for p in (cache / image_dir).glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if len(cached) == 1:
        return counts, spots, cached[0]
    name = _KNOWN_IMAGES.get(section)
    if name is not None:
        try:
            image = _fetch(
                base + f"{image_dir}/{quote(name)}", f"{image_dir}/{name}", cache, progress
            )
            return counts, spots, image
        except FileNotFoundError:
            logger.info(f"{name} not at {base}; listing {image_dir}")
    name = _list_image(base, image_dir, section)
    image = _fetch(base + f"{image_dir}/{quote(name)}", f"{image_dir}/{name}", cache, progress)
    return counts, spots, image


def _fetch(url: str, relative: str, cache: Path, progress: bool) -> Path:
    """Download ``url`` to ``cache/relative`` unless it is there already."""
    import pooch
    import requests

    target = cache / relative
    if target.is_file():
        return target
    scheme = urlparse(url).scheme
    if scheme == "file":
        downloader: Any = _copy_file_url
    elif scheme in ("http", "https"):
        downloader = pooch.HTTPDownloader(progressbar=progress, timeout=_TIMEOUT_S)
    else:
        raise ValueError(f"Only http(s):// and file:// URLs can be downloaded; got {url!r}.")
    try:
        found = pooch.retrieve(
            url,
            known_hash=None,  # the data set publishes no hashes
            fname=relative,
            path=cache,
            downloader=downloader,
            progressbar=progress,
        )
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 404:
            raise FileNotFoundError(f"Not found at the download source: {url}") from err
        raise ConnectionError(f"Could not download {url}: {err}") from err
    except requests.RequestException as err:
        raise ConnectionError(
            f"Could not download {url}: {err}. Without internet access, pass path= (a local "
            "copy) or base_url= (a reachable mirror)."
        ) from err
    return Path(found)


def _copy_file_url(url: str, output_file: Any, pooch: Any = None, check_only: bool = False) -> Any:
    """A pooch downloader for ``file://`` URLs: copies the file."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URLs must name a local file; got host {parsed.netloc!r}.")
    source = Path(url2pathname(unquote(parsed.path)))
    if check_only:
        return source.is_file()
    if not source.is_file():
        raise FileNotFoundError(f"Not found at the download source: {url}")
    if isinstance(output_file, str | os.PathLike):
        shutil.copyfile(source, output_file)
    else:
        with open(source, "rb") as handle:
            shutil.copyfileobj(handle, output_file)
    return None


def _list_image(base: str, image_dir: str, section: str) -> str:
    """The name of the one image in a section's folder at the download source."""
    import requests

    parsed = urlparse(base)
    if parsed.scheme == "file":
        folder = Path(url2pathname(unquote(parsed.path))) / image_dir
        names = [p.name for p in folder.glob("*")] if folder.is_dir() else []
    else:
        github = re.fullmatch(
            r"https?://raw\.githubusercontent\.com/([^/]+)/([^/]+)/([^/]+)/?(.*)", base
        )
        try:
            if github:  # raw.githubusercontent.com has no folder listings: ask the GitHub API
                owner, repo, ref, subfolder = github.groups()
                api = (
                    f"https://api.github.com/repos/{owner}/{repo}/contents/"
                    f"{subfolder.rstrip('/') + '/' if subfolder else ''}{image_dir}?ref={ref}"
                )
                response = requests.get(api, timeout=_TIMEOUT_S)
                response.raise_for_status()
                names = [item["name"] for item in response.json() if item.get("type") == "file"]
            else:  # an http server's folder index
                response = requests.get(base + image_dir + "/", timeout=_TIMEOUT_S)
                response.raise_for_status()
                hrefs = re.findall(r'href="([^"?#]+)"', response.text, flags=re.IGNORECASE)
                names = [unquote(h.rstrip("/").rsplit("/", 1)[-1]) for h in hrefs]
        except requests.RequestException as err:
            raise ConnectionError(
                f"Could not list the image of section {section} at {base}{image_dir}/: {err}"
            ) from err
    images = sorted({n for n in names if Path(n).suffix.lower() in _IMAGE_SUFFIXES})
    if len(images) != 1:
        raise FileNotFoundError(
            f"Expected one H&E image of section {section} at {base}{image_dir}/; found "
            f"{images or 'none'}."
        )
    return images[0]
