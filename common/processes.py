"""Stopping a process group: SIGTERM, a grace period, then SIGKILL.

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
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

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
