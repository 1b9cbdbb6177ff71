"""How much memory keystay's own processes hold on an idle laptop, beside the goal.

Starts a real ``keystay device run`` recording a simulated employee (the
live recorder path, as on a laptop between rounds), with a short
``--trainer-idle-timeout``, and samples the resident memory (RSS and PSS,
from ``/proc``) of the daemon and every process it started:

- *warm*: just after start, while the trainer process (torch) is resident;
- *idle*: after the idle timeout, once the trainer has been stopped.

Also prints the trainer's start-up cost, read from the daemon's own log line
(``trainer process N ready after X s``): what the first round after an idle
stop pays. Goal (issue "Fast and light on the laptop"): daemon + trainer
≤ 150 MiB RSS while idle. No round runs here, so no SuperNode is started.

    .venv/bin/python bench/bench_idle.py [--idle-timeout 20] [--settle 10]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_MIB = 150.0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB; (0, 0) if it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    rss = int(re.search(r"^Rss:\s+(\d+)", rollup, re.M).group(1))  # type: ignore[union-attr]
    pss = int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))  # type: ignore[union-attr]
    return rss, pss


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = b" ".join(cmd).decode(errors="replace")
    if "resource_tracker" in text:
        return "mp-resource-tracker"  # multiprocessing's helper, kept by the spawn context
    if "multiprocessing" in text or "spawn_main" in text:
        return "trainer"
    if "keystay" in text and "device" in text:
        return "daemon"
    return os.path.basename(cmd[0].decode(errors="replace")) or "?"


def _sample(root: int) -> dict[str, tuple[int, int]]:
    parts: dict[str, tuple[int, int]] = {}
    for pid in _descendants(root):
        rss, pss = _memory_kib(pid)
        name = _name(pid)
        old = parts.get(name, (0, 0))
        parts[name] = (old[0] + rss, old[1] + pss)
    return parts


def _show(label: str, parts: dict[str, tuple[int, int]]) -> float:
    total_rss = sum(r for r, _ in parts.values()) / 1024
    total_pss = sum(p for _, p in parts.values()) / 1024
    detail = ", ".join(f"{k} {r / 1024:.0f}" for k, (r, _) in sorted(parts.items()))
    print(f"{label:<6} RSS {total_rss:6.1f} MiB  PSS {total_pss:6.1f} MiB   ({detail} MiB RSS)")
    return total_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-timeout", type=float, default=20.0,
                        help="the daemon's --trainer-idle-timeout, seconds")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds to wait after the trainer stops before measuring")
    args = parser.parse_args()
    keystay = str(Path(sys.executable).parent / "keystay")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "device"
        log = Path(tmp) / "daemon.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                [keystay, "device", "run", "--data", str(data), "--source", "simulated",
                 "--trainer-idle-timeout", str(args.idle_timeout)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 300
            while "ready after" not in log.read_text(errors="replace"):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the daemon did not come up:\n{log.read_text()[-2000:]}")
                time.sleep(0.5)
            started = float(re.search(r"ready after ([\d.]+) s", log.read_text())
                            .group(1))  # type: ignore[union-attr]
            time.sleep(2)
            warm = _show("warm", _sample(daemon.pid))
            while "stopped after" not in log.read_text(errors="replace"):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"the trainer was not stopped:\n{log.read_text()[-2000:]}")
                time.sleep(0.5)
            time.sleep(args.settle)
            idle = _show("idle", _sample(daemon.pid))
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    print(f"\nidle daemon + trainer: {idle:.1f} MiB RSS   goal ≤ {GOAL_MIB:.0f} MiB   "
          f"{'MET' if idle <= GOAL_MIB else 'NOT MET'}")
    print(f"warm (trainer resident): {warm:.1f} MiB RSS")
    print(f"trainer start-up paid by the first round after an idle stop: {started:.1f} s "
          "(torch + Opacus import and one warm-up step, on this machine now)")


if __name__ == "__main__":
    main()
