"""The real deployment path at scale: 3, 10, 20 devices (daemons + SuperNodes) on loopback.

For each device count K, starts a local federation exactly as ``keystay demo``
does (:class:`~keystay.server.deploy.local.LocalFederation`: ``keystay server
start``, and per device ``keystay device enroll`` then ``keystay device run
--superlink``, TLS and enrolled SuperNodes, the default employee-day policy),
waits until every SuperNode is online, runs ``--rounds`` employee-day rounds
(SecAgg+ in the daemons) with ``min-devices`` = K, and prints per round:

* ``seconds``: the round's wall time (``rounds.jsonl``);
* ``link cpu s``: CPU seconds of the ``flower-superlink`` process during the
  round, and ``server cpu s`` of the whole server side (``keystay server
  start`` and its process tree: SuperLink, SuperExec, the ServerApp process);
* ``link MiB`` / ``server MiB``: the highest RSS of the same, sampled every
  0.5 s;
* ``KB/device``: bytes on the SuperLink's fleet connections during the round
  (``ss -ti`` ``bytes_sent + bytes_received`` of every TCP connection to the
  fleet port, TLS included), divided by K;
* the memory of one device's processes (daemon, trainer, SuperNode,
  SuperExec, ClientApp) at the end.

Then the growth of the median round time (rounds after the first) from the
smallest K to each larger one. The machine's load average is printed: the
figures are only comparable on an otherwise idle machine.

    .venv/bin/python bench/bench_deployment.py --devices 3,10,20 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procfs import Proc, processes

from keystay.common.errors import KeystayError
from keystay.server.deploy.local import LocalFederation
from keystay.server.rounds import start_run
from keystay.server.settings import RunSettings


def server_tree(root_pid: int, marker: str) -> list[Proc]:
    """``keystay server start`` and its descendants (SuperLink, SuperExec, ServerApp).

    Some start sessions of their own, so the tree is followed by parent id;
    ``marker`` (the server folder) also catches a process re-parented away.
    """
    procs = processes()
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found = {p.pid: p for p in procs if p.pid == root_pid or marker in p.cmd}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid not in found:
                found[child.pid] = child
                todo.append(child.pid)
    return list(found.values())


def fleet_bytes(port: int) -> int:
    """Bytes sent plus received on every established TCP connection to ``port``."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    total = 0
    for key in ("bytes_sent", "bytes_received"):
        total += sum(int(v) for v in re.findall(rf"\b{key}:(\d+)", out))
    return total


@dataclass
class Sampler:
    """CPU, peak RSS of the server session and its SuperLink, and fleet bytes, per interval."""

    server_pid: int
    marker: str
    port: int
    peak_link: int = 0
    peak_server: int = 0
    dead_cpu: float = 0.0  # CPU of server processes that exited (ServerApp per run)
    seen: dict[int, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def cpu(self) -> tuple[float, float]:
        link = server = 0.0
        alive = {}
        for p in server_tree(self.server_pid, self.marker):
            alive[p.pid] = p.cpu_s
            server += p.cpu_s
            if "flower-superlink" in p.cmd:
                link += p.cpu_s
        for pid, last in list(self.seen.items()):
            if pid not in alive:
                self.dead_cpu += last
                del self.seen[pid]
        self.seen.update(alive)
        return link, server + self.dead_cpu

    def run(self) -> None:
        while not self.stop.is_set():
            link = server = 0
            for p in server_tree(self.server_pid, self.marker):
                server += p.rss
                if "flower-superlink" in p.cmd:
                    link += p.rss
            self.peak_link, self.peak_server = max(self.peak_link, link), max(self.peak_server,
                                                                              server)
            self.cpu()
            time.sleep(0.5)

    def snapshot(self) -> dict[str, float]:
        link, server = self.cpu()
        snap = {"link_cpu": link, "server_cpu": server, "bytes": float(fleet_bytes(self.port)),
                "link_rss": float(self.peak_link), "server_rss": float(self.peak_server),
                "time": time.monotonic()}
        self.peak_link = self.peak_server = 0
        return snap


def device_memory(fed: LocalFederation) -> float:
    """Mean RSS (MiB) of one device: its daemon's process tree (trainer, SuperNode and
    what the SuperNode starts: SuperExec, ClientApp), and any process naming its folder."""
    total = 0
    for device in fed.device_list:
        if device.part is not None:
            total += sum(p.rss for p in server_tree(device.part.process.pid,
                                                    str(device.data_dir)))
    return total / max(1, len(fed.device_list)) / 2**20


def run(root: Path, devices: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    fed = LocalFederation(root, devices=devices, simulate_days=2, events_per_day=2500)
    try:
        started = time.monotonic()
        fed.start()
        fed.wait_online(devices, timeout=600)
        print(f"K = {devices}: federation up in {time.monotonic() - started:.0f} s", flush=True)
        link = next(p for p in fed.parts if p.name == "SuperLink")
        port = int(fed.fleet.rsplit(":", 1)[1])
        sampler = Sampler(link.process.pid, str(fed.server_dir), port)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        settings = RunSettings(
            server_dir=fed.server_dir, run_name=f"bench-{devices}",
            num_server_rounds=args.rounds, min_devices=devices,
            local_steps=args.local_steps, round_timeout=900.0,
        )
        rows: list[dict[str, Any]] = []
        last = sampler.snapshot()

        def on_round(row: dict[str, Any]) -> None:
            nonlocal last
            now = sampler.snapshot()
            rows.append({
                "devices": devices, "round": row["round"], "seconds": row["seconds"],
                "reported": row.get("devices_reported"),
                "link_cpu_s": now["link_cpu"] - last["link_cpu"],
                "server_cpu_s": now["server_cpu"] - last["server_cpu"],
                "link_mib": now["link_rss"] / 2**20, "server_mib": now["server_rss"] / 2**20,
                "kb_per_device": (now["bytes"] - last["bytes"]) / devices / 1024,
            })
            last = now
            print(line(rows[-1]), flush=True)

        try:
            outcome = start_run(fed.server_dir, settings, on_round=on_round)
        except KeystayError as err:  # the SuperLink went away mid-run: say so, go on
            print(f"   the run ended after {len(rows)} of {args.rounds} rounds: {err}",
                  flush=True)
            return rows
        finally:
            sampler.stop.set()
        if outcome.returncode != 0 or len(rows) < args.rounds:
            print(f"   the run ended after {len(rows)} of {args.rounds} rounds "
                  f"(exit {outcome.returncode}); its log: {outcome.log_file}", flush=True)
            print(outcome.log_file.read_text(errors="replace")[-2000:], flush=True)
        print(f"   memory per device (daemon, trainer, SuperNode, SuperExec, ClientApp): "
              f"{device_memory(fed):.0f} MiB", flush=True)
        return rows
    finally:
        fed.stop()


HEADER = (f"{'K':>3} {'round':>5} {'reported':>8} {'seconds':>8} {'link cpu s':>10} "
          f"{'server cpu s':>12} {'link MiB':>9} {'server MiB':>10} {'KB/device':>10}")


def line(r: dict[str, Any]) -> str:
    return (f"{r['devices']:>3} {r['round']:>5} {r['reported']!s:>8} {r['seconds']:>8.1f} "
            f"{r['link_cpu_s']:>10.1f} {r['server_cpu_s']:>12.1f} {r['link_mib']:>9.0f} "
            f"{r['server_mib']:>10.0f} {r['kb_per_device']:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="3,10,20")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--root", type=Path, help="keep every folder and log here "
                        "(default: a temporary folder, removed at the end)")
    args = parser.parse_args()
    # SIGTERM (a supervisor, `kill`) unwinds like Ctrl-C, so the federation's
    # finally stops every server and device process instead of orphaning them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    counts = [int(x) for x in args.devices.split(",") if x]
    print(HEADER, flush=True)
    medians = {}
    with tempfile.TemporaryDirectory(prefix="keystay-bench-deploy-") as tmp:
        for k in counts:
            rows = run((args.root or Path(tmp)) / f"k{k}", k, args)
            seconds = [r["seconds"] for r in rows]
            if seconds:  # a run that completed no round has no time to compare
                medians[k] = statistics.median(seconds[1:] or seconds)
    print("\nround time growth (median of rounds after the first):")
    base = next((k for k in counts if k in medians), None)
    for k in counts:
        if k not in medians or base is None:
            print(f"  {k} devices: no round completed")
            continue
        print(f"  {base} → {k} devices: {medians[k]:.1f} s ({medians[k] / medians[base]:.2f}×)")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
