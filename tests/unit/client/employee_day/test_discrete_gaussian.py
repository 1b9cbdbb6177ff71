"""The discrete Gaussian sampler draws exactly the distribution it names."""

from __future__ import annotations

import numpy as np
import pytest

from keystay.client.employee_day import discrete_gaussian
from keystay.client.trainer.csprng import CryptoRandom


@pytest.mark.parametrize("scale", [0.6, 2.5, 7.0])
def test_matches_the_exact_pmf(scale: float) -> None:
    draws = discrete_gaussian.sample(200_000, scale, CryptoRandom.from_seed(int(scale * 10), "t"))
    values, counts = np.unique(draws, return_counts=True)
    support = np.arange(values.min() - 3, values.max() + 4)
    observed = np.zeros(len(support))
    observed[np.searchsorted(support, values)] = counts / len(draws)
    # Total variation distance; sampling error alone is about 0.005 here.
    assert 0.5 * np.abs(observed - discrete_gaussian.pmf(support, scale)).sum() < 0.01


def test_large_scale_has_the_right_moments() -> None:
    scale = 6.0e5
    draws = discrete_gaussian.sample(100_000, scale, CryptoRandom.from_seed(3, "t"))
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 5 * scale / np.sqrt(len(draws))
    assert abs(draws.std() / scale - 1) < 0.02


def test_seeded_draws_repeat_and_os_draws_do_not() -> None:
    a = discrete_gaussian.sample(1000, 50.0, CryptoRandom.from_seed(9, "t"))
    b = discrete_gaussian.sample(1000, 50.0, CryptoRandom.from_seed(9, "t"))
    c = discrete_gaussian.sample(1000, 50.0, CryptoRandom.from_os("t"))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 2.0**41])
def test_refuses_a_scale_it_cannot_sample(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        discrete_gaussian.sample(3, scale, CryptoRandom.from_seed(1))


def test_zero_values() -> None:
    assert discrete_gaussian.sample(0, 3.0, CryptoRandom.from_seed(1)).shape == (0,)
