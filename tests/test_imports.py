"""The package's import graph: no cycles, and a recipe schema that imports no implementation.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` statement, at module level or inside a function or ``TYPE_CHECKING`` block,
relative ones resolved against the importing module. An edge goes to the module a statement names,
or to the submodule when it imports one (``from . import cuda``: the submodule, not the package's
``__init__``). The parent packages Python imports first are not edges: every submodule would then
form a cycle with an ``__init__`` that imports it.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import orthoquant

PACKAGE = Path(orthoquant.__file__).parent
# The schema and what it is built from: the leaves a recipe needs, importable without torch.
SCHEMA = "orthoquant.config"
SCHEMA_MAY_IMPORT = {"orthoquant.choices", "orthoquant.config_codec", "orthoquant.config_stages", "orthoquant.errors"}
SCHEMA_EXTERNAL = {"yaml"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(name: str, is_package: bool, source: str) -> set[tuple[str, str]]:
    """(module, member) of every import in ``source`` (module ``name``), module names absolute; the
    member is "" for ``import module`` and may itself be a submodule."""
    package = name if is_package else name.rpartition(".")[0]  # where relative imports start
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {(alias.name, "") for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found |= {(base, alias.name) for alias in node.names}
    return found


def all_imports() -> dict[str, set[tuple[str, str]]]:
    """Module of the package -> (module, member) of every import it makes."""
    return {module_name(p): imported_names(module_name(p), p.name == "__init__.py", p.read_text(encoding="utf-8"))
            for p in PACKAGE.rglob("*.py")}


def import_graph(imports: dict[str, set[tuple[str, str]]]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (external imports left out)."""
    def target(module: str, member: str) -> str:
        return f"{module}.{member}" if f"{module}.{member}" in imports else module

    return {name: {t for pair in pairs if (t := target(*pair)) in imports and t != name}
            for name, pairs in imports.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(all_imports()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_recipe_schema_imports_no_implementation():
    imports = all_imports()
    inside = reachable(import_graph(imports), SCHEMA)
    assert inside <= SCHEMA_MAY_IMPORT, f"{SCHEMA} imports {sorted(inside - SCHEMA_MAY_IMPORT)}"
    modules = {module for m in inside | {SCHEMA} for module, _ in imports[m]}
    outside = {m.split(".")[0] for m in modules if not m.startswith("orthoquant")} - set(sys.stdlib_module_names)
    assert outside <= SCHEMA_EXTERNAL, f"{SCHEMA} imports {sorted(outside - SCHEMA_EXTERNAL)}"


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_find_cycle_names_the_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_relative_imports_resolve_inside_functions_too():
    code = "def f():\n    from ..formats import base\n    from . import cuda\n    import yaml\n"
    pairs = imported_names("orthoquant.hadamard.fwht", False, code)
    assert pairs == {("orthoquant.formats", "base"), ("orthoquant.hadamard", "cuda"), ("yaml", "")}
    assert imported_names("orthoquant.recipes", True, "from .codec import x") == {("orthoquant.recipes.codec", "x")}
    modules = {"a": {("a.b", "")}, "a.b": {("a", "c"), ("a", "name")}, "a.c": set()}
    assert import_graph(modules) == {"a": {"a.b"}, "a.b": {"a.c", "a"}, "a.c": set()}
