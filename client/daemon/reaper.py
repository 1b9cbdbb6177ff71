"""A process group that dies with the daemon: ``python -m keystay.client.daemon.reaper CMD...``.

The daemon supervises ``flower-supernode``, which starts ``flower-superexec``,
which starts a ClientApp process per message. A clean shutdown stops them all
with one ``killpg``. A daemon killed with SIGKILL (the OOM killer, a crash, a
laptop's power button) cannot, and before this module the SuperNode lived on:
the restarted daemon's own SuperNode could not bind its port, while the orphan
went on serving rounds through the new daemon's socket.

The daemon therefore does not start the SuperNode directly but through this
small *reaper* process, which

1. asks the kernel to send it SIGTERM when its parent dies
   (``prctl(PR_SET_PDEATHSIG)``), and exits at once if the parent is already
   gone by the time it asks (the race between ``fork`` and ``prctl``);
2. leads its own session and process group (the daemon starts it with
   ``start_new_session``), so every descendant that does not leave the group
   can be signalled at once;
3. becomes a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): a
   grandchild orphaned by a SuperNode that died is re-parented to the reaper,
   not to init, so it is still reaped and still in reach;
4. runs the command as its child and, when the command exits or the reaper is
   told to stop (by the daemon's ``killpg`` or by the parent-death signal),
   sends SIGTERM to the whole group, waits a grace period, SIGKILLs what is
   left, and exits with the command's status.

Why a separate process and not ``preexec_fn`` in the daemon: the parent-death
signal would then reach only the SuperNode, whose own children (SuperExec,
ClientApps) would survive it; and ``preexec_fn`` is unsafe in a threaded
program. The reaper is pure standard library (no torch, no Flower) and costs
about one idle Python interpreter.

Linux only (``prctl``); elsewhere the options are skipped and the reaper
still forwards termination to the group.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from keystay.common.exitcodes import ExitCode
from keystay.common.processes import proc_stat

#: From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

#: Seconds the group gets between SIGTERM and SIGKILL.
GRACE_S = 5.0

#: Longest sleep between two looks at the children (a safety net: a child's
#: exit and a stop request wake the reaper at once).
WAKE_S = 30.0


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0)) == 0


def _group_members(pgid: int, me: int) -> list[int]:
    """Live processes (zombies excluded: they have exited) of group ``pgid`` other than ``me``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fields = proc_stat(entry)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def _reap_children(child: int | None = None) -> int | None:
    """Collect every exited child (orphans re-parented here included), without blocking.

    Returns the exit code of ``child`` if it was among them (a signal death
    as ``128 + signum``, as a shell shows it), else None.
    """
    status = None
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == 0:
            return status
        if pid == child:
            code = os.waitstatus_to_exitcode(raw)
            status = code if code >= 0 else 128 - code


def stop_group(grace: float = GRACE_S, child: int | None = None) -> int | None:
    """SIGTERM every other process of this group, then SIGKILL what outlives ``grace``.

    Returns ``child``'s exit code if it was collected meanwhile.
    """
    me, pgid = os.getpid(), os.getpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the killpg reaches us too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    status = None
    deadline = time.monotonic() + grace
    while True:
        members = _group_members(pgid, me)
        # Reap after listing: whatever was no longer a member had exited, so
        # this reap collects it (the command's status included).
        status = _first(status, _reap_children(child))
        if not members:
            return status
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for pid in _group_members(pgid, me):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    return _first(status, _reap_children(child))


def _first(a: int | None, b: int | None) -> int | None:
    return a if a is not None else b


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m keystay.client.daemon.reaper CMD [ARG...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        return ExitCode.REAPER_PARENT_GONE
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if os.getpgrp() != os.getpid():
        # Not started as a group leader: make a group, so stop_group reaches
        # only what this reaper started.
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)

    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    # Sleep until a child exits or a stop arrives, instead of polling: a
    # reaper that woke every 0.1 s to scan /proc for zombies cost 3 % of a
    # core per device at 20 devices on one machine (and grew with every
    # process on it). The signals are blocked only now, after the fork, so
    # the command does not inherit the mask; one that came before the block
    # was handled by ``_stop`` or is caught by the first reap.
    watched = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    status: int | None = None
    while True:
        status = _reap_children(child.pid)
        if status is not None or stopping:
            break
        info = signal.sigtimedwait(watched, WAKE_S)
        if info is not None and info.si_signo != signal.SIGCHLD:
            stopping = True
    status = _first(status, stop_group(child=child.pid))
    child.returncode = status  # reaped here, not by Popen
    return 0 if status is None else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
