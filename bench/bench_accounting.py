"""Time one ledger charge as a block's history grows, and check its ε against dp-accounting.

Run: ``.venv/bin/python bench/bench_accounting.py [--charges 1000]``.

One block of a real :class:`~keystay.client.ledger.ledger.Ledger` (temp
folder, fsync'd SQLite) is charged round after round with a mix of DP-SGD
mechanisms (8 distinct ``(sigma, q, steps)``, cycled). At 1, 10, 100 and
1,000 charges it prints the time of that charge beside the goal (50 ms):
"cold" clears the per-mechanism PLD cache first (a round whose sample rate
was never seen: the daemon's usual case, as ``q`` follows the data size),
"warm" does not. Then the block's ε (RDP and the enforced PLD bound, as the
ledger stored them) beside Google's dp-accounting (RDP on the same orders,
and PLD at a 1e-4 grid) for the same history.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import dp_accounting
from dp_accounting import pld as google_pld
from dp_accounting import rdp as google_rdp

from keystay.client.ledger import pld
from keystay.client.ledger.accounting import RDP_ORDERS, Mechanism
from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy, TrainingRequest

DELTA = 1e-5
GOAL_MS = 50.0
MIX = [
    Mechanism(1.0, 0.004, 100),
    Mechanism(1.2, 0.006, 150),
    Mechanism(1.5, 0.010, 200),
    Mechanism(0.9, 0.002, 50),
    Mechanism(2.0, 0.020, 200),
    Mechanism(1.1, 0.003, 120),
    Mechanism(1.3, 0.008, 80),
    Mechanism(1.0, 0.001, 200),
]
MARKS = (1, 10, 100, 1_000)


def _charge(ledger: Ledger, policy: DevicePolicy, m: Mechanism, n: int) -> tuple[float, float]:
    """Charge ``m``; return (wall ms, CPU ms of this process)."""
    request = TrainingRequest(
        noise_multiplier=m.noise_multiplier, max_grad_norm=1.0, local_steps=m.steps,
        sample_rate=m.sample_rate, learning_rate=0.01, dp=True, blocks=("2026-01-05",),
        run_id="bench", server_round=n,
    )
    started, cpu = time.perf_counter(), time.process_time()
    ledger.admit(request=request, policy=policy, blocks=["2026-01-05"], mechanism=m,
                 now=float(n))
    return 1e3 * (time.perf_counter() - started), 1e3 * (time.process_time() - cpu)


def _google(history: list[Mechanism]) -> tuple[float, float]:
    counts = Counter(history)
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)),
            m.steps * k)
        for m, k in counts.items()
    ])
    r = google_rdp.RdpAccountant(orders=list(RDP_ORDERS))
    r.compose(event)
    p = google_pld.PLDAccountant(value_discretization_interval=1e-4)
    p.compose(event)
    return r.get_epsilon(DELTA), p.get_epsilon(DELTA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--charges", type=int, default=1_000)
    charges = parser.parse_args().charges
    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=32.0,
                          noise_multiplier_min=0.5, delta=DELTA)
    print(f"δ = {DELTA:g}; {len(MIX)} distinct mechanisms cycled; goal ≤ {GOAL_MS:g} ms a charge")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(wall time includes waiting for a CPU and the fsync; CPU time does not)")
    print(f"{'charge':>7}{'cold ms':>9}{'(cpu)':>7}{'warm ms':>9}{'(cpu)':>7}{'goal':>6}"
          f"{'RDP':>9}{'dp-acc RDP':>11}{'PLD bound':>10}{'dp-acc PLD':>11}{'diff %':>8}")
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp)) as ledger:
        history: list[Mechanism] = []
        for n in range(1, charges + 1):
            m = MIX[(n - 1) % len(MIX)]
            if n in MARKS:
                pld.gaussian_pair.cache_clear()
                cold, cold_cpu = _charge(ledger, policy, m, n)
                history.append(m)
                # The same round again, mechanism cached, to show the warm cost; it is
                # a real charge too, so the history holds it.
                warm, warm_cpu = _charge(ledger, policy, m, n + charges)
                history.append(m)
                total = ledger.totals()[0]
                g_rdp, g_pld = _google(history)
                ok = "ok" if max(cold, warm) <= GOAL_MS else "OVER"
                print(f"{n:>7}{cold:>9.1f}{cold_cpu:>7.1f}{warm:>9.1f}{warm_cpu:>7.1f}{ok:>6}"
                      f"{total.epsilon_rdp:>9.4f}"
                      f"{g_rdp:>11.4f}{total.epsilon:>10.4f}{g_pld:>11.4f}"
                      f"{100 * (total.epsilon - g_pld) / g_pld:>8.2f}")
            else:
                _charge(ledger, policy, m, n)
                history.append(m)


if __name__ == "__main__":
    main()
