"""Every module that shows an example runs it: the examples are tests too.

Modules are found by their source holding ``>>>`` (examples all marked
``+SKIP``, which need a display or a running daemon, do not count); each is imported by its
package name and run through :mod:`doctest` (with ELLIPSIS, so a traceback's
or a path's details can be elided).
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("cli", "client", "common", "server", "sim")


def _modules_with_examples() -> list[str]:
    names = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            prompts = [line for line in path.read_text().splitlines() if ">>>" in line]
            # Examples that need a display or a daemon are marked +SKIP.
            if not prompts or all("doctest: +SKIP" in line for line in prompts):
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join(["keystay", folder, *parts]))
    return names


MODULES = _modules_with_examples()


def test_examples_are_found() -> None:
    assert len(MODULES) >= 8, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_pass(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} shows '>>>' but no example ran"
    assert result.failed == 0
