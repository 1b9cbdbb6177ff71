"""Supervision ties children to the daemon: a SIGKILLed daemon leaves nothing running.

Before the reaper (keystay.client.daemon.reaper), ``kill -9`` of ``keystay
device run --superlink ...`` left its ``flower-supernode`` (and SuperExec)
running: the restarted daemon's SuperNode could not bind its port, and the
orphan went on serving rounds through the new daemon's socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystay.server.deploy.superlink import executable, flower_env

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_mentioning(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose command line contains ``marker``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != b"Z":
            found[int(entry)] = cmdline
    return found


def _start(data: Path, log: Path, superlink_port: int, runtime_port: int,
           ) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [executable("keystay"), "device", "run", "--data", str(data),
             "--superlink", f"127.0.0.1:{superlink_port}", "--insecure",
             "--supernode-port", str(runtime_port), "--source", "none",
             "--accept-server-code-access"],
            stdout=out, stderr=subprocess.STDOUT, env=flower_env(), start_new_session=True,
        )


def _wait_for_supernode(data: Path, timeout: float = 60.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {p: c for p, c in _processes_mentioning(str(data)).items()
                 if "flower-supernode" in c and "reaper" not in c}
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("the daemon started no flower-supernode")


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    markers: list[str] = []
    yield markers
    for marker in markers:  # whatever a failing test left behind
        for pid in _processes_mentioning(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigkilled_daemon_leaves_no_supernode(tmp_path: Path, cleanup: list[str]) -> None:
    data = tmp_path / "device"
    cleanup.append(str(data))
    # Nothing listens there: the SuperNode keeps retrying, as it would while
    # a laptop is offline. That is enough to have it (and its reaper) running.
    superlink, runtime = _free_port(), _free_port()
    daemon = _start(data, tmp_path / "daemon.log", superlink, runtime)
    supernodes = _wait_for_supernode(data)

    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(10)

    deadline = time.monotonic() + 20
    while _processes_mentioning(str(data)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _processes_mentioning(str(data))
    assert left == {}, f"outlived the SIGKILLed daemon: {left}"

    # The restarted daemon gets its SuperNode (on the same port) and only one.
    again = _start(data, tmp_path / "daemon.log", superlink, runtime)
    try:
        restarted = _wait_for_supernode(data)
        assert set(restarted).isdisjoint(supernodes)
        time.sleep(2)
        assert len([c for c in _processes_mentioning(str(data)).values()
                    if "flower-supernode" in c and "reaper" not in c]) == 1
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(30)
    assert _processes_mentioning(str(data)) == {}


def test_relative_data_folder_works_for_the_employees_commands(
    tmp_path: Path, cleanup: list[str]
) -> None:
    data = tmp_path / "dev1"
    cleanup.append(str(data))
    with (tmp_path / "daemon.log").open("ab") as out:
        daemon = subprocess.Popen(
            [executable("keystay"), "device", "run", "--data", "dev1", "--source", "none"],
            stdout=out, stderr=subprocess.STDOUT, env=flower_env(), cwd=tmp_path,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not any(data.glob("*.sock")):
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "daemon did not come up"
            time.sleep(0.2)
        time.sleep(0.5)
        done = subprocess.run(
            [executable("keystay"), "device", "status", "--data", "dev1"],
            capture_output=True, text=True, env=flower_env(), cwd=tmp_path, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr and "authority" not in done.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
