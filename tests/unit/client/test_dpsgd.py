"""DP-SGD training (keystay.client.trainer.dpsgd) and the job types (trainer.job)."""

from __future__ import annotations

import doctest
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch

from keystay.client.model import ModelConfig, NextEventModel, evaluate, initial_weights, set_weights
from keystay.client.trainer import job as job_module
from keystay.client.trainer.dpsgd import train_dp, train_nondp
from keystay.client.trainer.job import TrainJob, sample_rate_for
from keystay.client.windows import WINDOW, make_windows, split_heldout

# Small enough that a step takes milliseconds.
SMALL = ModelConfig(vocab_size=32, embed_dim=16, channels=16, layers=5)


def _random_windows(n: int, vocab: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, size=(n, WINDOW + 1))


def _job(**overrides: object) -> TrainJob:
    fields: dict[str, object] = {
        "weights": initial_weights(SMALL, seed=0),
        "train": _random_windows(200),
        "heldout": _random_windows(20, seed=1),
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "steps": 5,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "seed": 0,
        "config": SMALL,
    }
    fields.update(overrides)
    return TrainJob(**fields)  # type: ignore[arg-type]


@pytest.fixture
def optimizer_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the steps the underlying optimizer really takes (after Opacus's noise)."""
    calls: list[int] = []
    for cls in (torch.optim.Adam, torch.optim.SGD):
        original = cls.step

        def counted(self: torch.optim.Optimizer, *a: object, _o=original, **k: object) -> object:
            calls.append(1)
            return _o(self, *a, **k)

        monkeypatch.setattr(cls, "step", counted)
    yield calls


def _delta_norm(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(before, after, strict=True))))


@pytest.mark.parametrize("steps", [1, 7, 23])
def test_takes_exactly_the_steps_asked_for(steps: int, optimizer_steps: list[int]) -> None:
    # q = 0.5: one pass of the Poisson loader is 2 batches, so 7 and 23 steps need
    # the loader to be iterated again and again.
    outcome = train_dp(_job(train=_random_windows(40), batch_size=20, steps=steps))
    assert outcome.steps == steps
    assert len(optimizer_steps) == steps


def test_empty_poisson_batches_are_steps_too(optimizer_steps: list[int]) -> None:
    # q = 1/50: a batch is empty with probability 0.98**50 = 0.36.
    job = _job(train=_random_windows(50), batch_size=1, steps=30)
    outcome = train_dp(job)
    assert outcome.empty_batches > 0
    assert len(optimizer_steps) == 30
    assert all(np.isfinite(w).all() for w in outcome.weights)


def test_weights_change_and_keep_their_shapes() -> None:
    job = _job()
    outcome = train_dp(job)
    assert [w.shape for w in outcome.weights] == [w.shape for w in job.weights]
    assert [w.dtype for w in outcome.weights] == [w.dtype for w in job.weights]
    assert _delta_norm(job.weights, outcome.weights) > 0
    assert outcome.dp and outcome.noise_multiplier == 1.0
    assert outcome.num_examples == 200
    assert outcome.sample_rate == sample_rate_for(200, 16) == 16 / 200


def test_same_seed_same_result_and_no_seed_is_fresh() -> None:
    a = train_dp(_job(seed=7))
    b = train_dp(_job(seed=7))
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    c = train_dp(_job(seed=None))
    d = train_dp(_job(seed=None))
    assert not all(np.array_equal(x, y) for x, y in zip(c.weights, d.weights, strict=True))


def test_noise_is_added_and_scales_with_sigma() -> None:
    # Plain SGD on the same batches: the update's size grows with the noise multiplier.
    base = _job(optimizer="sgd", learning_rate=0.01, steps=3)
    quiet = train_dp(replace(base, noise_multiplier=1e-3))
    loud = train_dp(replace(base, noise_multiplier=50.0))
    assert _delta_norm(base.weights, loud.weights) > 10 * _delta_norm(base.weights, quiet.weights)


def test_gradients_are_clipped() -> None:
    # Almost no noise: the update is the clipped gradient, so a tiny clip norm shrinks it.
    base = _job(optimizer="sgd", learning_rate=0.01, steps=1, noise_multiplier=1e-6)
    wide = train_dp(replace(base, max_grad_norm=100.0))
    tight = train_dp(replace(base, max_grad_norm=1e-3))
    assert _delta_norm(base.weights, tight.weights) < 0.01 * _delta_norm(base.weights, wide.weights)


def test_learns_a_learnable_sequence() -> None:
    # A repeating 7-token pattern: the next token is a function of the context.
    tokens = np.tile(np.array([3, 9, 4, 1, 5, 9, 2]), 300)
    train, heldout = split_heldout(make_windows(tokens, WINDOW), 0.1)
    weights = initial_weights(SMALL, seed=0)
    model = NextEventModel(SMALL)
    set_weights(model, weights)
    before = evaluate(model, heldout)
    outcome = train_dp(
        TrainJob(
            weights=weights,
            train=train,
            heldout=heldout,
            noise_multiplier=0.8,
            max_grad_norm=1.0,
            steps=60,
            batch_size=64,
            learning_rate=1e-2,
            seed=0,
            config=SMALL,
        )
    )
    assert outcome.heldout_loss < 0.5 * before.loss
    assert outcome.heldout_accuracy > 0.9
    assert outcome.train_loss < before.loss


def test_nondp_baseline() -> None:
    outcome = train_nondp(_job(steps=4))
    assert not outcome.dp
    assert outcome.steps == 4
    assert outcome.noise_multiplier == 0.0


def test_rejects_windows_of_another_width() -> None:
    with pytest.raises(ValueError, match="make_windows"):
        train_dp(_job(train=np.ones((50, 10), dtype=np.int64), heldout=np.ones((0, 10))))


def test_rejects_tokens_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocabularies"):
        train_dp(_job(train=_random_windows(50, vocab=100)))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("noise_multiplier", 0.0, "noise_multiplier"),
        ("max_grad_norm", -1.0, "max_grad_norm"),
        ("steps", 0, "steps"),
        ("batch_size", 0, "batch_size"),
        ("learning_rate", 0.0, "learning_rate"),
        ("optimizer", "lbfgs", "optimizer"),
        ("train", np.ones((0, WINDOW + 1), dtype=np.int64), "non-empty"),
        ("heldout", np.ones((3, 5), dtype=np.int64), "heldout"),
    ],
)
def test_job_validation(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _job(**{field: value})


def test_sample_rate() -> None:
    assert sample_rate_for(3000, 64) == 64 / 3000
    assert sample_rate_for(10, 64) == 1.0
    with pytest.raises(ValueError):
        sample_rate_for(0, 64)
    result = doctest.testmod(job_module)
    assert result.attempted > 0 and result.failed == 0


def test_job_module_does_not_import_torch() -> None:
    code = "import keystay.client.trainer.job, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
