"""The cheap benchmarks still run against the code they measure.

Benchmarks are not in CI (their figures are not assertions), so an API
change can leave one broken until someone needs its figure:
``bench/bench_accounting.py`` built its ``TrainingRequest`` with a
``batch_size`` the request had long lost, and charged under a policy of
the other privacy unit. Each benchmark here runs on its smallest input,
and its output is checked for the line that carries its figure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize(("script", "args", "expect"), [
    ("bench_accounting.py", ["--charges", "1"], "      1 "),
    ("bench_ledger_open.py", ["--charges", "5", "--repeat", "1"], "Ledger.open over 1 opens"),
    ("bench_store.py", ["--events", "2000", "--batch", "100", "--blocks", "2", "--repeat", "1"],
     "bytes/event"),
    ("bench_secagg_bytes.py", ["--devices", "3", "--threshold", "2"], '"ratio"'),
    ("bench_dpsgd.py", ["--batches", "16", "--steps", "2", "--repeats", "1", "--days", "1",
                        "--events", "3000", "--no-opacus"], "keystay DP"),
    ("bench_utility.py", ["--sizes", "3", "--epsilons", "8", "--rounds", "1", "--no-tune",
                          "--no-central", "--workers", "1", "--heldout-employees", "1"],
     "      record "),
    # The chosen setting's row carries its clip C; the shipped row the record-level σ.
    ("bench_tuning.py", ["--rounds", "1", "--devices", "1", "--days", "1", "--events", "2000",
                         "--eps", "8", "--rates", "0.25", "--steps", "2", "--lrs", "0.01",
                         "--clips", "0.5", "--eval-employees", "1"],
     "| 0.5 | 0.25 | 2 | 0.01 |"),
])
def test_a_cheap_benchmark_runs(script: str, args: list[str], expect: str) -> None:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout, done.stdout[-2000:]
