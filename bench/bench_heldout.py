"""What the ServerApp's held-out scoring costs per round, on one torch thread and on all cores.

Builds the default held-out population (``RunSettings``: the server's own
simulated employees), then scores the initial global model ``--repeat`` times
with each thread count in turn, interleaved so both meet the same load, and
prints the median wall and CPU seconds of one score. keystay scores on
:data:`keystay.server.heldout.SCORE_THREADS` threads (1); torch's own default
is one thread per core. The machine's load average is printed beside the
figures: the gap between the two grows with the load.

    .venv/bin/python bench/bench_heldout.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from keystay.common.model import ModelConfig, initial_weights
from keystay.server import heldout
from keystay.server.heldout import HeldoutEvaluator, HeldoutPopulation
from keystay.server.settings import RunSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    defaults = RunSettings(server_dir=".", run_name="bench-heldout")
    evaluator = HeldoutEvaluator(
        HeldoutPopulation(employees=defaults.heldout_employees, days=defaults.heldout_days,
                          events_per_day=defaults.heldout_events_per_day), ModelConfig())
    weights = initial_weights(ModelConfig(), 0)
    evaluator.score(weights)  # builds the windows and the model once
    counts = sorted({heldout.SCORE_THREADS, os.cpu_count() or 1})
    wall: dict[int, list[float]] = {n: [] for n in counts}
    cpu: dict[int, list[float]] = {n: [] for n in counts}
    load = os.getloadavg()[0]
    for _ in range(args.repeat):
        for n in counts:
            heldout.SCORE_THREADS = n
            started, spent = time.perf_counter(), time.process_time()
            evaluator.score(weights)
            wall[n].append(time.perf_counter() - started)
            cpu[n].append(time.process_time() - spent)
    print(f"held-out scoring of {evaluator.windows.shape[0]} windows, median of {args.repeat} "
          f"(load {load:.2f} → {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
          f"torch {torch.__version__})")
    for n in counts:
        print(f"  {n} thread(s): {statistics.median(wall[n]):.3f} s wall, "
              f"{statistics.median(cpu[n]):.3f} s CPU")


if __name__ == "__main__":
    main()
