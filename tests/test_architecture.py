"""The package layout of docs/architecture.md, checked on the source (static imports, lazy ones included)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medcl"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module name an ``import`` / ``from ... import`` in ``path`` names (top level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _medcl_edges(name: str) -> set[str]:
    """medcl modules that ``name`` imports (``from medcl.x import y`` counts as medcl.x.y when that is a module)."""
    edges = set()
    for target in _imports(MODULES[name]):
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name and target != "medcl":
            edges.add(target)
    return edges


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    # A package's __init__ re-exports its modules; an edge into it stands for the module it re-exports.
    graph = {name: {t for t in _medcl_edges(name) if not _is_package(t)} for name in MODULES}
    assert _cycles(graph) == []


def _top(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        graph.setdefault(_top(name), set()).update(_top(t) for t in _medcl_edges(name) if _top(t) != _top(name))
    assert _cycles(graph) == []


@pytest.mark.parametrize("lower, forbidden", [
    ("medcl.train", ("medcl.runner", "medcl.config.pipeline", "medcl.config.sweep", "medcl.config.space",
                     "medcl.cli", "medcl.report")),
    ("medcl.data", ("medcl.train", "medcl.runner", "medcl.tracking", "medcl.config", "medcl.cli")),
    ("medcl.models", ("medcl.train", "medcl.runner", "medcl.data", "medcl.tracking", "medcl.config")),
    ("medcl.losses", ("medcl.train", "medcl.runner", "medcl.data", "medcl.tracking", "medcl.config")),
    ("medcl.config", ("medcl.train", "medcl.runner", "medcl.tracking", "medcl.cli")),
    ("medcl.tracking", ("medcl.train", "medcl.runner", "medcl.data", "medcl.cli")),
])
def test_imports_point_down(lower, forbidden):
    bad = sorted(f"{name} -> {target}" for name in MODULES if _top(name) == lower or name.startswith(lower + ".")
                 for target in _medcl_edges(name) if target.startswith(forbidden))
    assert bad == []


@pytest.mark.parametrize("library, allowed", [
    ("mlflow", ("medcl.tracking",)),
    ("ray", ("medcl.runner", "medcl.train", "medcl.data.streams", "medcl.data.collate")),
])
def test_only_named_packages_import(library, allowed):
    bad = sorted(name for name, path in MODULES.items() if not name.startswith(allowed)
                 and any(i == library or i.startswith(library + ".") for i in _imports(path)))
    assert bad == []


def test_modules_are_small_or_say_why():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and f"{MAX_LINES}" not in doc:
            too_long.append(f"{name}: {lines} lines")
    assert too_long == []
