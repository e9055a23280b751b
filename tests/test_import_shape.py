"""The shape of the code: no import circles in jobd, jobctl or protocol, and
jobd and jobctl never import each other (protocol, below both, imports neither).

Every import counts: at the top of a module, inside a function (imported
late, for start-up time), and under ``TYPE_CHECKING`` (no cost at run time,
but the same knot for a reader). ``from package import name`` counts as an
import of the package's ``__init__`` unless ``name`` is a module.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

# ROOT: the source tree, also when the suite runs against the installed wheel
# (JOBD_SOURCE_ROOT): the shape is read from the source, the docs beside it.
from .conftest import ROOT

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


@functools.cache
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


def map_arrows() -> list[tuple[str, str]]:
    """The arrows of docs/architecture.md's map, as (module, imported module).

    A line holds groups ``A, B ─▶ C, D (a note); late: E`` three spaces apart;
    an arrow's line ending in a comma goes on on the next; other lines are notes."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("### Map: modules and who imports whom", 1)[1].split("```")[1]
    package = ""
    arrows: list[tuple[str, str]] = []
    sources: list[str] = []
    carried = False  # the last line ended in a comma: this one goes on

    def module(word: str) -> str:
        if word == "__init__":
            return package
        if word == "engine":
            return "jobd.engine"
        if word.startswith("protocol"):
            return word
        return f"{package}.{word}"

    def targets(text: str) -> list[str]:
        words = re.sub(r"\([^)]*\)", "", text).replace(";", ",").split(",")
        cleaned = (w.strip().removeprefix("late:").strip() for w in words)
        return [module(w) for w in cleaned if w and w != "..."]

    for line in block.splitlines():
        if line.startswith(("jobd", "jobctl")):
            package = line.split()[0]
            continue
        if "engine/:" in line:
            package = "jobd.engine"
            line = line.replace("engine/:", "")
        drawn = False
        for group in re.split(r"\s{3,}", line.strip()):
            if "─▶" in group:
                left, right = group.split("─▶")
                sources = targets(left)
            elif carried:
                right = group
            else:
                continue
            arrows.extend((source, target) for source in sources for target in targets(right))
            carried, drawn = False, True
        carried = drawn and line.rstrip().endswith(",")
    return arrows


def test_the_architecture_map_draws_only_real_imports() -> None:
    graph = import_graph()
    arrows = map_arrows()
    assert len(arrows) > 80 and ("jobd._session", "jobd._handlers") in arrows
    assert ("jobctl._blocking", "jobctl._calls") in arrows
    assert ("jobd.engine._job", "jobd.engine._ladder") in arrows
    unknown = sorted({m for arrow in arrows for m in arrow if m not in graph})
    assert unknown == [], "the map names modules that do not exist"
    wrong = sorted(f"{a} -> {b}" for a, b in arrows if b not in graph[a])
    assert wrong == [], "the map draws imports the code does not make"
