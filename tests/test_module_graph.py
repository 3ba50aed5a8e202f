"""longctx's modules import each other without a cycle, lazy function-level imports included: a cycle is two modules
that each need the other, one job split in two (issue 35). Read from the source, as a reviewer would."""

import ast
import graphlib
from pathlib import Path

from helpers_train import REPO

PACKAGE = REPO / "longctx"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it (relative or absolute, `from . import x` too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            found.update(c for c in [target] + [f"{target}.{a.name}" for a in node.names] if c in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return found - {name}


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> the modules it imports), [] if there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return e.args[1]
    return []


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert sorted(set(a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}))) == ["a", "b", "c"]
    assert a_cycle({"a": {"b"}, "b": set()}) == []


def test_longctx_has_no_import_cycle():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): imports_of(p, modules) for p in paths}
    assert len(graph) > 30 and graph["longctx.trainer"], "the import graph was not read"
    assert a_cycle(graph) == []
