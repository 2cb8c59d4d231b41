"""The documentation builds without a warning (``sphinx-build -W``)."""

from __future__ import annotations

import re
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
    assert "get_latent_representation" in api
    for hidden in ("differential_abundance", "get_normalized_expression"):
        assert hidden not in api, hidden  # scvi-tools methods that cannot work here


#: Where the package writes a key: a subscription assigned to (``adata.obs[KEY] = ...``), a dict
#: literal's key (``{KEY: ...}``, entries of ``uns["spatial"]``), or the default of a
#: ``key_added``/``layer_added`` argument.
_WRITTEN_CONSTANT = (
    re.compile(r"\[([A-Z][A-Z0-9_]*)\]\s*=(?!=)"),
    re.compile(r"(?:^|[{,])[ \t]*([A-Z][A-Z0-9_]*)\s*:(?![ \t]*[\w.\[\], |]*(?:=|$))", re.M),
    re.compile(r"(?:key_added|layer_added)\b[^\n]*?\b([A-Z][A-Z0-9_]*)\b"),
)
_WRITTEN_LITERAL = re.compile(r"\.(?:obs|obsm|layers|var|varm|obsp|uns)\[\"([^\"]+)\"\]\s*=(?!=)")


def _keys_written() -> dict[str, str]:
    """Key -> the package file that writes it, from the package's source."""
    import rankbygene
    from rankbygene import _constants
    from rankbygene._layout import _keys

    written = {}
    package = Path(rankbygene.__file__).parent
    for path in sorted(package.rglob("*.py")):
        # doctest lines write into the examples' own objects
        source = re.sub(r"^\s*(?:>>>|\.\.\.) .*$", "", path.read_text(), flags=re.M)
        for pattern in _WRITTEN_CONSTANT:
            for name in pattern.findall(source):
                value = getattr(_constants, name, getattr(_keys, name, None))
                if isinstance(value, str):
                    written.setdefault(value, f"{path.relative_to(package)} ({name})")
        for key in _WRITTEN_LITERAL.findall(source):
            if not key.startswith("_"):  # throwaway objects' own keys
                written.setdefault(key, str(path.relative_to(package)))
    return written


def test_data_layout_names_every_key_the_package_writes():
    written = _keys_written()
    # the grep finds the package's writes: outputs, layers of pp, metadata of the readers
    for key in ("X_rankbygene", "lognorm", "rankbygene_panel", "patches_path", "tile_size_um"):
        assert key in written, key
    text = re.sub(r"```.*?```", "", (DOCS / "data_layout.md").read_text(), flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", text)
    missing = {key: where for key, where in written.items() if not any(key in s for s in spans)}
    assert not missing, f"docs/data_layout.md does not name {missing}"
