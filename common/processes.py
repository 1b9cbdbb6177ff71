"""Stopping a process group, or a process tree: SIGTERM, a grace period, then SIGKILL.

Design
------
keystay starts Flower's processes (SuperLink, SuperNode) and its own daemons
with ``start_new_session=True``, so each is the leader of a process group
holding everything it spawns (a SuperNode's SuperExec and ClientApps, a
SuperLink's SuperExec). Stopping one means stopping the group, or children
outlive their parent. :func:`terminate_group` is the one way to do it:

* SIGTERM to the group (or, with ``leader_first``, to the leader alone: a
  keystay daemon stops its own children cleanly and should be allowed to);
* wait up to ``timeout`` seconds for the leader;
* SIGKILL the group if the leader did not exit, or always with
  ``kill_leftovers`` (anything still in the group after a clean exit was
  left behind).

A group that is already gone is not an error. The reaper
(:mod:`keystay.client.daemon.reaper`) stops its *own* group from inside and
keeps its own loop.

Beyond the group
----------------
A group signal misses whatever left the group: Flower's SuperLink starts its
SuperExec with ``start_new_session``, and the SuperExec starts each run's
``flwr-serverapp`` in its own session, so ``killpg`` on the SuperLink never
reaches either; once the SuperExec is gone, the ServerApp is re-parented to
init and nothing stops it (a 20-device benchmark saw one outlive
``keystay server start`` by more than 90 s). Processes are therefore also
followed as a *tree*, read from ``/proc`` by parent pid whatever their
session: :func:`descendants` takes a snapshot, each :class:`Proc` with its
start time (``/proc/PID/stat`` field 22), and :func:`stop_processes` signals
a snapshot's processes only while the pid still has that start time, so a
pid the kernel reused for another process is never signalled. Take the
snapshot *before* signalling: a process whose parent died is no longer
below it. :func:`become_subreaper` keeps such orphans below the caller
(Linux), so that a later walk still finds them, and :func:`reap_orphans`
collects them once they exit. ``keystay server start`` uses all of it; the
device reaper reads ``/proc/PID/stat`` through :func:`proc_stat` and reaps
through :func:`reap_orphans` too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

#: How long to wait for a SIGKILLed leader before giving up on it.
KILL_WAIT_S = 5.0


def signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to ``process``'s group, unless the process has exited."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)


def terminate_group(
    process: subprocess.Popen[bytes],
    timeout: float,
    *,
    leader_first: bool = False,
    kill_leftovers: bool = False,
) -> None:
    """Stop the process group ``process`` leads (see the module docstring).

    Parameters
    ----------
    process : subprocess.Popen
        A group leader (started with ``start_new_session=True``).
    timeout : float
        Seconds to wait after SIGTERM before SIGKILL.
    leader_first : bool
        SIGTERM the leader only, not its whole group.
    kill_leftovers : bool
        SIGKILL the group after the wait even if the leader exited.
    """
    if process.poll() is not None:
        return
    try:
        if leader_first:
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    if timed_out or kill_leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(KILL_WAIT_S)


# ----------------------------------------------------------------- process trees

#: From <linux/prctl.h>.
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Proc:
    """A live process as ``/proc/PID/stat`` and ``cmdline`` describe it."""

    pid: int
    ppid: int
    #: Start time, in clock ticks after boot (field 22): with ``pid``, names
    #: one process for good, since the kernel reuses pids, not start times.
    started: int
    #: Command line, arguments joined by spaces.
    cmdline: str


def proc_stat(pid: int | str) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after ``(comm)`` (state, ppid, pgrp, ...); None if gone.

    The command name may hold spaces and parentheses, hence the split at the
    last ``)``. Field *n* of proc(5) is item ``n - 3`` of the list.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def process_table() -> dict[int, Proc]:
    """Every live process (zombies excluded: they have exited) readable now, by pid."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = proc_stat(entry)
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                cmdline = cmd.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if fields is not None and fields[0] != "Z":
            table[int(entry)] = Proc(int(entry), int(fields[1]), int(fields[19]), cmdline)
    return table


def descendants(pid: int, table: dict[int, Proc] | None = None) -> list[Proc]:
    """Every live process below ``pid`` (children first), in any session or group.

    Parameters
    ----------
    pid : int
        The root; not itself in the answer.
    table : dict[int, Proc] | None
        A :func:`process_table` already read (None: read one now).
    """
    table = process_table() if table is None else table
    children: dict[int, list[Proc]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc)
    found: list[Proc] = []
    frontier, seen = [pid], {pid}
    while frontier:
        for child in children.get(frontier.pop(0), []):
            if child.pid not in seen:
                seen.add(child.pid)
                found.append(child)
                frontier.append(child.pid)
    return found


def has_child(pid: int, name: str, table: dict[int, Proc] | None = None) -> bool:
    """Whether process ``pid`` has a live child whose command line names ``name``."""
    table = process_table() if table is None else table
    return any(proc.ppid == pid and name in proc.cmdline for proc in table.values())


def is_running(proc: Proc) -> bool:
    """Whether ``proc`` still runs: its pid is live, not a zombie, with the same start time."""
    fields = proc_stat(proc.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == proc.started


def signal_processes(procs: Iterable[Proc], sig: int) -> None:
    """Send ``sig`` to each of ``procs`` that still runs (see :func:`is_running`)."""
    for proc in procs:
        if is_running(proc):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, sig)


def stop_processes(procs: Iterable[Proc], grace: float) -> list[Proc]:
    """SIGTERM ``procs``, wait up to ``grace`` seconds, SIGKILL the ones still running.

    Parameters
    ----------
    procs : Iterable[Proc]
        A snapshot (:func:`descendants`), taken before anything was signalled.
    grace : float
        Seconds between SIGTERM and SIGKILL.

    Returns
    -------
    list[Proc]
        The processes that had to be SIGKILLed.

    Notes
    -----
    An exited process counts as stopped even before its parent reaps it
    (a zombie). Nothing is reaped here: a child of the caller may belong to
    a ``Popen``, whose exit status a reap would lose (see
    :func:`reap_orphans`).
    """
    targets = list(procs)
    signal_processes(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = [proc for proc in targets if is_running(proc)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [proc for proc in left if is_running(proc)]
    signal_processes(left, signal.SIGKILL)
    return left


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children, not init's (Linux).

    ``prctl(PR_SET_CHILD_SUBREAPER)``: a process whose parent dies is
    re-parented to the nearest living ancestor that set it, so it stays in
    this process's :func:`descendants`. The caller must then reap them
    (:func:`reap_orphans`). Not inherited by children. False where it is not
    available.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbols hold libc's: no find_library, which runs ldconfig.
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(keep: Iterable[int] = ()) -> None:
    """Collect this process's exited children, except ``keep`` (pids a ``Popen`` waits for).

    A subreaper's adopted orphans are children nobody else waits for; left
    unreaped they stay zombies until this process exits. Reaping a
    ``Popen``'s child would lose its exit status, hence ``keep``.

    Called every second by a supervisor, so it first asks the kernel, without
    reaping, whether any child has exited: most calls then read nothing of
    ``/proc``.
    """
    try:
        exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # no children at all
        return
    if exited is None:
        return
    me, kept = os.getpid(), set(keep)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in kept:
            continue
        fields = proc_stat(entry)
        if fields is not None and fields[0] == "Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)
