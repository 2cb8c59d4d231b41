"""Sphinx configuration: myst-nb pages and tutorials, autosummary API, the scverse book theme."""

from __future__ import annotations

from importlib.metadata import version as _version

project = "rankbygene"
author = "rankbygene developers"
copyright = "2026, rankbygene developers"
release = _version("rankbygene")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "generated/*.ipynb", "**.ipynb_checkpoints", "Thumbs.db"]

# The tutorials are executed by the test suite (tests/test_tutorials.py), not by the docs build,
# so that building the docs needs neither data nor minutes of training.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "braces"
always_document_param_types = False

# Members inherited from scvi-tools' base classes are documented by scvi-tools.
autodoc_inherit_docstrings = True
# Signatures of the inherited scvi-tools machinery refer to types we do not document.
nitpicky = False
suppress_warnings = ["myst.header", "autosummary.import_cycle"]

html_theme = "sphinx_book_theme"
html_title = "rankbygene"
html_theme_options = {
    "repository_url": "https://github.com/rankbygene/rankbygene",
    "use_repository_button": True,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []


def _skip_hidden_scvi_methods(app, what, name, obj, skip, options):
    """scvi-tools methods that RankByGene hides (they cannot work for it) stay out of the API."""
    from rankbygene.model._unsupported import Unsupported

    return True if isinstance(obj, Unsupported) else None


def setup(app):
    app.connect("autodoc-skip-member", _skip_hidden_scvi_methods)
