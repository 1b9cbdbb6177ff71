"""Stopping a process group leaves no member behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from keystay.common.processes import signal_group, terminate_group

# A leader that starts a child in its own group, writes the child's pid, and
# (optionally) ignores SIGTERM, as a stuck process would.
LEADER = """
import os, signal, subprocess, sys, time
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(60)
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], int]:
    pid_file = tmp_path / "child.pid"
    leader = subprocess.Popen([sys.executable, "-c", LEADER, str(pid_file), mode],
                              start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the leader did not start its child"
        time.sleep(0.05)
    return leader, int(pid_file.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of an exited child of the (dead) leader is reparented and reaped
    # by init; until then it still answers kill(0), so look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_sigterm_stops_the_whole_group(tmp_path: Path) -> None:
    leader, child = _start(tmp_path, "polite")
    terminate_group(leader, timeout=10)
    assert leader.returncode == -signal.SIGTERM
    assert _gone(child)


def test_a_stubborn_leader_is_killed_after_the_grace(tmp_path: Path) -> None:
    leader, child = _start(tmp_path, "stubborn")
    started = time.monotonic()
    terminate_group(leader, timeout=0.5)
    assert leader.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10
    assert _gone(child)


def test_leader_first_then_leftovers(tmp_path: Path) -> None:
    leader, child = _start(tmp_path, "polite")
    # The leader exits on SIGTERM without stopping its child: kill_leftovers does.
    terminate_group(leader, timeout=10, leader_first=True, kill_leftovers=True)
    assert leader.returncode == -signal.SIGTERM
    assert _gone(child)


def test_an_exited_process_is_left_alone(tmp_path: Path) -> None:
    done = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    done.wait(30)
    terminate_group(done, timeout=1)
    signal_group(done, signal.SIGTERM)
    assert done.returncode == 0
