"""Stopping a process group, or a process tree across sessions, leaves no member behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from keystay.common.processes import (
    Proc,
    descendants,
    has_child,
    is_running,
    process_table,
    signal_group,
    stop_processes,
    terminate_group,
)

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


# ----------------------------------------------------------------- process trees

# The SuperExec's shape: a leader whose child leaves its session, and whose
# grandchild stays in the child's session. Every pid is written, then all wait.
ESCAPER = """
import os, signal, subprocess, sys, time
escaped = subprocess.Popen(
    [sys.executable, "-c",
     "import subprocess, sys, time; "
     "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
     "open(sys.argv[1], 'w').write(str(g.pid)); time.sleep(60)", sys.argv[1] + ".grand"],
    start_new_session=True)
while not os.path.exists(sys.argv[1] + ".grand") or not open(sys.argv[1] + ".grand").read():
    time.sleep(0.02)
open(sys.argv[1], "w").write(f"{escaped.pid} {open(sys.argv[1] + '.grand').read()}")
time.sleep(60)
"""


def _start_escaper(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    pid_file = tmp_path / "pids"
    leader = subprocess.Popen([sys.executable, "-c", ESCAPER, str(pid_file)],
                              start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and len(pid_file.read_text().split()) == 2):
        assert time.monotonic() < deadline, "the leader did not start its children"
        time.sleep(0.05)
    escaped, grandchild = map(int, pid_file.read_text().split())
    return leader, escaped, grandchild


def test_a_group_kill_misses_a_child_in_another_session(tmp_path: Path) -> None:
    """Why trees: ``terminate_group`` alone leaves the session-escaped child running."""
    leader, escaped, grandchild = _start_escaper(tmp_path)
    try:
        terminate_group(leader, timeout=10, kill_leftovers=True)
        assert _alive(escaped) and _alive(grandchild)
    finally:
        for pid in (escaped, grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_snapshot_taken_before_the_signal_stops_every_session(tmp_path: Path) -> None:
    leader, escaped, grandchild = _start_escaper(tmp_path)
    tree = descendants(leader.pid)
    assert {escaped, grandchild} <= {proc.pid for proc in tree}
    assert any("time.sleep(60)" in proc.cmdline for proc in tree)
    terminate_group(leader, timeout=10)
    # The leader is gone: its children left the tree, but the snapshot knows them.
    assert escaped not in {proc.pid for proc in descendants(leader.pid)}
    assert stop_processes(tree, grace=10) == []
    assert _gone(escaped) and _gone(grandchild)


def test_what_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    leader, child = _start(tmp_path, "polite")
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline()
    (target,) = [proc for proc in descendants(os.getpid()) if proc.pid == stubborn.pid]
    started = time.monotonic()
    killed = stop_processes([target], grace=0.5)
    assert killed == [target]
    assert stubborn.wait(10) == -signal.SIGKILL
    assert time.monotonic() - started < 10
    terminate_group(leader, timeout=10)
    assert _gone(child)


def test_a_reused_pid_is_never_signalled() -> None:
    """A snapshot entry whose pid now names another process (other start time) is left alone."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (now,) = [proc for proc in descendants(os.getpid()) if proc.pid == other.pid]
        assert is_running(now)
        older = Proc(now.pid, now.ppid, now.started - 1, now.cmdline)  # "a process before it"
        assert not is_running(older)
        assert stop_processes([older], grace=0.2) == []
        time.sleep(0.2)
        assert other.poll() is None, "a reused pid was signalled"
    finally:
        other.kill()
        other.wait(10)


def test_has_child_reads_direct_children_only(tmp_path: Path) -> None:
    leader, escaped, grandchild = _start_escaper(tmp_path)
    try:
        table = process_table()
        assert has_child(leader.pid, ".grand", table)  # the escaped child's command line
        assert not has_child(leader.pid, "time.sleep(60)\"", table)
        assert table[grandchild].ppid == escaped
    finally:
        stop_processes(descendants(leader.pid), grace=5)
        terminate_group(leader, timeout=10)


# In a fresh interpreter, so that no other test's child is in the way: one
# child that exits unwaited (an adopted orphan, to a subreaper), one a Popen
# waits for; then a reaper call while only a running child is left.
REAPER = """
import os, subprocess, sys, time
from keystay.common import processes
processes.reap_orphans()  # no child yet: nothing to do, and no error
orphan = os.fork()
if orphan == 0:
    os._exit(3)
kept = subprocess.Popen([sys.executable, "-c", "pass"])
time.sleep(0.5)  # both have exited: zombies until waited for
processes.reap_orphans(keep=[kept.pid])
try:
    os.waitpid(orphan, os.WNOHANG)
    print("orphan left")
except ChildProcessError:
    print("orphan reaped")
print("kept", kept.wait(5))
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
def no_proc(path):
    raise AssertionError("read /proc with no child exited")
processes.os.listdir = no_proc
processes.reap_orphans(keep=[sleeper.pid])
print("no scan")
sleeper.kill(); sleeper.wait()
"""


def test_exited_orphans_are_reaped_and_a_popen_keeps_its_status() -> None:
    out = subprocess.run([sys.executable, "-c", REAPER], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split("\n")[:3] == ["orphan reaped", "kept 0", "no scan"], out.stderr
