"""The package's shape: layers kept (import-linter), no import cycles, no module over 400 lines."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "signerd"
MAX_LINES = 400


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of signerd by dotted name, with its file and whether it is a package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        package = path.name == "__init__.py"
        if package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, package)
    return found


def imported(name: str, path: Path, package: bool, known: set[str]) -> Iterator[str]:
    """The signerd modules ``name`` imports anywhere in it: at the top, in functions and
    under TYPE_CHECKING alike (each ties the two modules together for a reader)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for candidate in (source, *(f"{source}.{a.name}" for a in node.names)):
                if candidate in known:
                    yield candidate
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in known)


def import_graph() -> dict[str, set[str]]:
    """Edges between modules; a package and the modules inside it are not an edge (its
    __init__ re-exports them, and importing one imports its package)."""
    found = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, package) in found.items():
        targets = set(imported(name, path, package, set(found)))
        graph[name] = {
            t
            for t in targets
            if t != name and not t.startswith(name + ".") and not name.startswith(t + ".")
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check below can fail: a -> b -> c -> a is found, a tree is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_module_imports_another_in_a_circle() -> None:
    """No two signerd modules import each other, directly or through others, even lazily
    or only for type checking."""
    graph = import_graph()
    assert len(graph) > 60
    assert cycles(graph) == []


def test_no_module_is_over_400_lines() -> None:
    """Every module of signerd has at most 400 lines."""
    long = {
        str(path.relative_to(ROOT)): n
        for path, _ in modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_import_linter_keeps_the_layers() -> None:
    """lint-imports passes the contracts in pyproject.toml (layers; the client side never
    imports the daemon side)."""
    tool = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(tool).exists():
        pytest.fail("lint-imports is not installed (the test extra has import-linter)")
    done = subprocess.run([tool], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout
