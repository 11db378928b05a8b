"""The package's shape: the core never sees argparse or the command line, and no two modules import each other
(directly or round a circle), counting imports inside functions too. Read from the source, not by importing."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "vanillakd"
# reading the seed's and timm's training checkpoints: they pickle their flags as an argparse.Namespace, which
# must be named to torch's weights-only loader; no parsing happens there
ARGPARSE_ALLOWED = {"vanillakd.checkpoint"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_package(name: str) -> bool:
    return (REPO / Path(*name.split(".")) / "__init__.py").is_file()


def exists(name: str) -> bool:
    return is_package(name) or (REPO / Path(*name.split("."))).with_suffix(".py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute names (``from . import x`` of a
    submodule counts as importing the submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if exists(f"{base}.{alias.name}"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_core_never_imports_argparse_or_the_cli():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith("vanillakd.cli") or name == "vanillakd.__main__":
            continue
        bad = {m for m in imports_of(path) if m == "argparse" or m.startswith("vanillakd.cli")}
        if name in ARGPARSE_ALLOWED:
            bad.discard("argparse")
        if bad:
            offenders.append(f"{name}: {sorted(bad)}")
    assert not offenders, "core modules importing argparse or vanillakd.cli:\n" + "\n".join(offenders)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as the list of modules round it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            # a package importing its own submodules (its __init__ re-exporting them) is not a circle
            if node == nxt.rpartition(".")[0] and is_package(node):
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("edges,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
])
def test_the_circle_finder_finds_circles(edges, expected):
    assert find_cycle(edges) == expected


def test_relative_imports_resolve_to_modules(tmp_path):
    # the walk sees function-level and relative imports: the training module reaches the student module
    assert "vanillakd.student" in imports_of(PACKAGE / "train.py")
    assert "vanillakd.losses.registry" in imports_of(PACKAGE / "losses" / "kd.py")


MAX_FUNCTION_LINES = 60


def test_functions_read_at_once():
    """The house habit: no function or method longer than a screen (docstring and comments included)."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
