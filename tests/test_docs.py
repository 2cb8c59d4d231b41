"""The documentation builds without a warning (``sphinx-build -W``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("myst_nb", reason="docs tools not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    html = tmp_path / "html"
    for page in ("index", "method", "data_layout", "api", "tutorials/quickstart"):
        assert (html / f"{page}.html").is_file(), page
    api = (html / "generated" / "rankbygene.RankByGene.html").read_text()
    assert "setup_anndata" in api
    assert "get_image_representation" in api
