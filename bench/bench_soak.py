"""Soak: does a device daemon with live capture and regular rounds stay flat for hours?

Starts a private Xvfb, a local federation (SuperLink + ServerApp side, see
:mod:`keystay.server.deploy.local`) with one enrolled device whose daemon
records live (``--source pynput``) from that X server, drives it with xdotool
(XTEST, as a real keyboard and mouse) at each event rate in turn, and starts a
round (``keystay round start``) every ``--round-every`` seconds. Every
``--sample-every`` seconds it reads, from ``/proc``, for the daemon and for its
whole process tree (SuperNode, warm trainer, ClientApp):

- RSS MiB, open file descriptors, threads;
- CPU share of one core since the last sample (utime + stime);
- store bytes (``store.v1.sqlite`` + WAL).

and prints one line per sample. At the end of each rate it prints start,
middle and end figures, store growth per hour and the mean CPU share, and
writes every sample to ``--out`` (JSON) for plotting.

"Growth that levels off" is judged on the daemon's own RSS, fds and threads:
the end figure should be within noise of the middle one. The script reports
``growth`` (end - middle) per quantity; it does not assert (the machine is
shared), a person reads it.

Usage::

    # the real soak: 30 minutes at each rate, a round every 5 minutes
    .venv/bin/python bench/bench_soak.py --minutes 30 --rates 125,1000 --round-every 300
    # a smoke run
    .venv/bin/python bench/bench_soak.py --minutes 1.5 --rates 125,1000 --round-every 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc readings ---------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant alive now."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def reading(pid: int) -> dict[str, float] | None:
    """RSS MiB, fds, threads and CPU seconds of one process (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    if "VmRSS" not in status:  # a zombie: exited, not yet reaped
        return None
    return {
        "rss": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "fds": fds,
        "cpu_s": (int(fields[11]) + int(fields[12])) / CLK_TCK,
    }


def store_bytes(data_dir: Path, suffix: str = "") -> int:
    """Bytes of the store's database file (``suffix`` "-wal": its write-ahead log)."""
    path = data_dir / f"store.v1.sqlite{suffix}"
    return path.stat().st_size if path.exists() else 0


# -- load -------------------------------------------------------------------------------


class Driver(threading.Thread):
    """Types and moves at ``rate`` events/s until stopped, in 10-second plans."""

    def __init__(self, server: Any, rate: int) -> None:
        super().__init__(name="soak-driver", daemon=True)
        self.server, self.rate = server, rate
        self.stopping = threading.Event()
        self.sent = 0
        self.stalls = 0

    def run(self) -> None:
        from bench_recorder import drive, plan

        slots, keys, moves = plan(self.rate, 10.0)
        while not self.stopping.is_set():
            try:
                drive(self.server, slots)
            except subprocess.TimeoutExpired:
                # A loaded machine can stall xdotool; count it and keep the load on
                # (a driver that died silently would make the rest of the soak idle).
                self.stalls += 1
                continue
            self.sent += keys + moves


class Rounds(threading.Thread):
    """``keystay round start`` every ``every`` seconds; records each outcome."""

    def __init__(self, server_dir: Path, every: float, log: Path) -> None:
        super().__init__(name="soak-rounds", daemon=True)
        self.server_dir, self.every, self.log = server_dir, every, log
        self.stopping = threading.Event()
        self.outcomes: list[tuple[float, int, float]] = []  # (t, exit code, seconds)

    def run(self) -> None:
        from keystay.server.deploy.superlink import executable, flower_env
        from keystay.server.settings import RECORD_NOISE_MULTIPLIER

        n = 0
        while not self.stopping.wait(self.every):
            n += 1
            cmd = [executable("keystay"), "round", "start", "--server-dir",
                   str(self.server_dir), "--rounds", "1", "--min-devices", "1",
                   "--name", f"soak-{n}", "--local-steps", "5",
                   "--privacy-unit", "record", "--noise-multiplier", str(RECORD_NOISE_MULTIPLIER)]
            t0 = time.monotonic()
            with self.log.open("ab") as out:
                try:
                    code = subprocess.run(cmd, env=flower_env(), stdout=out,
                                          stderr=subprocess.STDOUT, timeout=max(120.0, self.every),
                                          check=False).returncode
                except subprocess.TimeoutExpired:
                    code = -1
            self.outcomes.append((time.time(), code, time.monotonic() - t0))


# -- one rate ---------------------------------------------------------------------------


def soak(xserver: Any, rate: int, minutes: float, round_every: float,
         sample_every: float, root: Path) -> dict[str, Any]:
    from keystay.server.deploy.local import LocalFederation

    os.environ["DISPLAY"] = xserver.display  # the daemon records this X server
    # One device: the record unit's plain rounds (employee-day rounds need at
    # least the policy's min_summed_devices devices in every secure sum).
    federation = LocalFederation(root / f"rate-{rate}", devices=1, simulate_days=3,
                                 events_per_day=4000, source="pynput",
                                 policy_toml='[policy]\nprivacy_unit = "record"\n')
    samples: list[dict[str, Any]] = []
    try:
        federation.start()
        device = federation.device_list[0]
        assert device.part is not None
        pid = device.part.process.pid
        driver = Driver(xserver, rate)
        rounds = Rounds(federation.server_dir, round_every, root / f"rounds-{rate}.log")
        driver.start()
        if round_every > 0:
            rounds.start()
        t0 = time.monotonic()
        last_cpu: dict[int, float] = {}
        last_t = t0
        try:
            while time.monotonic() - t0 < minutes * 60:
                time.sleep(sample_every)
                now = time.monotonic()
                own = reading(pid)
                if own is None:
                    raise RuntimeError(f"the daemon (pid {pid}) died; see {device.part.log}")
                total = {"rss": 0.0, "fds": 0.0, "threads": 0.0}
                cpu = 0.0
                for p in tree(pid):
                    r = reading(p)
                    if r is None:
                        continue
                    for k in total:
                        total[k] += r[k]
                    cpu += r["cpu_s"] - last_cpu.get(p, r["cpu_s"] if p != pid else 0.0)
                    last_cpu[p] = r["cpu_s"]
                sample = {
                    "t": round(now - t0, 1),
                    "rss": round(own["rss"], 1), "fds": own["fds"], "threads": own["threads"],
                    "tree_rss": round(total["rss"], 1), "tree_fds": int(total["fds"]),
                    "tree_threads": int(total["threads"]),
                    "cpu_pct": round(cpu / (now - last_t) * 100, 2),
                    # The database file alone: the WAL grows to its checkpoint
                    # size (about 4 MB) in the first minutes and then is reused.
                    "store_bytes": store_bytes(device.data_dir),
                    "wal_bytes": store_bytes(device.data_dir, "-wal"),
                    "rounds_ok": sum(1 for _, c, _ in rounds.outcomes if c == 0),
                    "rounds_failed": sum(1 for _, c, _ in rounds.outcomes if c != 0),
                }
                last_t = now
                samples.append(sample)
                print(f"  {rate:>5} ev/s  t={sample['t']:>7.0f}s  rss {sample['rss']:6.1f} MiB"
                      f"  fds {sample['fds']:>4}  threads {sample['threads']:>3}"
                      f"  tree rss {sample['tree_rss']:6.1f} MiB  fds {sample['tree_fds']:>4}"
                      f"  cpu {sample['cpu_pct']:5.1f}%"
                      f"  store {sample['store_bytes'] / 1e6:7.2f} MB"
                      f" (+WAL {sample['wal_bytes'] / 1e6:5.2f})"
                      f"  rounds ok {sample['rounds_ok']} failed {sample['rounds_failed']}",
                      flush=True)
        finally:
            driver.stopping.set()
            rounds.stopping.set()
            driver.join(timeout=30)
            if rounds.is_alive():
                rounds.join(timeout=300)
    finally:
        federation.stop()
    return summarize(rate, samples)


def summarize(rate: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    if len(samples) < 3:
        return {"rate": rate, "samples": samples, "note": "too short to summarize"}
    # The first sample after start-up is "start"; skip the very first (imports settling).
    start, middle, end = samples[1], samples[len(samples) // 2], samples[-1]
    hours = (end["t"] - start["t"]) / 3600
    out = {
        "rate": rate,
        "start": start, "middle": middle, "end": end,
        "growth_end_minus_middle": {k: round(end[k] - middle[k], 1)
                                    for k in ("rss", "fds", "threads", "tree_rss", "tree_fds")},
        # Database + WAL: in WAL mode new batches sit in the WAL until a
        # checkpoint, so the file alone would show no growth for minutes.
        "store_mb_per_hour": round(
            (end["store_bytes"] + end["wal_bytes"] - start["store_bytes"] - start["wal_bytes"])
            / 1e6 / hours, 2) if hours > 0 else None,
        "cpu_pct_mean": round(sum(s["cpu_pct"] for s in samples[1:]) / (len(samples) - 1), 2),
        "rounds_ok": end["rounds_ok"], "rounds_failed": end["rounds_failed"],
        "samples": samples,
    }
    print(f"\n  {rate} ev/s: daemon RSS start/middle/end {start['rss']}/{middle['rss']}/"
          f"{end['rss']} MiB, fds {start['fds']}/{middle['fds']}/{end['fds']}, threads "
          f"{start['threads']}/{middle['threads']}/{end['threads']}; store "
          f"{out['store_mb_per_hour']} MB/h; CPU {out['cpu_pct_mean']}% of one core (tree); "
          f"rounds ok {end['rounds_ok']}, failed {end['rounds_failed']}\n", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="Minutes per rate.")
    parser.add_argument("--rates", default="125,1000", help="Event rates, comma-separated.")
    parser.add_argument("--round-every", type=float, default=300.0,
                        help="Seconds between rounds (0: no rounds).")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None, help="Write all samples as JSON here.")
    args = parser.parse_args()

    from xserver import missing_tools, start_xvfb

    problem = missing_tools()
    if problem:
        sys.exit(f"bench_soak: {problem}")
    results = []
    xserver = start_xvfb()
    try:
        # Kept afterwards: the rounds' and daemons' logs are what explains a figure.
        root = Path(tempfile.mkdtemp(prefix="keystay-soak-"))
        print(f"bench_soak: logs and data in {root}", flush=True)
        for rate in (int(r) for r in args.rates.split(",")):
            results.append(soak(xserver, rate, args.minutes, args.round_every,
                                args.sample_every, root))
    finally:
        xserver.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"samples written to {args.out}")


if __name__ == "__main__":
    main()
