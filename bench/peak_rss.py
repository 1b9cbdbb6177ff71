"""Peak resident memory of a process and all its descendants (Ray workers included).

``python bench/peak_rss.py -- COMMAND ...`` runs COMMAND, samples every
0.5 s the summed RSS of it and every process descended from it (and of every
process in its session, which catches Ray's raylet and workers that re-parent
away), and prints the peak in MiB on stderr when it ends.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def _session_rss(sid: int) -> int:
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()
            if int(fields[3]) != sid:  # session id
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    process = subprocess.Popen(command, start_new_session=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, _session_rss(process.pid))
        time.sleep(0.5)
    print(f"peak RSS of the session: {peak / 2**20:.0f} MiB", file=sys.stderr)
    return process.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
