"""The house rules of the import graph: no cycle in node/ or mesh/ (imports inside
functions and under TYPE_CHECKING count), transports never import the Node, and the rules
(protocol, presence, limits) import no I/O at all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "mesh")
#: The pure core: no sockets, clocks, environment, event loop or transport.
RULES = ("node.protocol", "node.presence", "node.limits")
IO_MODULES = {"asyncio", "socket", "ssl", "os", "time", "subprocess", "threading", "select",
              "websockets", "aioquic", "nats", "aiohttp", "opentelemetry"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """Every module ``name`` imports (absolute names, relative ones resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = {resolve(t) for t in imports(path, name)}
        # A module's own package __init__ is its face, not a tie.
        edges[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_node_or_mesh() -> None:
    assert cycles(graph()) == []


def test_the_walker_finds_a_cycle_when_there_is_one() -> None:
    edges = graph()
    edges["node.protocol"] = edges["node.protocol"] | {"node.server"}
    assert any("node.server" in c and "node.protocol" in c for c in cycles(edges))


def test_transports_and_endpoints_do_not_import_the_node() -> None:
    edges = graph()
    upward = [(m, t) for m, targets in edges.items() for t in targets
              if (m.startswith("node.transports") or m == "node.endpoints")
              and t in ("node.server", "node.app", "node.cli")]
    assert upward == []


def test_the_rules_import_no_io() -> None:
    mods, edges = modules(), graph()
    for name in RULES:
        roots = {t.split(".")[0] for t in imports(mods[name], name)}
        assert not roots & IO_MODULES, f"{name} imports {sorted(roots & IO_MODULES)}"
        inner = {t for t in edges[name] if t.startswith(("node.", "mesh."))}
        assert inner <= {*RULES, "node.config"}, f"{name} imports {sorted(inner)}"
