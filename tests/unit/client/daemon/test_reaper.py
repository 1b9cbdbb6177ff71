"""The reaper takes its whole process group down with it, however its parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

# A "daemon" that starts the reaper over a shell whose children leave it behind
# (as SuperExec and ClientApps would), prints every pid, then waits forever.
DAEMON = r"""
import subprocess, sys, time
reaper = subprocess.Popen(
    [sys.executable, "-m", "keystay.client.daemon.reaper", "sh", "-c",
     "sleep 600 & echo $!; sh -c 'sleep 600 & echo $!; wait' & wait"],
    stdout=subprocess.PIPE, text=True, start_new_session=True)
print(reaper.pid, flush=True)
for _ in range(2):
    print(reaper.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _start_daemon() -> tuple[subprocess.Popen[str], list[int]]:
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    pids = [int(daemon.stdout.readline()) for _ in range(3)]
    assert all(_alive(p) for p in pids), "the group did not start"
    return daemon, pids


def test_sigkill_of_the_parent_takes_the_group_down() -> None:
    daemon, pids = _start_daemon()
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    left = _wait_gone(pids)
    for pid in left:  # leave nothing behind even when the assertion fails
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes outlived their SIGKILLed parent: {left}"


def test_killpg_stops_grandchildren_too() -> None:
    daemon, pids = _start_daemon()
    try:
        os.killpg(pids[0], signal.SIGTERM)  # what the supervisor's stop() sends
        assert _wait_gone(pids) == []
    finally:
        daemon.kill()
        daemon.wait()


def test_the_commands_status_is_passed_on(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keystay.client.daemon.reaper", "sh", "-c", "exit 7"],
        timeout=30,
    )
    assert done.returncode == 7


def test_no_command_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keystay.client.daemon.reaper"], capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert b"usage" in done.stderr


def _status_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(name + ":"))


def _zombie_children(pid: int) -> list[int]:
    zombies = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if fields[0] == b"Z" and int(fields[1]) == pid:
            zombies.append(int(entry))
    return zombies


def test_an_idle_reaper_sleeps_instead_of_polling() -> None:
    # One reaper runs beside every device's SuperNode: polling /proc every
    # 0.1 s cost 3 % of a core each at 20 devices. Idle, it must not wake.
    reaper = subprocess.Popen(
        [sys.executable, "-m", "keystay.client.daemon.reaper", "sleep", "30"])
    try:
        time.sleep(1.5)  # past the interpreter's start-up
        before = _status_field(reaper.pid, "voluntary_ctxt_switches")
        time.sleep(3.0)
        woke = _status_field(reaper.pid, "voluntary_ctxt_switches") - before
        assert woke <= 2, f"the idle reaper woke {woke} times in 3 s"
    finally:
        reaper.terminate()
        reaper.wait(30)


def test_an_orphan_is_reaped_when_it_exits_not_later() -> None:
    # The subshell exits at once; its "sleep 0.5" is re-parented to the
    # reaper (a subreaper), which must collect it as soon as it exits.
    reaper = subprocess.Popen(
        [sys.executable, "-m", "keystay.client.daemon.reaper", "sh", "-c",
         "(sleep 0.5 &); exec sleep 30"])
    try:
        time.sleep(2.5)
        assert reaper.poll() is None
        assert _zombie_children(reaper.pid) == []
    finally:
        reaper.terminate()
        reaper.wait(30)


def test_a_stopped_reaper_passes_on_the_commands_signal_status() -> None:
    reaper = subprocess.Popen(
        [sys.executable, "-m", "keystay.client.daemon.reaper", "sleep", "30"])
    time.sleep(1.0)
    started = time.monotonic()
    reaper.send_signal(signal.SIGTERM)
    assert reaper.wait(30) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 3.0, "the stop waited for a poll, not the signal"
