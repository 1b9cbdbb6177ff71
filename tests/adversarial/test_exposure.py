"""A stranger's check: is a planted secret more likely after training? (Secret Sharer)

Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer: Evaluating and
Testing Unintended Memorization in Neural Networks" (USENIX Security 2019):
plant random *canary* sequences in one employee's day, train, and rank each
canary's likelihood under the model among many random sequences of the same
length. The exposure ``log2(candidates) - log2(rank)`` is about 1.4 bits for
a model that never saw the canary and up to ``log2(candidates)`` for one
that memorised it.

The federation here is in-process and small, but every device step is the
shipped mechanism: the days of each simulated employee are sampled with
:func:`~keystay.client.employee_day.mechanism.sample_days`, trained on
separately, clipped and summed, and encoded with the device's discrete
Gaussian share (:func:`~keystay.client.employee_day.mechanism.encode`); the
shares are added modulo ``2**32`` and decoded the way Flower's SecAgg+
server workflow does. Two federations are trained from the same start and
the same random streams: one with the canary employee, one without them.

The test asserts two things, so that it can fail both ways:

* **Control (no privacy):** with the clip and the noise off and every day
  read each round, the canaries' mean exposure rises by several bits over the
  model that never saw them; otherwise the test could not see memorisation.
* **Default mechanism:** at the shipped run defaults (noise, clip, day
  sampling rate, t = 3), the canaries are no more exposed than under the model
  that never saw the employee (within a fraction of a bit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import date, timedelta

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flwr.common.secure_aggregation.ndarrays_arithmetic import (  # noqa: E402
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import dequantize  # noqa: E402

from keystay.client.employee_day import mechanism as m  # noqa: E402
from keystay.client.trainer.csprng import CryptoRandom  # noqa: E402
from keystay.client.trainer.dpsgd import train_nondp  # noqa: E402
from keystay.client.trainer.job import TrainJob  # noqa: E402
from keystay.common.model import ModelConfig, NextEventModel, initial_weights, set_weights  # noqa: E402
from keystay.common.vocab import VOCAB_SIZE  # noqa: E402
from keystay.common.windows import TRAIN_STRIDE, WINDOW, make_windows  # noqa: E402
from keystay.sim.employees import SimulatedEmployee  # noqa: E402

EMPLOYEES = [701, 702, 703, 704, 705, 706]
TARGET = 701
DAYS = [date(2026, 3, 2) + timedelta(days=i) for i in range(2)]
EVENTS_PER_DAY = 1200
CANARIES = 4
CANARY_LENGTH = 6
INSERTIONS = 25
CANDIDATES = 511
ROUNDS = 6
LOCAL_STEPS = 30
ENCODING = m.Encoding(clipping_range=8.0, quantization_range=2**22)
MODULUS = 2**32


def _canaries() -> np.ndarray:
    rng = np.random.default_rng(2019)
    return rng.integers(0, VOCAB_SIZE, size=(CANARIES, CANARY_LENGTH))


def _days(with_target: bool) -> dict[int, list[np.ndarray]]:
    """Token windows per employee per day; the target's first day carries the canaries."""
    out: dict[int, list[np.ndarray]] = {}
    canaries = _canaries()
    for seed in EMPLOYEES:
        if seed == TARGET and not with_target:
            continue
        employee = SimulatedEmployee(seed)
        days = []
        for i, day in enumerate(DAYS):
            tokens = np.array([r.token for r in employee.day_records(day, EVENTS_PER_DAY)])
            if seed == TARGET and i == 0:
                # Spread the insertions so each lands inside a training window.
                spots = np.linspace(0, len(tokens) - 1, CANARIES * INSERTIONS, dtype=int)
                parts, last = [], 0
                for k, spot in enumerate(spots):
                    parts += [tokens[last:spot], canaries[k % CANARIES]]
                    last = spot
                tokens = np.concatenate([*parts, tokens[last:]])
            days.append(make_windows(tokens, WINDOW, stride=TRAIN_STRIDE))
        out[seed] = days
    return out


def _local_update(weights: list[np.ndarray], windows: np.ndarray, seed: int) -> list[np.ndarray]:
    job = TrainJob(
        weights=weights, train=windows, heldout=windows[:0], noise_multiplier=1.0,
        max_grad_norm=1.0, steps=LOCAL_STEPS, batch_size=16, poisson_rate=1.0,
        learning_rate=0.02, seed=seed,
    )
    new = train_nondp(job).weights
    return [np.asarray(n, np.float64) - np.asarray(w, np.float64)
            for n, w in zip(new, weights, strict=True)]


def _federate(
    population: dict[int, list[np.ndarray]], spec: m.DayRoundSpec | None
) -> list[np.ndarray]:
    """ROUNDS rounds of the employee-day mechanism (``spec=None``: no clip, no noise, all days)."""
    weights = initial_weights(ModelConfig(), seed=0)
    shapes = [w.shape for w in weights]
    for rnd in range(ROUNDS):
        total = None
        for seed, days in population.items():
            # The same streams whether or not the target takes part, so the two
            # federations differ only by the target's data.
            rng = CryptoRandom.from_seed(seed * 1000 + rnd, "exposure")
            if spec is None:
                chosen = list(range(len(days)))
            else:
                chosen = [int(d) for d in m.sample_days(
                    [str(i) for i in range(len(days))], spec.day_sample_rate, rng)]
            updates = [_local_update(weights, days[d], seed * 10 + d) for d in chosen]
            if spec is None:
                share = [sum(u[i] for u in updates) if updates else np.zeros(s)
                         for i, s in enumerate(shapes)]
                total = (
                    share if total is None
                    else [a + b for a, b in zip(total, share, strict=True)]
                )
                continue
            summed = m.clip_and_sum(updates, spec.update_clip, shapes)
            vec = parameters_mod(
                factor_combine(ENCODING.quantization_range, m.encode(summed, spec, ENCODING, rng)),
                MODULUS,
            )
            total = (
                vec if total is None
                else parameters_mod(parameters_addition(total, vec), MODULUS)
            )
        assert total is not None
        n = len(population)
        if spec is None:
            mean = [t / n for t in total]
        else:
            q_total, recon = factor_extract(total)
            mean = [
                (d - (n - 1) * ENCODING.clipping_range) * (ENCODING.quantization_range / q_total)
                for d in dequantize(recon, ENCODING.clipping_range, ENCODING.quantization_range)
            ]
        weights = [(w + u).astype(w.dtype) for w, u in zip(weights, mean, strict=True)]
    return weights


def _exposures(weights: Sequence[np.ndarray]) -> np.ndarray:
    """Each canary's exposure among CANDIDATES random sequences of its length."""
    model = NextEventModel(ModelConfig())
    set_weights(model, weights)
    model.eval()
    rng = np.random.default_rng(7)
    context = rng.integers(0, VOCAB_SIZE, size=WINDOW)
    exposures = []
    for canary in _canaries():
        others = rng.integers(0, VOCAB_SIZE, size=(CANDIDATES, CANARY_LENGTH))
        sequences = np.vstack([canary, others])
        full = np.hstack([np.tile(context, (len(sequences), 1)), sequences])
        log_p = np.zeros(len(sequences))
        with torch.no_grad():
            for j in range(CANARY_LENGTH):
                start = j  # the WINDOW tokens right before position WINDOW + j
                inputs = torch.from_numpy(full[:, start:start + WINDOW])
                logits = model(inputs)
                log_probs = torch.log_softmax(logits, dim=-1).numpy()
                log_p += log_probs[np.arange(len(sequences)), sequences[:, j]]
        rank = 1 + int(np.sum(log_p[1:] > log_p[0]))
        exposures.append(math.log2(len(sequences)) - math.log2(rank))
    return np.array(exposures)


Population = dict[int, list[np.ndarray]]


@pytest.fixture(scope="module")
def populations() -> tuple[Population, Population]:
    torch.manual_seed(0)
    return _days(with_target=True), _days(with_target=False)


def test_the_check_sees_memorisation_without_privacy(
    populations: tuple[Population, Population],
) -> None:
    with_target, without = populations
    seen = _exposures(_federate(with_target, None)).mean()
    unseen = _exposures(_federate(without, None)).mean()
    print(f"no privacy: mean exposure {seen:.2f} bits with the employee, {unseen:.2f} without")
    assert seen - unseen >= 2.5


def test_the_default_mechanism_exposes_no_canary(
    populations: tuple[Population, Population],
) -> None:
    from keystay.server.settings import RunSettings

    spec = m.DayRoundSpec(
        noise_multiplier=float(RunSettings.noise_multiplier),
        update_clip=float(getattr(RunSettings, "update_clip", 0.5)),
        day_sample_rate=float(getattr(RunSettings, "day_sample_rate", 0.5)),
        min_summed_devices=3,
    )
    with_target, without = populations
    seen = _exposures(_federate(with_target, spec)).mean()
    unseen = _exposures(_federate(without, spec)).mean()
    print(f"default mechanism: mean exposure {seen:.2f} bits with the employee, "
          f"{unseen:.2f} without")
    assert seen - unseen <= 0.75
