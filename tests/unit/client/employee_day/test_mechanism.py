"""The employee-day mechanism: sensitivity C per day, secret sampling, noise that decodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import dequantize

from keystay.client.employee_day import mechanism as m
from keystay.client.trainer.csprng import CryptoRandom
from keystay.common.flatclip import update_norm

SHAPES = [(4, 3), (5,)]
SPEC = m.DayRoundSpec(
    noise_multiplier=1.0, update_clip=0.5, day_sample_rate=0.5, min_summed_devices=3
)
ENCODING = m.Encoding(clipping_range=8.0, quantization_range=2**22)


def _update(rng: np.random.Generator, scale: float) -> list[np.ndarray]:
    return [rng.normal(0, scale, shape) for shape in SHAPES]


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_removing_one_day_moves_the_sum_by_at_most_the_clip(scale: float) -> None:
    rng = np.random.default_rng(0)
    days = [_update(rng, scale) for _ in range(5)]
    full = m.clip_and_sum(days, SPEC.update_clip, SHAPES)
    for i in range(len(days)):
        without = m.clip_and_sum(days[:i] + days[i + 1:], SPEC.update_clip, SHAPES)
        diff = [a - b for a, b in zip(full, without, strict=True)]
        assert update_norm(diff) <= SPEC.update_clip * (1 + 1e-12)


def test_no_day_gives_zeros_of_the_model_shapes() -> None:
    total = m.clip_and_sum([], 1.0, SHAPES)
    assert [t.shape for t in total] == SHAPES
    assert all(not t.any() for t in total)


def test_a_day_of_another_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="shapes"):
        m.clip_and_sum([[np.zeros((2, 2)), np.zeros(5)]], 1.0, SHAPES)


def test_days_join_with_the_asked_rate() -> None:
    days = [f"2026-01-{d:02d}" for d in range(1, 29)]
    rng = CryptoRandom.from_seed(5, "days")
    joined = sum(len(m.sample_days(days, 0.25, rng)) for _ in range(400))
    expected = 0.25 * len(days) * 400
    assert abs(joined - expected) < 4 * math.sqrt(expected)
    assert m.sample_days(days, 1.0, rng) == days
    assert m.sample_days([], 0.5, rng) == []


def test_the_masked_sum_of_t_shares_decodes_to_the_mean_with_noise_sigma_c() -> None:
    """Encode three devices' sums the way the daemon does, add them the way
    Flower's server workflow does, and check what comes out: the mean update,
    plus noise whose std over the sum is σ·C (a few % either way)."""
    rng = np.random.default_rng(1)
    devices = 3
    shapes = [(200, 50)]
    sums = [[rng.normal(0, 0.01, shapes[0])] for _ in range(devices)]
    modulus = 2**32
    total = None
    for i, update in enumerate(sums):
        share = m.encode(update, SPEC, ENCODING, CryptoRandom.from_seed(i, "noise"))
        vec = parameters_mod(factor_combine(ENCODING.quantization_range, share), modulus)
        total = vec if total is None else parameters_mod(parameters_addition(total, vec), modulus)
    assert total is not None
    q_total, recon = factor_extract(total)
    assert q_total == devices * ENCODING.quantization_range
    decoded = dequantize(recon, ENCODING.clipping_range, ENCODING.quantization_range)[0]
    decoded = (decoded - (devices - 1) * ENCODING.clipping_range) * (
        ENCODING.quantization_range / q_total
    )
    mean = sum(s[0] for s in sums) / devices
    noise_of_sum = (decoded - mean) * devices
    assert abs(noise_of_sum.mean()) < 0.05 * SPEC.noise_multiplier * SPEC.update_clip
    assert noise_of_sum.std() == pytest.approx(SPEC.noise_multiplier * SPEC.update_clip, rel=0.05)


def test_a_non_finite_sum_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="finite"):
        m.encode([np.array([np.nan])], SPEC, ENCODING, CryptoRandom.from_seed(1))


def test_rounding_costs_a_little_noise_and_the_share_alone_sqrt_t() -> None:
    dim = 35_225
    honest, broken = m.mechanisms(SPEC, ENCODING, dim)
    scaled_clip = ENCODING.gamma * SPEC.update_clip
    assert honest.noise_multiplier == pytest.approx(1.0 / (1 + math.sqrt(dim) / scaled_clip))
    assert 0.99 < honest.noise_multiplier < 1.0
    assert broken.noise_multiplier == pytest.approx(honest.noise_multiplier / math.sqrt(3))
    assert honest.sample_rate == broken.sample_rate == SPEC.day_sample_rate
    assert honest.steps == broken.steps == 1


def test_a_coarse_quantisation_is_refused() -> None:
    coarse = m.Encoding(clipping_range=8.0, quantization_range=16)
    assert m.check_scale(SPEC, coarse, 100, 3) is not None
    assert m.check_scale(SPEC, ENCODING, 35_225, 1000) is None


def test_tau_is_negligible_at_keystay_scales_and_not_at_tiny_ones() -> None:
    assert m.tau(m.noise_scale(SPEC, ENCODING), 1000) == 0.0
    assert m.tau(1.0, 1000) > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0},
        {"update_clip": -1.0},
        {"day_sample_rate": 0.0},
        {"day_sample_rate": 1.5},
        {"min_summed_devices": 0},
    ],
)
def test_a_bad_spec_is_refused(kwargs: dict[str, float]) -> None:
    base = {"noise_multiplier": 1.0, "update_clip": 1.0, "day_sample_rate": 0.5,
            "min_summed_devices": 3}
    with pytest.raises(ValueError):
        m.DayRoundSpec(**{**base, **kwargs})  # type: ignore[arg-type]
