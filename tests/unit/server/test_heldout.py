"""The server-owned held-out set: deterministic, disjoint from devices, scored honestly."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch

from keystay.common.model import ModelConfig, NextEventModel, evaluate, initial_weights, set_weights
from keystay.common.windows import WINDOW, make_windows
from keystay.server import heldout
from keystay.server.heldout import (
    FIRST_DAY,
    FIRST_SEED,
    STRIDE,
    HeldoutError,
    HeldoutEvaluator,
    HeldoutPopulation,
    heldout_windows,
)
from keystay.sim.employees import SimulatedEmployee

SMALL = HeldoutPopulation(employees=2, days=2, events_per_day=150)


def test_windows_are_deterministic_and_per_day() -> None:
    a = heldout_windows(SMALL)
    b = heldout_windows(SMALL)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape[1] == WINDOW + 1
    # One day at a time, never a window across two days: the count is the sum
    # of each day's own windows.
    per_day = (SMALL.events_per_day - WINDOW - 1) // STRIDE + 1
    assert a.shape[0] == SMALL.employees * SMALL.days * per_day


def test_windows_are_the_simulated_employees_days() -> None:
    first_day = SimulatedEmployee(FIRST_SEED).day_records(FIRST_DAY, SMALL.events_per_day)
    tokens = np.array([r.token for r in first_day], dtype=np.int64)
    expected = make_windows(tokens, WINDOW, stride=STRIDE)
    np.testing.assert_array_equal(heldout_windows(SMALL)[: len(expected)], expected)
    # A different employee or day is different data.
    other = SimulatedEmployee(FIRST_SEED + 1).day_records(FIRST_DAY + timedelta(days=1), 150)
    assert [r.token for r in other] != [r.token for r in first_day]


def test_seeds_are_disjoint_from_every_device_seed() -> None:
    population = HeldoutPopulation(employees=5)
    assert list(population.seeds) == [FIRST_SEED + i for i in range(5)]
    # Simulated devices are numbered 1..N by the local federation (the demo)
    # and default to 0 in the device CLI; a federation of a million simulated
    # employees would still not reach the held-out seeds.
    assert min(population.seeds) > 10**6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"employees": 0}, "employees"),
        ({"days": -1}, "days"),
        ({"events_per_day": WINDOW}, "exceed the model's window"),
        ({"employees": True}, "employees"),
    ],
)
def test_population_is_checked(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(HeldoutError, match=message):
        HeldoutPopulation(**kwargs)


def test_score_is_the_model_evaluated_on_the_heldout_windows() -> None:
    config = ModelConfig()
    weights = initial_weights(config, seed=3)
    evaluator = HeldoutEvaluator(SMALL, config)
    score = evaluator.score(weights)

    model = NextEventModel(config)
    set_weights(model, weights)
    direct = evaluate(model, heldout_windows(SMALL))
    assert score.windows == len(heldout_windows(SMALL))
    assert score.accuracy == pytest.approx(direct.accuracy)
    assert score.loss == pytest.approx(direct.loss)
    # Other weights, other figures: the evaluator does not cache scores.
    other = evaluator.score(initial_weights(config, seed=4))
    assert other.loss != pytest.approx(score.loss)


def test_windows_are_built_once() -> None:
    evaluator = HeldoutEvaluator(SMALL, ModelConfig())
    assert evaluator.windows is evaluator.windows


def test_nan_weights_are_refused_with_a_sentence() -> None:
    config = ModelConfig()
    weights = initial_weights(config)
    weights[0] = np.full_like(weights[0], np.nan)
    with pytest.raises(ValueError, match="NaN"):
        HeldoutEvaluator(SMALL, config).score(weights)


def test_score_runs_on_score_threads_and_puts_the_callers_setting_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []

    def spy(model: torch.nn.Module, windows: np.ndarray) -> Any:
        seen.append(torch.get_num_threads())
        return evaluate(model, windows)

    monkeypatch.setattr(heldout, "evaluate", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        HeldoutEvaluator(SMALL, ModelConfig()).score(initial_weights(ModelConfig()))
        assert seen == [heldout.SCORE_THREADS] == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
