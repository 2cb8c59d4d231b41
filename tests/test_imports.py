"""The package's import graph, read from the source: layers that only import downwards."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import rankbygene

PACKAGE = Path(rankbygene.__file__).parent
#: Folders that the image readers and the spatial layout sit below: they import none of them.
ABOVE_THE_LAYOUT = ("io", "data", "datasets", "model", "pp", "tl", "pl", "losses")
#: The applications on top (the command line and its demo); they alone import the root package.
ENTRY_POINTS = ("rankbygene.__main__", "rankbygene._demo")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, list[str], int]]]:
    """Each module's imports of the package (top level, in functions and for type checking):
    ``(target module, names imported from it, line)``."""
    found: dict[str, list[tuple[str, list[str], int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(alias.name, [], node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                edges.append((target, [alias.name for alias in node.names], node.lineno))
        found[module] = [e for e in edges if e[0].split(".")[0] == "rankbygene"]
    return found


IMPORTS = _imports()


def _folder(module: str) -> str:
    """``rankbygene.io._st`` -> ``io``; a module at the top is its own node: ``_constants``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rankbygene"


def _folder_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, edges in IMPORTS.items():
        for target, _, _ in edges:
            if _folder(target) != _folder(module):
                graph[_folder(module)].add(_folder(target))
    return graph


def test_the_graph_is_read():
    graph = _folder_graph()
    assert "_image" in graph["_layout"]  # the layout reads images
    assert "_layout" in graph["io"]  # the slide readers build the layout
    assert len(IMPORTS) > 50


def test_no_cycle_between_folders():
    graph = _folder_graph()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail(f"import cycle between folders: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("folder", ["_image", "_layout"])
def test_images_and_layout_import_nothing_above_them(folder):
    upward = sorted(
        f"{module}:{line} imports {target}"
        for module, edges in IMPORTS.items()
        if _folder(module) == folder
        for target, _, line in edges
        if _folder(target) in ABOVE_THE_LAYOUT or target == "rankbygene"
    )
    assert not upward


def test_image_readers_depend_on_nothing_but_the_logger():
    targets = {
        target
        for module, edges in IMPORTS.items()
        if _folder(module) == "_image"
        for target, _, _ in edges
        if _folder(target) != "_image"
    }
    assert targets <= {"rankbygene._logging"}


def test_only_the_entry_points_import_the_root_package():
    # a submodule importing ``rankbygene`` itself runs back up to what imports everything
    importers = sorted(
        f"{module}:{line}"
        for module, edges in IMPORTS.items()
        for target, _, line in edges
        if target == "rankbygene" and module not in ENTRY_POINTS
    )
    assert not importers


def test_no_private_name_is_imported_from_another_module():
    private = sorted(
        f"{module}:{line} imports {name} from {target}"
        for module, edges in IMPORTS.items()
        for target, names, line in edges
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != module
    )
    assert not private
