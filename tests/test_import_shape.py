"""The shape of the code: no import circles in jobd, jobctl or protocol, and
jobd and jobctl never import each other (protocol, below both, imports neither).

Every import counts: at the top of a module, inside a function (imported
late, for start-up time), and under ``TYPE_CHECKING`` (no cost at run time,
but the same knot for a reader). ``from package import name`` counts as an
import of the package's ``__init__`` unless ``name`` is a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobd", "jobctl", "protocol")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Each module of the three packages and the modules of theirs it imports."""
    mods = modules()

    def ours(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(m for a in node.names if (m := ours(a.name)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    target = full if full in mods else ours(source)
                    if target:
                        imported.add(target)
        imported.discard(name)
        graph[name] = imported
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    graph = import_graph()
    assert len(graph) > 60 and "jobd.engine._db" in graph  # the walk found the code
    knots = circles(graph)
    assert knots == [], "\n".join(
        " ".join(f"{m} -> {sorted(t for t in graph[m] if t in knot)};" for m in knot)
        for knot in knots)


def test_jobd_and_jobctl_never_import_each_other() -> None:
    crossing = sorted(
        f"{source} imports {target}"
        for source, targets in import_graph().items()
        for target in targets
        if (source.split(".")[0], target.split(".")[0]) in
        {("jobd", "jobctl"), ("jobctl", "jobd"), ("protocol", "jobd"), ("protocol", "jobctl")})
    assert crossing == []


def test_the_checks_see_a_circle_and_a_crossing() -> None:
    """The graph walk itself: a circle and a crossing made up here are found."""
    graph = {"jobctl._a": {"jobctl._b"}, "jobctl._b": {"jobctl._c"},
             "jobctl._c": {"jobctl._a", "jobd._x"}, "jobd._x": set()}
    assert circles(graph) == [["jobctl._a", "jobctl._b", "jobctl._c"]]
    real = import_graph()
    assert "protocol._x509" in real["jobd._expiry"]  # imports are read (both kinds)
    assert "jobctl._follow" in real["jobctl._commands"]  # a late import in a function
    assert "protocol._pki" in real["jobctl._cert"]
