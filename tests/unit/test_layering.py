"""The import graph's layers and its cycles, read from the syntax trees.

Every ``import`` and ``from ... import`` of every module under ``client/``,
``server/``, ``common/``, ``sim/`` and ``cli/`` counts, including imports
inside functions and under ``TYPE_CHECKING``: a deferred import is still a
dependency (it is how the old cycles were hidden). The layers::

    cli ──► sim.federation ──► client ──► common ──► v1
                          └──► server ──► sim ──► common

``common`` imports neither side, ``client`` and ``server`` never import each
other, ``sim`` (the simulated employees) imports only ``common``.
``sim.federation`` (``keystay sim``: the deployment ServerApp over in-process
device cores) is the one package besides ``cli`` that joins both sides, and
nothing but ``cli`` imports it. This test replaces the per-module
deny-lists the suite used to carry.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"cli": "cli", "client": "client", "server": "server", "common": "common", "sim": "sim"}

#: What each top-level package may import (besides itself and third-party code).
ALLOWED = {
    "common": {"v1"},
    "sim": {"common", "v1"},
    "client": {"common", "sim", "v1"},
    "server": {"common", "sim", "v1"},
    "cli": {"client", "server", "common", "sim", "sim.federation", "v1"},
    "sim.federation": {"client", "server", "common", "sim", "v1"},
}


def _modules() -> Iterator[tuple[str, Path]]:
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join(["keystay", package, *parts]), path


def _imports(name: str, path: Path) -> set[str]:
    """Every keystay module ``path`` imports, as dotted names."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("keystay."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if not module.startswith("keystay."):
                continue
            found.add(module)
            # ``from keystay.common import windows`` imports a submodule.
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = dict(_modules())
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(name, path):
            # Resolve ``pkg.attr`` to the longest known module prefix.
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
            elif not parts:
                targets.add(imported)  # keystay.v1 and the like: not walked
        graph[name] = targets
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[1:3] == ["sim", "federation"]:
        return "sim.federation"
    return parts[1]


def test_every_import_respects_the_layers() -> None:
    graph = _graph()
    assert len(graph) > 50, "the walk found too few modules"
    bad = sorted(
        f"{src} imports {dst}"
        for src, targets in graph.items()
        for dst in targets
        if _layer(dst) != _layer(src) and _layer(dst) not in ALLOWED[_layer(src)]
    )
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles() -> None:
    # A package's __init__ importing its own children is not a cycle of design.
    graph = {
        src: {dst for dst in targets if not src.startswith(dst + ".") and src != dst}
        for src, targets in _graph().items()
    }
    assert _cycles(graph) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert _cycles(graph) == expected


def test_the_layer_check_catches_a_server_import_of_device_code(tmp_path: Path) -> None:
    module = tmp_path / "x.py"
    module.write_text("def f():\n    from keystay.client.store import EventStore\n")
    assert "keystay.client.store" in _imports("keystay.server.x", module)
