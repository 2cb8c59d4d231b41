"""Every tutorial notebook runs from top to bottom (on offline data; HER2+ when present), and
each notebook has the cells of its paired ``py:percent`` file, ``tutorials/scripts/<name>.py``
(``tutorials/jupytext.toml``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import HAS_HER2ST, HER2ST

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
SCRIPTS = TUTORIALS / "scripts"
NEEDS_HER2ST = {"her2st"}
NAMES = sorted(p.stem for p in TUTORIALS.glob("*.ipynb"))


def _cells(path: Path) -> list[tuple[str, str]]:
    jupytext = pytest.importorskip("jupytext", reason="jupytext not installed (the test extra)")
    return [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]


def test_every_tutorial_is_a_pair():
    assert NAMES
    assert sorted(p.stem for p in SCRIPTS.glob("*.py")) == NAMES
    assert "ipynb,scripts//py:percent" in (TUTORIALS / "jupytext.toml").read_text()


def test_no_script_beside_the_notebooks():
    # a notebook runs with its folder on sys.path: tutorials/spatialdata.py would be imported in
    # place of the spatialdata package
    assert not list(TUTORIALS.glob("*.py"))


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_notebook_matches_its_py_file(name):
    """Edit the .py, then ``jupytext --sync tutorials/scripts/<name>.py``: the .ipynb follows."""
    text, notebook = _cells(SCRIPTS / f"{name}.py"), _cells(TUTORIALS / f"{name}.ipynb")
    assert text == notebook, (
        f"tutorials/scripts/{name}.py and tutorials/{name}.ipynb differ: "
        f"jupytext --sync tutorials/scripts/{name}.py"
    )


@pytest.mark.parametrize("name", sorted(NEEDS_HER2ST))
def test_real_data_tutorials_are_committed_without_outputs(name):
    notebook = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


#: Lines of other libraries that a committed notebook must not show: tqdm's notebook bar without
#: ipywidgets, scvi-tools' bookkeeping at setup and load, warnings.
FOREIGN = ("IProgress", "Generating sequential column names", "already downloaded", "Warning")
#: The start of an absolute path of the machine that executed a notebook.
MACHINE_PATH = re.compile(
    r"(?<![\w.])(/(?:home|root|work|tmp|Users|mnt|var|opt|private)/|[A-Z]:\\)"
)


def _texts(notebook: nbformat.NotebookNode) -> list[str]:
    """Every text a notebook's outputs show: streams, plain and HTML data, errors."""
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if "text" in output:
                texts.append(output["text"])
            for kind in ("text/plain", "text/html"):
                if kind in output.get("data", {}):
                    texts.append(output["data"][kind])
            texts.extend(output.get("traceback", []))
    return ["".join(t) if isinstance(t, list) else t for t in texts]


@pytest.mark.parametrize("name", NAMES)
def test_committed_outputs_are_clean(name):
    """No foreign lines, progress bars stored as one frame, no path of the executing machine."""
    texts = _texts(nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4))
    for foreign in FOREIGN:
        assert not [t for t in texts if foreign in t], (name, foreign)
    paths = [m.group(0) for t in texts for m in [MACHINE_PATH.search(t)] if m]
    assert not paths, (name, paths)
    redrawn = [line for t in texts for line in t.split("\n") if line.count("%|") > 1]
    assert not redrawn, (name, redrawn[:1])


def _run(name: str, workdir: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    shutil.copy(TUTORIALS / f"{name}.ipynb", workdir)  # artefacts land in tmp, not the repo
    notebook = nbformat.read(workdir / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": workdir}}
    )
    client.execute()
    return notebook


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_tutorial_runs(name, tmp_path, monkeypatch):
    pytest.importorskip("nbclient", reason="notebook runner not installed")
    if name in NEEDS_HER2ST:
        if not HAS_HER2ST:
            pytest.skip(f"tutorial {name} needs the HER2+ data, not found at {HER2ST}")
        monkeypatch.setenv("RANKBYGENE_HER2ST", str(HER2ST))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    notebook = _run(name, tmp_path)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert images >= 1 or name == "encoders"
