"""The package's imports point down its layers: no module imports one that imports it back,
through any chain, whether the import runs at module level or inside a function (a deferred import
is still a dependency), and nothing in ``gradlab/figures/`` imports ``gradlab.reproduce`` (a figure
draws what the experiments compute; the catalogue sits above)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradlab"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The gradlab modules an import statement names (``from pkg import sub`` names ``pkg.sub``
    when that is a module, else ``pkg``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in modules:
            out.append(sub)
        elif base in modules:
            out.append(base)
    return out


def _edges(module_level: bool) -> dict[str, set[str]]:
    """module -> the gradlab modules it imports: at module level (what runs on import), or anywhere.
    A module's import of its own package (``gradlab.reproduce.feng`` of ``gradlab.reproduce``) is
    left out: the package's ``__init__`` runs before any of its modules anyway, and a package that
    lists its entries (a registry) while they import its shared names is one unit, not a cycle."""
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level else list(ast.walk(tree))
        found = edges.setdefault(name, set())
        for node in nodes:
            found.update(t for t in _targets(name, path, node, modules) if not name.startswith(t + ".") and t != name)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module_level", [True, False], ids=["module level", "anywhere"])
def test_no_module_imports_one_that_imports_it_back(module_level):
    edges = _edges(module_level)
    assert "gradlab.experiments.validate" in edges["gradlab.experiments.runner"]  # the scan sees imports
    assert _cycles(edges) == []


def test_no_figure_imports_the_reproduction_catalogue():
    edges = _edges(module_level=False)
    upward = sorted(f"{m} -> {t}" for m, targets in edges.items() if m.startswith("gradlab.figures")
                    for t in targets if t == "gradlab.reproduce" or t.startswith("gradlab.reproduce."))
    assert upward == []
