"""The epsilon maths (keystay.client.ledger.accounting), checked against Google's dp-accounting.

dp-accounting is an independent implementation (different code, same theory),
so agreement is evidence that keystay composes and converts correctly, not
just that it calls Opacus.
"""

from __future__ import annotations

import doctest
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from keystay.client.ledger import accounting
from keystay.client.ledger.accounting import (
    ACCOUNTANT,
    RDP_ORDERS,
    Epsilons,
    Mechanism,
    enforced,
    epsilon_prv,
    epsilon_rdp,
    epsilons,
    rdp_curve,
)

DELTA = 1e-5

# Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1.
ABADI = [Mechanism(noise_multiplier=4.0, sample_rate=0.01, steps=10_000)]
# TensorFlow Privacy's MNIST DP-SGD tutorial: 60,000 examples, batch 256,
# sigma 1.1, 60 epochs = 14,063 steps.
MNIST = [Mechanism(noise_multiplier=1.1, sample_rate=256 / 60_000, steps=14_063)]
# Three rounds of a device: different sigma, q and steps.
ROUNDS = [
    Mechanism(noise_multiplier=1.0, sample_rate=0.02, steps=500),
    Mechanism(noise_multiplier=1.5, sample_rate=0.01, steps=2_000),
    Mechanism(noise_multiplier=0.8, sample_rate=0.05, steps=100),
]
CASES = {"abadi": ABADI, "mnist": MNIST, "rounds": ROUNDS}


def _event(history: list[Mechanism]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
                ),
                m.steps,
            )
            for m in history
        ]
    )


def _classic_conversion(history: list[Mechanism], delta: float) -> float:
    """RDP -> (eps, delta) as in Mironov 2017 Prop. 3, used by the 2016-2019 papers."""
    orders = np.array(RDP_ORDERS)
    return float(np.min(rdp_curve(history) - math.log(delta) / (orders - 1)))


# -- pinned published figures ---------------------------------------------


def test_abadi_published_moments_accountant_figure() -> None:
    # Abadi et al. 2016, Sec. 3.1: "if q = 0.01, sigma = 4, delta = 1e-5 and T = 10000,
    # then we have eps ~ 1.26 using the moments accountant". The moments accountant is
    # RDP at integer orders with the classic conversion; our RDP curve reproduces it.
    assert _classic_conversion(ABADI, DELTA) == pytest.approx(1.26, abs=0.005)


def test_abadi_case_with_current_conversion() -> None:
    # The same RDP curve with Balle et al. 2020's tighter conversion (Opacus >= 1.0 and
    # dp-accounting both use it): 1.04. PRV (Gopi et al. 2021) is tighter still: 0.95.
    assert epsilon_rdp(ABADI, delta=DELTA) == pytest.approx(1.04, abs=0.005)
    prv = epsilon_prv(ABADI, delta=DELTA)
    assert prv.estimate == pytest.approx(0.947, abs=0.005)


def test_mnist_tutorial_published_figure() -> None:
    # TensorFlow Privacy's MNIST tutorial reports eps = 3.01 for these settings
    # (compute_dp_sgd_privacy with the classic conversion at the time).
    assert _classic_conversion(MNIST, DELTA) == pytest.approx(3.01, abs=0.005)
    # Current conversion (Opacus 1.6 and dp-accounting 0.6 agree): 2.60; PRV: 2.38.
    assert epsilon_rdp(MNIST, delta=DELTA) == pytest.approx(2.60, abs=0.005)
    assert epsilon_prv(MNIST, delta=DELTA).estimate == pytest.approx(2.38, abs=0.005)


# -- agreement with dp-accounting ------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_rdp_agrees_with_dp_accounting(name: str) -> None:
    history = CASES[name]
    google = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    google.compose(_event(history))
    expected = google.get_epsilon(DELTA)
    assert epsilon_rdp(history, delta=DELTA) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prv_interval_contains_pld(name: str) -> None:
    history = CASES[name]
    # PLD (Meiser-Mohammadi 2018, Koskela et al. 2020; dp-accounting's implementation)
    # at a 1e-4 grid is within ~1e-3 of the true epsilon here and takes < 0.5 s.
    google = pld.PLDAccountant(value_discretization_interval=1e-4)
    google.compose(_event(history))
    expected = google.get_epsilon(DELTA)
    prv = epsilon_prv(history, delta=DELTA)
    assert prv.lower <= expected <= prv.upper
    assert prv.lower <= prv.estimate <= prv.upper
    assert prv.upper - prv.lower <= 2 * accounting.PRV_EPS_ERROR + 1e-3


def test_prv_upper_matches_opacus_prv_accountant() -> None:
    # Same algorithm as Opacus's PRVAccountant (whose domain computation keystay
    # re-implements with cached RDP): the certified bound must be identical.
    from opacus.accountants import PRVAccountant

    opacus = PRVAccountant()
    opacus.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in ROUNDS]
    assert epsilon_prv(ROUNDS, delta=DELTA).upper == pytest.approx(
        opacus.get_epsilon(DELTA), rel=1e-9
    )


def test_safe_domain_matches_opacus() -> None:
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    merged = accounting._merged(ROUNDS)
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in merged]
    counts = [steps for _, _, steps in merged]
    theirs = compute_safe_domain_size(
        prvs=prvs, max_self_compositions=counts, eps_error=0.01, delta_error=1e-8
    )
    assert accounting._safe_half_width(merged, 0.01, 1e-8) == pytest.approx(theirs, rel=1e-12)


# -- properties ------------------------------------------------------------


def test_empty_history_costs_nothing() -> None:
    assert epsilon_rdp([], delta=DELTA) == 0.0
    assert tuple(epsilon_prv([], delta=DELTA)) == (0.0, 0.0, 0.0)
    zero = [Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=0)]
    assert epsilons(zero, delta=DELTA) == Epsilons(0.0, 0.0, 0.0)


def test_composition_is_order_free_and_merges_identical_mechanisms() -> None:
    reordered = list(reversed(ROUNDS))
    assert epsilon_rdp(reordered, delta=DELTA) == pytest.approx(epsilon_rdp(ROUNDS, delta=DELTA))
    split = [Mechanism(1.1, 256 / 60_000, 7_000), Mechanism(1.1, 256 / 60_000, 7_063)]
    assert epsilon_rdp(split, delta=DELTA) == pytest.approx(epsilon_rdp(MNIST, delta=DELTA))
    assert epsilon_prv(split, delta=DELTA).upper == pytest.approx(
        epsilon_prv(MNIST, delta=DELTA).upper
    )


@settings(max_examples=12, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 2_000),
    extra=st.integers(1, 2_000),
)
def test_rdp_grows_with_steps_and_shrinks_with_noise(
    sigma: float, q: float, steps: int, extra: int
) -> None:
    base = epsilon_rdp([Mechanism(sigma, q, steps)], delta=DELTA)
    assert base > 0
    assert epsilon_rdp([Mechanism(sigma, q, steps + extra)], delta=DELTA) >= base
    assert epsilon_rdp([Mechanism(sigma * 1.5, q, steps)], delta=DELTA) <= base


def test_prv_upper_bound_is_not_looser_than_rdp_on_typical_runs() -> None:
    for history in CASES.values():
        e = epsilons(history, delta=DELTA)
        assert e.prv <= e.prv_upper < e.rdp
        assert enforced(e) == e.prv_upper == e.enforced


def test_full_batch_sampling() -> None:
    # q = 1 is the plain Gaussian mechanism composed T times; PRV handles its edge case.
    e = epsilons([Mechanism(noise_multiplier=2.0, sample_rate=1.0, steps=10)], delta=DELTA)
    assert 0 < e.prv <= e.prv_upper <= e.rdp
    # Exact for the Gaussian mechanism: composition of 10 with sigma 2 is one with
    # sigma 2 / sqrt(10) (mu = sqrt(10) / 2 in Gaussian-DP terms).
    google = pld.PLDAccountant(value_discretization_interval=1e-4)
    google.compose(dp_accounting.GaussianDpEvent(2.0 / math.sqrt(10)))
    assert e.prv == pytest.approx(google.get_epsilon(DELTA), abs=0.01)


def test_enforced_is_the_smaller_valid_bound() -> None:
    assert enforced(Epsilons(rdp=2.0, prv=1.0, prv_upper=1.1)) == 1.1
    assert enforced(Epsilons(rdp=1.0, prv=1.0, prv_upper=1.2)) == 1.0
    assert enforced(Epsilons(rdp=2.0, prv=math.inf, prv_upper=math.inf)) == 2.0
    # NaN is "no bound", never zero.
    assert enforced(Epsilons(rdp=2.0, prv=math.nan, prv_upper=math.nan)) == 2.0
    assert enforced(Epsilons(rdp=math.nan, prv=math.nan, prv_upper=math.nan)) == math.inf
    assert ACCOUNTANT == "min(rdp, prv_upper)"


def test_prv_failure_falls_back_to_rdp(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("Floating point errors will dominate for such small values of delta.")

    monkeypatch.setattr(accounting, "epsilon_prv", broken)
    e = epsilons(ROUNDS, delta=DELTA)
    assert e.prv == e.prv_upper == math.inf
    assert enforced(e) == e.rdp == pytest.approx(epsilon_rdp(ROUNDS, delta=DELTA))


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(0.0, 0.1, 1), (-1.0, 0.1, 1), (math.inf, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1),
     (1.0, 0.1, -1), (1.0, 0.1, 1.5)],
)
def test_mechanism_rejects_nonsense(sigma: float, q: float, steps: int) -> None:
    with pytest.raises(ValueError):
        Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_bad_delta_is_refused(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilons(ROUNDS, delta=delta)


def test_history_must_hold_mechanisms() -> None:
    with pytest.raises(TypeError, match="Mechanism"):
        epsilon_rdp([(1.0, 0.1, 10)], delta=DELTA)  # type: ignore[list-item]


def test_doctests() -> None:
    result = doctest.testmod(accounting)
    assert result.attempted > 0
    assert result.failed == 0


def test_module_does_not_import_opacus_or_torch() -> None:
    code = (
        "import sys; from keystay.client.ledger.accounting import Mechanism, Epsilons, enforced; "
        "assert 'torch' not in sys.modules and 'opacus' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_multi_round_multi_block_device_history_matches_dp_accounting(tmp_path: Path) -> None:
    """What the device's ledger holds per block, checked against Google's accountants.

    Three rounds over three employee-days, each round reading two of them:
    every block's ε must be that of exactly the rounds that read it.
    """
    from keystay.client.ledger.ledger import Ledger
    from keystay.client.policy import DevicePolicy, TrainingRequest

    policy = DevicePolicy(epsilon_per_block=20.0)
    rounds = [
        (("2025-03-03", "2025-03-04"), Mechanism(1.0, 0.02, 150)),
        (("2025-03-04", "2025-03-05"), Mechanism(1.3, 0.01, 200)),
        (("2025-03-03", "2025-03-05"), Mechanism(0.9, 0.04, 80)),
    ]
    with Ledger.open(tmp_path) as ledger:
        for n, (blocks, m) in enumerate(rounds, start=1):
            ledger.admit(
                request=TrainingRequest(
                    noise_multiplier=m.noise_multiplier, max_grad_norm=1.0,
                    local_steps=m.steps, sample_rate=0.05, learning_rate=0.01, dp=True,
                    blocks=blocks, run_id="run", server_round=n,
                ),
                policy=policy,
                blocks=list(blocks),
                mechanism=m,
                epsilon_fn=lambda h, d: accounting.epsilons(h, delta=d),
                now=1_000.0 + n,
            )
        totals = {t.block: t for t in ledger.totals()}
    for block, total in totals.items():
        history = [m for blocks, m in rounds if block in blocks]
        assert len(history) == 2
        google_rdp = rdp.RdpAccountant(orders=list(RDP_ORDERS))
        google_rdp.compose(_event(history))
        assert total.epsilon_rdp == pytest.approx(google_rdp.get_epsilon(DELTA), rel=0.01)
        google_pld = pld.PLDAccountant(value_discretization_interval=1e-4)
        google_pld.compose(_event(history))
        pld_eps = google_pld.get_epsilon(DELTA)
        assert abs(total.epsilon_prv - pld_eps) <= 2 * accounting.PRV_EPS_ERROR + 1e-3
        # What the device enforces is a valid upper bound on the true ε.
        assert total.epsilon >= pld_eps - 1e-3
