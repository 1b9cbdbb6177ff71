"""Print keystay's ε next to Google's dp-accounting for the classic DP-SGD cases.

Run: ``.venv/bin/python bench/bench_accountants.py``. keystay's figures come
from :mod:`keystay.client.ledger.accounting` (its own RDP, the certified PLD
bound the device enforces, and Opacus's PRV interval for reference); the
independent ones from ``dp_accounting`` (RDP, and PLD at a 1e-4 grid).
"""

from __future__ import annotations

import dp_accounting
from dp_accounting import pld, rdp

from keystay.client.ledger.accounting import (
    RDP_ORDERS,
    Mechanism,
    epsilon_prv,
    epsilon_rdp,
    epsilons,
)

DELTA = 1e-5
CASES = {
    "q=0.01 σ=4 10,000 steps": [Mechanism(4.0, 0.01, 10_000)],
    "q=256/60000 σ=1.1 14,063 steps": [Mechanism(1.1, 256 / 60_000, 14_063)],
    "3 rounds, mixed σ/q/steps": [
        Mechanism(1.0, 0.02, 500), Mechanism(1.5, 0.01, 2_000), Mechanism(0.8, 0.05, 100),
    ],
}


def _event(history: list[Mechanism]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)),
            m.steps)
        for m in history
    ])


def main() -> None:
    print(f"δ = {DELTA:g}")
    print(f"{'case':<32}{'keystay RDP':>12}{'dp-acc RDP':>12}{'diff %':>8}"
          f"{'PRV low':>9}{'PRV up':>9}{'PLD bound':>10}{'dp-acc PLD':>12}")
    for name, history in CASES.items():
        google_rdp = rdp.RdpAccountant(orders=list(RDP_ORDERS))
        google_rdp.compose(_event(history))
        g = google_rdp.get_epsilon(DELTA)
        ours = epsilon_rdp(history, delta=DELTA)
        prv = epsilon_prv(history, delta=DELTA)
        google_pld = pld.PLDAccountant(value_discretization_interval=1e-4)
        google_pld.compose(_event(history))
        print(f"{name:<32}{ours:>12.4f}{g:>12.4f}{100 * (ours - g) / g:>8.3f}"
              f"{prv.lower:>9.4f}{prv.upper:>9.4f}"
              f"{epsilons(history, delta=DELTA).prv_upper:>10.4f}"
              f"{google_pld.get_epsilon(DELTA):>12.4f}")


if __name__ == "__main__":
    main()
