"""No import cycles inside sdpo/ (issue #28): the import graph of every module, read from the source with `ast`.

An edge a -> b is any import of sdpo module b written in a, at module level or inside a function or class body
(a lazy import only defers the cycle to the first call), except under `if TYPE_CHECKING:` (never run); a second
test counts those too.
`import sdpo.x.y` and `from sdpo.x.y import name` import sdpo.x.y; `from sdpo.x import y` imports sdpo.x.y when y
is a submodule of the package sdpo.x, else sdpo.x (its __init__.py); relative imports resolve the same way.
A module's parent packages, which Python runs first, are not edges: a package that imports its own submodules
(sdpo/envs/__init__.py) would otherwise make a cycle of every submodule that imports a sibling.
Imports whose module name is computed at run time (`__import__(f"sdpo.envs.{name}")`) are not seen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "sdpo"

Edges = dict[str, dict[str, int]]  # module -> {imported module: line of the first such import}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every .py file below `root`, the directory of `package`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, include_type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of the tree, at any depth; the body of `if TYPE_CHECKING:` only on request."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not include_type_checking:
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module `name` or the nearest enclosing one that is a file of the tree (`sdpo.x.attr` -> sdpo.x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, package: str, include_type_checking: bool = False) -> Edges:
    modules = module_files(root, package)
    graph: Edges = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path)), include_type_checking):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, modules) for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join([*base, node.module] if node.module else base)
                else:
                    source = node.module or ""
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    targets.append(submodule if submodule in modules else _known(source, modules))
            for target in targets:
                if target is not None and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def find_cycles(graph: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component of more than one module, as [a, b, ..., a]; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm (the graph is a few dozen modules: recursion is fine)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(_shortest_cycle(graph, component) for component in components)


def _shortest_cycle(graph: Mapping[str, Mapping[str, object]], component: set[str]) -> list[str]:
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first, inside the component, back to `start`
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph.get(node, {})):
                if nxt == start:
                    return [*paths[node], start]
                if nxt in component and nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(cycle: list[str], graph: Edges, modules: Mapping[str, Path]) -> str:
    steps = [f"  {a} -> {b}  ({modules[a].relative_to(SRC.parent)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def assert_no_cycles(include_type_checking: bool) -> None:
    graph = import_graph(SRC, "sdpo", include_type_checking)
    assert len(graph) > 30 and "sdpo.envs.base" in graph["sdpo.envs.arithmetic"]  # the walk saw the tree
    cycles = find_cycles(graph)
    modules = module_files(SRC, "sdpo")
    assert not cycles, "import cycles in sdpo/:\n" + "\n".join(describe(c, graph, modules) for c in cycles)


def test_sdpo_has_no_import_cycles():
    assert_no_cycles(include_type_checking=False)


def test_sdpo_has_no_import_cycles_for_type_checkers_either():
    """`if TYPE_CHECKING:` imports too: a cycle there still ties two modules together (each needs the other to be
    type-checked or read), and turns into a runtime cycle as soon as one of the imports is needed at run time."""
    assert_no_cycles(include_type_checking=True)


def test_the_cycle_finder_reports_a_cycle():
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c", "a"]]
    two = {"a": {"b": 1}, "b": {"a": 1}, "c": {"d": 1}, "d": {"c": 1}}
    assert find_cycles(two) == [["a", "b", "a"], ["c", "d", "c"]]
    assert find_cycles({"a": {"b": 1, "c": 1}, "b": {"c": 1}, "c": {}}) == []


def test_the_graph_follows_every_kind_of_import(tmp_path):
    """A fake package: absolute, relative, submodule-as-name and lazy imports are edges; TYPE_CHECKING ones are not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import thing\n",
        "a.py": "import os\nfrom . import b\nthing = 1\n",
        "b.py": "def f():\n    from .sub import c\n    return c\n",
        "sub/__init__.py": "",
        "sub/c.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import thing\nelse:\n"
                     "    import pkg.sub.d\n"),
        "sub/d.py": "from ..a import thing\nfrom pkg import sub\n",
    }
    for relative, text in files.items():
        (pkg / relative).write_text(text)
    graph = import_graph(pkg, "pkg")
    assert graph == {"pkg": {"pkg.a": 1}, "pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.sub.c": 2}, "pkg.sub": {},
                     "pkg.sub.c": {"pkg.sub.d": 5}, "pkg.sub.d": {"pkg.a": 1, "pkg.sub": 2}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.sub.d", "pkg.a"]]
    with_types = import_graph(pkg, "pkg", include_type_checking=True)
    assert with_types["pkg.sub.c"] == {"pkg.a": 3, "pkg.sub.d": 5}
