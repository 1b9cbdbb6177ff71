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
from keystay.common.processes import proc_stat, reap_orphans

#: From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

#: Seconds the group gets between SIGTERM and SIGKILL.
GRACE_S = 5.0

#: Exit status when the parent was already gone before the reaper could watch it.


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


def _reap_children() -> None:
    """Collect every exited child (orphans re-parented here included), without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_group(grace: float = GRACE_S) -> None:
    """SIGTERM every other process of this group, then SIGKILL what outlives ``grace``."""
    me, pgid = os.getpid(), os.getpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the killpg reaches us too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap_children()
        if not _group_members(pgid, me):
            return
        time.sleep(0.05)
    for pid in _group_members(pgid, me):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.05)
    _reap_children()


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
    status: int | None = None
    while status is None and not stopping:
        status = child.poll()
        if status is None:
            reap_orphans(keep=[child.pid])  # leave the child to Popen.poll
            time.sleep(0.1)
    stop_group()
    if status is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            status = child.wait(1.0)
    return 0 if status is None else (status if status >= 0 else 128 - status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
