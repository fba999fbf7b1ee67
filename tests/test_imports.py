"""The project's import structure, read from the source (ast), nothing imported: no cycle between the project's
modules, and the layering of docs/CONTRIBUTING.md.

Every import statement counts, wherever it is: at module level, inside a function (a deferred import is
still a dependency) and under `if TYPE_CHECKING:`. An import of `a.b.c` is an edge to the module `a.b.c`
(or, for `from a.b import c`, to `a.b.c` when that is a module and to `a.b` otherwise); the package
`__init__` files that Python runs on the way are not edges, since a package's `__init__` importing its own
modules is no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sandbox", "trainer", "orchestrator", "analysis")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(path: Path, module: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(dotted name, line) of everything the file imports, relative imports resolved: `import a.b` gives
    a.b; `from a import b` gives a.b when that is a project module, else a."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                names.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node.lineno))
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    """(module -> the project modules it imports, module -> every (dotted name, line) it imports)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    raw: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        raw[name] = imported_names(path, name, modules)
        graph[name] = set()
        for dotted, _ in raw[name]:
            parts = dotted.split(".")
            # the module itself, or the deepest project module it lies in (`import a.b.Thing` is rare but legal)
            target = next((".".join(parts[:end]) for end in range(len(parts), 0, -1)
                           if ".".join(parts[:end]) in modules), None)
            if target is not None and target != name:
                graph[name].add(target)
    return graph, raw


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, for the failure message."""
    start = component[0]
    members = set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(graph[node] & members):
            if succ == start:
                return paths[node] + [start]
            if succ not in paths:
                paths[succ] = paths[node] + [succ]
                queue.append(succ)
    return component


def test_the_graph_is_read():
    graph, _ = import_graph()
    assert {"trainer.runtime", "trainer.evaluate", "trainer.losses"} <= graph["trainer.trial"]
    assert "trainer.options" in graph["trainer.config"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph, _ = import_graph()
    cycles = [" -> ".join(cycle_path(graph, component)) for component in find_cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# (package, top-level names it must not import, why)
LAYERS = [
    ("sandbox", {"trainer", "orchestrator", "torch"}, "the sandbox is the world of a trial; it runs without torch"),
    ("analysis", {"torch", "ray", "vllm", "trainer", "sandbox", "orchestrator"},
     "results open on a laptop with the analysis alone"),
    ("trainer", {"orchestrator"}, "nothing imports the orchestrator"),
]


@pytest.mark.parametrize("package, forbidden, why", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_layering(package, forbidden, why):
    _, raw = import_graph()
    offending = sorted({f"{module} imports {dotted.split('.')[0]} (line {line})"
                        for module, names in raw.items() if module.split(".")[0] == package
                        for dotted, line in names if dotted.split(".")[0] in forbidden})
    assert not offending, f"{why}:\n" + "\n".join(offending)


def test_modules_fit_in_one_sitting():
    """docs/CONTRIBUTING.md: a module over ~500 lines says at its top why it is not split."""
    long = {name: n for name, path in project_modules().items()
            for text in [path.read_text()] for n in [len(text.splitlines())]
            if n > 500 and "Why one module" not in text[:4000]}
    assert not long
