"""One reading of the machine's process table from ``/proc``, for the federation benchmarks.

``bench_deployment.py`` (memory and CPU of the server's process tree) and
``bench_round.py`` (CPU per round by process role) both walk ``/proc``; this
is the one walk. A process that ends between listing and reading is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proc:
    """A process as ``/proc/PID/stat`` and ``cmdline`` describe it."""

    pid: int
    ppid: int
    #: Session id: what a process keeps when it re-parents away (Ray, setsid).
    sid: int
    #: Its own CPU seconds (utime + stime).
    cpu_s: float
    #: CPU seconds of the children it has reaped (cutime + cstime), so a
    #: ClientApp that came and went between two readings is still counted.
    reaped_cpu_s: float
    #: Resident bytes.
    rss: int
    cmd: str


def processes() -> list[Proc]:
    """Every process readable now."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out.append(Proc(
            pid=int(entry.name), ppid=int(fields[1]), sid=int(fields[3]),
            cpu_s=(int(fields[11]) + int(fields[12])) / TICK,
            reaped_cpu_s=(int(fields[13]) + int(fields[14])) / TICK,
            rss=int(fields[21]) * PAGE, cmd=cmd,
        ))
    return out
