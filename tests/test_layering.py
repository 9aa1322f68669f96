"""The architecture at a glance, kept: every module of `pipeline/` imports, and data flows one way
through its packages. A package imports only those below it in LAYERS, never a sibling, never one
above; and no two modules import each other, directly or around a circle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# lowest first; the packages of one layer do not import each other
LAYERS = [
    {"config", "system", "storage"},
    {"data", "models"},
    {"tracking"},
    {"train"},
    {"serve"},
    {"cluster"},
    {"bench", "study"},
    {"cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _source(module: str) -> Path:
    path = PACKAGE.parent / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports_of(module: str) -> set[str]:
    """The `pipeline` modules that `module` imports, at the top or inside a function."""
    found = set()
    known = set(_modules())
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pipeline import x`
    return {name for name in found if name in known and name != "pipeline"} - {module}


def package_of(module: str) -> str:
    return module.split(".")[1]


def test_every_package_is_in_a_layer() -> None:
    assert {package_of(m) for m in _modules() if m != "pipeline"} == set(RANK)


@pytest.mark.parametrize("module", [m for m in _modules() if not m.endswith("__main__")])  # that one runs
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_no_package_imports_a_package_above_it_or_beside_it() -> None:
    upward = []
    for module in _modules():
        if module == "pipeline":
            continue
        for imported in imports_of(module):
            mine, theirs = package_of(module), package_of(imported)
            if mine != theirs and RANK[theirs] >= RANK[mine]:
                upward.append(f"{module} -> {imported}")
    assert not upward


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports in `graph` (module -> the modules it imports), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        for imported in sorted(graph[module]):
            if imported in path:
                return path[path.index(imported) :] + [imported]
            if imported not in done:
                if cycle := visit(imported, path + [imported]):
                    return cycle
        done.add(module)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_module_imports_itself_around_a_circle() -> None:
    assert find_cycle({module: imports_of(module) for module in _modules()}) is None


def test_the_walk_sees_late_imports_and_circles() -> None:
    # a late import (inside a function) is an import too: today's main had its circle that way
    assert "pipeline.models" in imports_of("pipeline.serve.inference")  # inside a method
    assert "pipeline.tracking" in imports_of("pipeline.tracking.registry")  # `from pipeline.tracking import`
    circle = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(circle) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
