"""Time opening a device ledger that holds many charges (what a daemon start pays).

Run: ``.venv/bin/python bench/bench_ledger_open.py [--charges 1000] [--repeat 20]``.

Builds a real :class:`~keystay.client.ledger.ledger.Ledger` in a temporary
folder on disk (fsync'd SQLite): ``--charges`` rounds, half record-level on
two days, half employee-day on two other days (both series, the unit table),
each pair of days charged by four rounds, the fourth of which retires it. The charges
are priced with a fake additive accountant so that building is quick: opening
never runs an accountant, so the file it opens has the shape the daemon's
would. Then it opens and closes the ledger ``--repeat`` times and prints the
median and the slowest wall time of ``Ledger.open``, and its median CPU time
(steadier than wall time on a shared machine): the version check, the
``quick_check`` of the whole file and, where the ledger has one, the
verification of its integrity chain.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path

from keystay.client.ledger.accounting import Epsilons, Mechanism
from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy, TrainingRequest

# Four rounds spend a pair of days exactly: the fourth retires them.
RECORD = DevicePolicy(privacy_unit="record", epsilon_per_block=8.0)
DAY = DevicePolicy(epsilon_per_day=2.0, epsilon_per_day_broken_aggregation=4.0,
                   min_summed_devices=4)


def additive(history: Sequence[Mechanism], delta: float) -> Epsilons:
    """ε = Σ T·q/σ: enough to fill rows; the open being timed prices nothing."""
    total = sum(m.steps * m.sample_rate / m.noise_multiplier for m in history)
    return Epsilons(rdp=1.25 * total, prv=0.99 * total, prv_upper=total)


def build(folder: Path, charges: int) -> None:
    """``charges`` rounds, alternating record-level and employee-day, two days each."""
    first = date(2025, 1, 1)
    with Ledger.open(folder) as ledger:
        for n in range(charges):
            pair = n // 4  # each pair of days is charged by 4 rounds of one unit
            days = [str(first + timedelta(days=2 * pair + k)) for k in (0, 1)]
            if (n // 4) % 2 == 0:
                req = TrainingRequest(1.0, 1.0, 100, 0.02, 0.01, True, (), "bench", n + 1)
                charge = ledger.admit(request=req, policy=RECORD, blocks=days,
                                      mechanism=Mechanism(1.0, 0.02, 100),
                                      epsilon_fn=additive, now=1_000.0 + n)
            else:
                req = TrainingRequest(1.0, 0.0, 10, 0.0, 0.01, True, (), "bench", n + 1,
                                      privacy_unit="employee-day", update_clip=0.5,
                                      day_sample_rate=0.5)
                charge = ledger.admit(request=req, policy=DAY, blocks=days,
                                      mechanism=Mechanism(1.0, 0.5, 1),
                                      broken_mechanism=Mechanism(0.5, 0.5, 1),
                                      epsilon_fn=additive, now=1_000.0 + n)
            ledger.mark_answered(charge)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--charges", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        build(folder, args.charges)
        built = time.perf_counter() - started
        times, cpu = [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            ledger = Ledger.open(folder)
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            ledger.close()
        with Ledger.open(folder) as ledger:
            blocks = len(ledger.totals())
        size = sum(f.stat().st_size for f in folder.iterdir()) / 1024
    print(f"ledger: {args.charges} charges on {blocks} days, {size:.0f} KiB on disk "
          f"(built in {built:.1f} s)")
    print(f"Ledger.open over {args.repeat} opens: median {statistics.median(times):.2f} ms wall "
          f"({statistics.median(cpu):.2f} ms CPU), slowest {max(times):.2f} ms wall")


if __name__ == "__main__":
    main()
