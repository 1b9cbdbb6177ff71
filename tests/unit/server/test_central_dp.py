"""User-level central DP: clipping, noise scale, fixed denominator, accountant vs dp-accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keystay.common.flatclip import clip_update, update_norm
from keystay.server.central_dp import (
    SAMPLING_ALL,
    SAMPLING_DESCRIPTIONS,
    SAMPLING_FIXED_SIZE,
    CentralDP,
    CentralDPAccountant,
    CentralDPError,
    aggregate_with_central_dp,
    central_epsilon,
)

SHAPES = [(4, 3), (5,)]


def zeros() -> list[np.ndarray]:
    return [np.zeros(s, dtype=np.float32) for s in SHAPES]


def reply(global_arrays: list[np.ndarray], update: list[np.ndarray]) -> list[np.ndarray]:
    return [(g + u).astype(np.float32) for g, u in zip(global_arrays, update, strict=True)]


# --- clipping ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    a=hnp.arrays(np.float64, (4, 3), elements=st.floats(-1e3, 1e3)),
    b=hnp.arrays(np.float64, (5,), elements=st.floats(-1e3, 1e3)),
    clip=st.floats(1e-3, 10.0),
)
def test_clipped_update_norm_never_exceeds_clip(a: np.ndarray, b: np.ndarray, clip: float) -> None:
    clipped, norm = clip_update([a, b], clip)
    assert update_norm(clipped) <= clip * (1 + 1e-9)
    if norm <= clip:  # small updates pass unchanged
        np.testing.assert_array_equal(clipped[0], a)
    else:  # large ones keep their direction
        np.testing.assert_allclose(clipped[1] * norm / clip, b, rtol=1e-9, atol=1e-9)


def test_aggregate_of_one_huge_update_moves_at_most_clip_over_n() -> None:
    g = [np.full(s, 0.5, dtype=np.float32) for s in SHAPES]
    huge = [np.full(s, 100.0) for s in SHAPES]
    new = aggregate_with_central_dp(
        g, [reply(g, huge)], np.random.default_rng(0),
        clip_norm=0.3, noise_multiplier=0.0, num_sampled=3,
    )
    moved = update_norm([n.astype(np.float64) - x for n, x in zip(new, g, strict=True)])
    assert moved == pytest.approx(0.3 / 3, rel=1e-5)
    assert [n.dtype for n in new] == [np.float32, np.float32]


def test_fixed_denominator_counts_devices_sent_not_devices_answering() -> None:
    g = zeros()
    u = [np.full(s, 0.01) for s in SHAPES]  # far below the clip
    replies = [reply(g, u), reply(g, u)]
    mech = CentralDP(clip_norm=1.0, noise_multiplier=0.0, num_sampled=4)
    new = mech.aggregate(g, replies, np.random.default_rng(0))
    np.testing.assert_allclose(new[0], 0.01 * 2 / 4, rtol=1e-6)


# --- noise ---------------------------------------------------------------------------


def test_noise_std_is_noise_multiplier_times_clip_over_n() -> None:
    z, clip, n = 1.3, 0.7, 5
    g = [np.zeros(20_000, dtype=np.float64)]
    rng = np.random.default_rng(20240601)
    mech = CentralDP(clip_norm=clip, noise_multiplier=z, num_sampled=n)
    draws = np.concatenate(
        # Zero updates: whatever moves the weights is the noise.
        [mech.aggregate(g, [g, g], rng)[0] for _ in range(20)]
    )
    expected = z * clip / n
    assert mech.noise_std == pytest.approx(expected)
    # 400k draws: the sample std's relative standard error is ~0.11 %.
    assert np.std(draws) == pytest.approx(expected, rel=0.01)
    assert abs(np.mean(draws)) < 5 * expected / math.sqrt(draws.size)


def test_noise_is_fresh_per_call_and_reproducible_per_seed() -> None:
    g = zeros()
    mech = CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_sampled=1)
    a = mech.aggregate(g, [g], np.random.default_rng(7))
    b = mech.aggregate(g, [g], np.random.default_rng(7))
    rng = np.random.default_rng(7)
    c, d = mech.aggregate(g, [g], rng), mech.aggregate(g, [g], rng)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(c[0], d[0])


# --- parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_norm": 0.0}, "clip norm"),
        ({"noise_multiplier": -1.0}, "noise multiplier"),
        ({"num_sampled": 0}, "devices sampled"),
        ({"sampling": "poisson"}, "unknown sampling"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_parameters_are_checked(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"clip_norm": 1.0, "noise_multiplier": 1.0, "num_sampled": 2}
    with pytest.raises(CentralDPError, match=message):
        CentralDP(**{**base, **kwargs})  # type: ignore[arg-type]


def test_inputs_are_checked() -> None:
    g = zeros()
    mech = CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_sampled=1)
    rng = np.random.default_rng(0)
    with pytest.raises(CentralDPError, match="sent to 1"):
        mech.aggregate(g, [g, g], rng)
    with pytest.raises(CentralDPError, match="shape"):
        mech.aggregate(g, [[np.zeros((3, 4)), np.zeros(5)]], rng)
    with pytest.raises(CentralDPError, match="no device updates"):
        aggregate_with_central_dp(g, [], rng, clip_norm=1.0, noise_multiplier=1.0)


def test_sampling_is_never_amplified() -> None:
    for sampling in (SAMPLING_ALL, SAMPLING_FIXED_SIZE):
        mech = CentralDP(clip_norm=1.0, noise_multiplier=1.0, num_sampled=3, sampling=sampling)
        assert mech.sample_rate == 1.0
        assert mech.accountant().sample_rate == 1.0
        assert "no amplification" in mech.sampling_description
    assert SAMPLING_DESCRIPTIONS[SAMPLING_ALL] == "all devices every round, no amplification"


# --- accountant ----------------------------------------------------------------------


def reference_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """Google's dp-accounting RDP accountant, an independent implementation."""
    event: dp_event.DpEvent = dp_event.GaussianDpEvent(z)
    if q < 1:
        event = dp_event.PoissonSampledDpEvent(q, event)
    accountant = RdpAccountant()
    accountant.compose(dp_event.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    ("z", "q", "rounds", "delta"),
    [
        (1.0, 1.0, 1, 1e-5),
        (1.1, 1.0, 10, 1e-5),
        (2.0, 1.0, 50, 1e-6),
        (5.0, 1.0, 3, 1e-5),
        (0.8, 0.1, 100, 1e-5),
    ],
)
def test_accountant_matches_dp_accounting(z: float, q: float, rounds: int, delta: float) -> None:
    acc = CentralDPAccountant(noise_multiplier=z, sample_rate=q, delta=delta)
    acc.step(rounds)
    assert acc.epsilon() == pytest.approx(reference_epsilon(z, q, rounds, delta), rel=0.01)


def test_accountant_grows_with_rounds_and_restores() -> None:
    acc = CentralDPAccountant(noise_multiplier=1.5, sample_rate=1.0, delta=1e-5)
    assert acc.epsilon() == 0.0
    values = []
    for _ in range(4):
        acc.step()
        values.append(acc.epsilon())
    assert values == sorted(values) and len(set(values)) == 4
    again = CentralDPAccountant.from_state_dict(acc.state_dict())
    assert again.epsilon() == values[-1]


def test_no_noise_means_unbounded_epsilon() -> None:
    assert central_epsilon(noise_multiplier=0.0, sample_rate=1.0, steps=1, delta=1e-5) == math.inf
    with pytest.raises(CentralDPError, match="sample rate"):
        CentralDPAccountant(noise_multiplier=1.0, sample_rate=0.0)
