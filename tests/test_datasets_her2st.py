"""rankbygene.datasets.her2st: local copies, and downloads from file:// and http:// mirrors."""

from __future__ import annotations

import gzip
import http.server
import os
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import HER2ST, requires_her2st

from rankbygene.datasets import HER2ST_SECTIONS, her2st, her2st_genes
from rankbygene.datasets import _her2st as her2st_module

pytestmark = requires_her2st


def _mirror(root: Path, sections: tuple[str, ...] = ("C2", "B4")) -> Path:
    """A symlink tree laid out like the public source, the ``data/`` folder of almaan/her2st."""
    data = root / "her2st" / "data"
    for section in sections:
        for relative in (
            f"ST-cnts/{section}.tsv.gz",
            f"ST-spotfiles/{section}_selection.tsv",
            *(
                str(p.relative_to(HER2ST))
                for p in (HER2ST / "ST-imgs" / section[0] / section).glob("*.jpg")
            ),
        ):
            (data / relative).parent.mkdir(parents=True, exist_ok=True)
            (data / relative).symlink_to(HER2ST / relative)
    (data / "her_hvg_cut_1000.txt").symlink_to(HER2ST / "her_hvg_cut_1000.txt")
    return data


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def http_mirror(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve a mirror tree on 127.0.0.1; yields its base URL and the list of requested paths."""
    data = _mirror(tmp_path / "src")
    handler = type("Handler", (_CountingHandler,), {"requests": []})

    def make(*args, **kwargs):
        return handler(*args, directory=str(data), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def c2_local():
    return her2st("C2", path=HER2ST)


def _same(a, b) -> None:
    assert a.shape == b.shape
    assert list(a.obs_names) == list(b.obs_names)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    np.testing.assert_array_equal(
        a.uns["spatial"]["C2"]["images"]["hires"], b.uns["spatial"]["C2"]["images"]["hires"]
    )


# --- local copies ---------------------------------------------------------------------------


def test_local_section(c2_local) -> None:
    assert c2_local.n_obs == 187
    assert list(c2_local.uns["spatial"]) == ["C2"]
    assert list(c2_local.obs["library_id"].cat.categories) == ["C2"]
    assert list(c2_local.obs["patient"].cat.categories) == ["C"]
    assert c2_local.uns["spatial"]["C2"]["metadata"]["source_image_path"].endswith(
        "ST-imgs/C/C2/5714_HE_BT_C2.jpg"
    )


def test_local_section_name_is_normalised() -> None:
    adata = her2st(" b4 ", path=HER2ST)
    assert adata.n_obs == 283
    assert list(adata.obs["patient"].cat.categories) == ["B"]


def test_local_repository_root(tmp_path: Path, c2_local) -> None:
    # the repository itself (with data/ inside) works as well as its data/ folder
    data = _mirror(tmp_path, sections=("C2",))
    _same(her2st("C2", path=data.parent), c2_local)


def test_local_zenodo_layout(tmp_path: Path, c2_local) -> None:
    root = tmp_path / "zenodo"
    (root / "count-matrices").mkdir(parents=True)
    (root / "spot-selections").mkdir()
    (root / "images" / "HE").mkdir(parents=True)
    (root / "count-matrices" / "C2.tsv.gz").symlink_to(HER2ST / "ST-cnts" / "C2.tsv.gz")
    with gzip.open(root / "spot-selections" / "C2_selection.tsv.gz", "wb") as handle:
        handle.write((HER2ST / "ST-spotfiles" / "C2_selection.tsv").read_bytes())
    (root / "images" / "HE" / "C2.jpg").symlink_to(HER2ST / "ST-imgs/C/C2/5714_HE_BT_C2.jpg")
    _same(her2st("C2", path=root), c2_local)


def test_local_missing_section(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"section A1 .* Sections there: \['B4', 'C2'"):
        her2st("A1", path=HER2ST)
    with pytest.raises(FileNotFoundError, match="her2st folder not found"):
        her2st("C2", path=tmp_path / "nowhere")


def test_local_two_images_is_an_error(tmp_path: Path) -> None:
    data = _mirror(tmp_path, sections=("C2",))
    (data / "ST-imgs/C/C2/extra.jpg").symlink_to(HER2ST / "ST-imgs/C/C2/5714_HE_BT_C2.jpg")
    with pytest.raises(FileNotFoundError, match="Expected one H&E image"):
        her2st("C2", path=data)


@pytest.mark.parametrize(
    ("section", "kwargs", "message"),
    [
        ("Z9", {}, "Unknown section 'Z9'"),
        ("C22x", {}, "like 'B4'"),
        (4, {}, "like 'B4'"),
        ("C2", {"path": HER2ST, "base_url": "file:///x"}, "not both"),
        ("C2", {"base_url": "ftp://example.org/data/"}, "http"),
    ],
)
def test_bad_arguments(section: object, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        her2st(section, **kwargs)  # type: ignore[arg-type]


def test_sections_list() -> None:
    assert len(HER2ST_SECTIONS) == 36
    assert HER2ST_SECTIONS[0] == "A1"
    assert HER2ST_SECTIONS[-1] == "H3"


# --- downloads --------------------------------------------------------------------------------


def test_download_file_url_and_cache_reuse(tmp_path: Path, c2_local) -> None:
    data = _mirror(tmp_path / "src")
    cache = tmp_path / "cache"
    adata = her2st("C2", base_url=data.as_uri(), cache_dir=cache, progress=False)
    _same(adata, c2_local)
    cached = cache / "her2st"
    assert (cached / "ST-cnts" / "C2.tsv.gz").is_file()
    assert (cached / "ST-spotfiles" / "C2_selection.tsv").is_file()
    assert (cached / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg").is_file()
    assert adata.uns["spatial"]["C2"]["metadata"]["source_image_path"].startswith(str(cache))
    # the cache answers the second call: the source is gone
    shutil.rmtree(tmp_path / "src")
    _same(her2st("C2", base_url=data.as_uri(), cache_dir=cache, progress=False), c2_local)


def test_download_http_and_cache_reuse(
    tmp_path: Path, http_mirror: tuple[str, list[str]], c2_local
) -> None:
    base_url, requests = http_mirror
    cache = tmp_path / "cache"
    adata = her2st("C2", base_url=base_url, cache_dir=cache, progress=False)
    _same(adata, c2_local)
    assert sorted(requests) == [
        "/ST-cnts/C2.tsv.gz",
        "/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
        "/ST-spotfiles/C2_selection.tsv",
    ]
    requests.clear()
    _same(her2st("C2", base_url=base_url, cache_dir=cache, progress=False), c2_local)
    assert requests == []  # all from the cache


def test_download_lists_unknown_image_names(
    tmp_path: Path, http_mirror: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch, c2_local
) -> None:
    monkeypatch.setattr(her2st_module, "_KNOWN_IMAGES", {})
    base_url, requests = http_mirror
    adata = her2st("C2", base_url=base_url, cache_dir=tmp_path / "http", progress=False)
    _same(adata, c2_local)
    assert "/ST-imgs/C/C2/" in requests  # the folder index was read
    data = _mirror(tmp_path / "src2", sections=("C2",))
    adata = her2st("C2", base_url=data.as_uri(), cache_dir=tmp_path / "file", progress=False)
    _same(adata, c2_local)


def test_download_github_listing_uses_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    asked: list[str] = []

    class Response:
        def raise_for_status(self) -> None:
            pass

        def json(self) -> list[dict]:
            return [
                {"name": "HE_BT24044_D2.jpg", "type": "file"},
                {"name": "notes", "type": "dir"},
            ]

    def fake_get(url: str, timeout: float) -> Response:
        asked.append(url)
        return Response()

    monkeypatch.setattr(requests, "get", fake_get)
    name = her2st_module._list_image(her2st_module.HER2ST_BASE_URL, "ST-imgs/H/H1", "H1")
    assert name == "HE_BT24044_D2.jpg"
    assert asked == [
        "https://api.github.com/repos/almaan/her2st/contents/data/ST-imgs/H/H1?ref=master"
    ]


def test_download_missing_section_at_source(
    tmp_path: Path, http_mirror: tuple[str, list[str]]
) -> None:
    base_url, _ = http_mirror
    with pytest.raises(FileNotFoundError, match=r"Not found at the download source: .*A1\.tsv"):
        her2st("A1", base_url=base_url, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match=r"A1\.tsv\.gz"):
        her2st("A1", base_url=(tmp_path / "empty").as_uri(), cache_dir=tmp_path, progress=False)
    assert not list((tmp_path / "cache").rglob("*.tsv*"))  # nothing half-downloaded stays


def test_download_unreachable_source(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match="pass path="):
        her2st("C2", base_url="http://127.0.0.1:9/", cache_dir=tmp_path, progress=False)


# --- the gene panel ---------------------------------------------------------------------------


def test_genes_local() -> None:
    genes = her2st_genes(HER2ST)
    assert len(genes) == 785 == len(set(genes))
    assert genes[:3] == ["HPS6", "TNC", "NR1H2"]
    assert her2st_genes(HER2ST / "her_hvg_cut_1000.txt") == genes


def test_genes_download(tmp_path: Path, http_mirror: tuple[str, list[str]]) -> None:
    expected = her2st_genes(HER2ST)
    url = (HER2ST / "her_hvg_cut_1000.txt").as_uri()
    assert her2st_genes(url=url, cache_dir=tmp_path / "a", progress=False) == expected
    base_url, requests = http_mirror
    cache = tmp_path / "b"
    assert her2st_genes(url=base_url + "her_hvg_cut_1000.txt", cache_dir=cache) == expected
    assert her2st_genes(url=base_url + "her_hvg_cut_1000.txt", cache_dir=cache) == expected
    assert requests == ["/her_hvg_cut_1000.txt"]


@pytest.mark.parametrize("dtype", ["<U12", object])
def test_genes_npy(tmp_path: Path, dtype: object) -> None:
    # HisToGene and Hist2ST publish the panel as .npy (a string array, or an object array)
    expected = her2st_genes(HER2ST)
    path = tmp_path / "her_hvg_cut_1000.npy"
    np.save(path, np.array(expected, dtype=dtype), allow_pickle=True)
    assert her2st_genes(path) == expected
    assert her2st_genes(tmp_path) == expected
    assert her2st_genes(url=path.as_uri(), cache_dir=tmp_path / "c", progress=False) == expected


def test_genes_npy_refuses_code(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "|O", "fortran_order": False, "shape": (1,)}
        )
        pickle.dump(Exploit(), handle)
    with pytest.raises(ValueError, match="refusing to load"):
        her2st_genes(path)


def test_genes_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="her_hvg_cut_1000"):
        her2st_genes(tmp_path)
