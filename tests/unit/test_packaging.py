"""Packaging fits the deployment: a device does not install server libraries, nor the reverse."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

#: Third-party imports only one side may use, and the extra that installs them.
DEVICE_ONLY = {"pynput": "pynput", "Xlib": "python-xlib"}
SERVER_ONLY = {"matplotlib": "matplotlib", "rich": "rich", "tensorboardX": "tensorboardx"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def _top_imports(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_core_dependencies_hold_neither_sides_extras() -> None:
    core = _names(PROJECT["dependencies"])
    extras = PROJECT["optional-dependencies"]
    assert set(DEVICE_ONLY.values()) <= _names(extras["device"])
    assert set(SERVER_ONLY.values()) <= _names(extras["server"])
    assert not core & (set(DEVICE_ONLY.values()) | set(SERVER_ONLY.values()))
    assert not _names(extras["device"]) & set(SERVER_ONLY.values())
    assert not _names(extras["server"]) & set(DEVICE_ONLY.values())


def test_each_side_imports_only_its_own_extra() -> None:
    client, server = _top_imports("client"), _top_imports("server")
    shared = _top_imports("common") | _top_imports("sim") | _top_imports("cli")
    assert not client & set(SERVER_ONLY), "device code imports a server-only library"
    assert not server & set(DEVICE_ONLY), "server code imports a device-only library"
    assert not shared & (set(SERVER_ONLY) | set(DEVICE_ONLY))


def test_make_installs_both_extras() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-e '.[device,server]'" in makefile
    assert "-e '.[device,server,test]'" in makefile


def test_unit_tests_mirror_the_packages() -> None:
    # tests/unit/<package>/<sub>/test_x.py tests a module of <package>/<sub>/.
    unit = ROOT / "tests" / "unit"
    strays = [
        str(path.relative_to(unit))
        for path in unit.rglob("test_*.py")
        if path.parent != unit and not (ROOT / path.parent.relative_to(unit)).is_dir()
    ]
    assert not strays, f"test files in folders that mirror no package: {strays}"
    assert (unit / "client" / "daemon" / "test_core.py").exists()
