"""Where a ``keystay sim`` round's time goes: the devices' own work against the round.

Reads a finished run's ``--out`` folder: the ServerApp's ``rounds.jsonl`` (round
seconds) and every virtual device's ``sim-timings.jsonl`` (per call: wall
seconds inside the device, and the part of it spent training). Prints per
round:

* ``round s``: the round's wall time (the ServerApp's row);
* ``device s``: the sum over devices of their time inside the device code
  (SecAgg+ stages or Train: opening the store and ledger, accounting,
  masking, signing, and training);
* ``train s``: the part of that spent in the trainer;
* ``ideal s``: ``device s / cores`` (the devices' work spread over the cores);
* ``round / ideal``: the issue's goal is at most 1.5;
* ``overhead ms/device``: ``(device s - train s) / devices`` (keystay's own
  per-device cost beside training: accounting, store, SecAgg+, report);
* ``engine ms/device``: ``(round s · cores - device s) / devices``: what is
  left for Flower's engine, the ServerApp (SecAgg+ server side, held-out
  score) and idle cores.

    python bench/bench_sim_overhead.py /tmp/sim100 --cores 2
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the run's --out folder")
    parser.add_argument("--cores", type=float, default=float(os.cpu_count() or 1))
    args = parser.parse_args()
    device_s: dict[int, float] = defaultdict(float)
    train_s: dict[int, float] = defaultdict(float)
    devices: dict[int, set[str]] = defaultdict(set)
    for timings in sorted((args.out / "devices").glob("*/sim-timings.jsonl")):
        for line in timings.read_text().splitlines():
            row = json.loads(line)
            device_s[row["round"]] += row["seconds"]
            train_s[row["round"]] += row["training_seconds"]
            devices[row["round"]].add(timings.parent.name)
    rounds = {}
    for path in (args.out / "server" / "runs").glob("*/rounds.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rounds[int(row["round"])] = float(row["seconds"])
    print(f"{'round':>5} {'devices':>7} {'round s':>8} {'device s':>9} {'train s':>8} "
          f"{'ideal s':>8} {'round/ideal':>11} {'overhead ms/dev':>15} {'engine ms/dev':>13}")
    for rnd in sorted(rounds):
        n = len(devices[rnd]) or 1
        ideal = device_s[rnd] / args.cores
        print(f"{rnd:>5} {len(devices[rnd]):>7} {rounds[rnd]:>8.1f} {device_s[rnd]:>9.1f} "
              f"{train_s[rnd]:>8.1f} {ideal:>8.1f} {rounds[rnd] / max(ideal, 1e-9):>11.2f} "
              f"{1000 * (device_s[rnd] - train_s[rnd]) / n:>15.1f} "
              f"{1000 * (rounds[rnd] * args.cores - device_s[rnd]) / n:>13.1f}")


if __name__ == "__main__":
    main()
