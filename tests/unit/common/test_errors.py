"""One error language: the exit-code registry and the KeystayError hierarchy."""

from __future__ import annotations

import ast
from pathlib import Path

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import EXIT_CODE_HELP, ExitCode, exit_help

ROOT = Path(__file__).resolve().parents[3]


def test_every_exit_code_has_a_help_line() -> None:
    for code in ExitCode:
        assert exit_help(code).strip(), code
    assert set(EXIT_CODE_HELP) == set(ExitCode)


def test_documented_numbers_are_unchanged() -> None:
    # The numbers commands documented before the registry; scripts check them.
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0, "UNEXPECTED": 1, "USAGE": 2, "BUDGET_VIOLATIONS": 3,
        "DEVICE_POLICY": 10, "DEVICE_STORE": 11, "DEVICE_NO_DISPLAY": 12,
        "DEVICE_TRAINER": 13, "DEVICE_SOCKET": 14, "DEVICE_SERVER_CODE_ACCESS": 15,
        "DEVICE_LEDGER": 16,
        "SERVER_CONFIG": 20, "SERVER_SUPERLINK_DOWN": 21, "SERVER_RUN_FAILED": 22,
        "SERVER_ENROLL_REFUSED": 23, "SERVER_LEDGER": 24, "SERVER_DISK_FULL": 25,
        "SERVER_SUPERLINK_STATE": 26,
        "ENROLL_SERVER_UNREACHABLE": 30, "ENROLL_SERVER_UNTRUSTED": 31, "ENROLL_KEYS": 32,
        "PAGE_NO_DAEMON": 40, "PAGE_CANNOT_LISTEN": 41, "SIM_ENGINE": 50, "SIM_RUN_FAILED": 51,
        "REAPER_PARENT_GONE": 75,
    }
    assert ExitCode.BUDGET_LEDGER_UNREADABLE == 1


def _exception_classes() -> list[tuple[str, str, list[str]]]:
    found = []
    for folder in ("client", "server", "common", "sim", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith("_pb2.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                    bases = [ast.unparse(b) for b in node.bases]
                    found.append((str(path.relative_to(ROOT)), node.name, bases))
    return found


def test_every_error_class_is_a_keystay_error() -> None:
    classes = _exception_classes()
    assert len(classes) > 20
    names = {name for _, name, _ in classes}
    bad = [
        f"{path}: {name}({', '.join(bases)})"
        for path, name, bases in classes
        if name != "KeystayError" and not any(b in names for b in bases)
    ]
    assert not bad, "\n".join(bad)


def test_error_class_names_do_not_clash() -> None:
    names = [name for _, name, _ in _exception_classes()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_an_instance_may_carry_its_own_code() -> None:
    from keystay.client.daemon.main import DaemonError

    error = DaemonError(ExitCode.DEVICE_SOCKET, "the socket is taken")
    assert isinstance(error, KeystayError)
    assert error.exit_code is ExitCode.DEVICE_SOCKET
    assert KeystayError("x").exit_code is ExitCode.UNEXPECTED
