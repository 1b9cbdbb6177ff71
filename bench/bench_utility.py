"""The utility table: held-out next-event accuracy at a given ε per employee-day.

For the ML team and security: after a fixed number of rounds, the accuracy
of the shared model on simulated employees that never train (the server's
own held-out population, :mod:`keystay.server.heldout`), for

* N ∈ {10, 100, 1,000} devices and ε per employee-day ∈ {1, 2, 4, 8}
  against an honest-but-curious server, under the device's default
  mechanism (employee-day, t = 3, day sampling q and clip C of the run
  defaults); σ is solved from the target ε over the run's rounds with the
  ledger's own accountant (:func:`keystay.client.ledger.accounting.epsilons`,
  the enforced ``min(RDP, PLD)``, δ of the policy), and the ε against a
  server that breaks aggregation (σ/√t) is printed beside it;
* the same N and ε under the record-level mechanism (``--units``; the
  opt-in ``privacy-unit = "record"``): each device runs the trainer's own
  DP-SGD (:func:`train_dp`: Poisson rate q, clip C, σ) on the windows of
  its days, the server takes the plain mean of the updates (no SecAgg+ is
  needed: the noise is the device's own, so the ε is the same against a
  server that breaks aggregation). ε is then *per record per day*: every
  day is trained every round, so σ is solved from the target over the run's
  ``rounds × steps`` charges of ``(σ, q)`` with the same accountant. q,
  steps, C and the learning rate are the record-level run defaults, tuned by
  ``bench/bench_tuning.py`` on other simulated employees;
* non-private FedAvg at the same N (every day every round, no clip, no noise);
* a model trained centrally on the union of the same employees' days.

**How it runs.** The federation runs in one process so that it finishes on a
laptop: no Flower, no SecAgg+ protocol, no ledger file. Each device step is
the device's own mechanism code (:mod:`keystay.client.employee_day.mechanism`):
days sampled with :func:`sample_days` from a :class:`CryptoRandom`, each
sampled day trained separately from the global weights by the trainer's
own :func:`train_nondp`, :func:`clip_and_sum`, :func:`encode` with the
device's discrete Gaussian share σC/√t; the shares are added modulo 2^40 and
decoded as Flower's SecAgg+ workflow decodes them (factor, offset, mean).
``keystay sim`` runs the same maths through the real protocol; this is the
compact version of ``tests/adversarial/test_exposure.py``.

**Honest tuning.** The learning rate and the clip C are chosen on a tuning
company (employee seeds of company ``--tune-company``, disjoint from the
reported company and from the held-out seeds) at N = 100 and ε = 4, by
held-out accuracy; the table is then reported on company ``--company``.
Tuning spends ε only of simulated tuning employees: the script prints how
much (configurations × the ε each run charges its days), and no real
person's budget.

    python bench/bench_utility.py --sizes 10,100 --epsilons 1,2,4,8
    python bench/bench_utility.py --sizes 1000 --epsilons 4 --no-tune --lr 0.05 --clip 0.5
    python bench/bench_utility.py --sizes 10,100 --units record --no-tune --lr 0.02 --clip 0.5

Goal (issue 11): at 1,000 devices and ε ≤ 4 per employee-day, accuracy at
least 90 % of non-private FedAvg at the same N.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
)
from flwr.common.secure_aggregation.quantization import dequantize

from keystay.client.employee_day import mechanism as m
from keystay.client.ledger.accounting import Mechanism, enforced, epsilons
from keystay.client.policy import DevicePolicy
from keystay.client.trainer.csprng import CryptoRandom
from keystay.client.trainer.dpsgd import train_dp, train_nondp
from keystay.client.trainer.job import TrainJob
from keystay.common.model import ModelConfig, initial_weights
from keystay.common.windows import TRAIN_STRIDE, WINDOW, make_windows
from keystay.server.heldout import HeldoutEvaluator, HeldoutPopulation
from keystay.server.secagg import CLIPPING_RANGE, MODULUS_RANGE, QUANTIZATION_RANGE
from keystay.server.settings import RUN_DEFAULTS
from keystay.sim.employees import SimulatedEmployee, day_volumes, roster

ENCODING = m.Encoding(CLIPPING_RANGE, QUANTIZATION_RANGE)
POLICY = DevicePolicy()
END_DAY = date(2026, 3, 6)


@dataclass(frozen=True)
class Setup:
    rounds: int
    days: int
    local_steps: int
    batch: int
    lr: float
    clip: float
    day_rate: float
    t: int
    #: The server's step: the new global model is w + server_lr × the decoded
    #: mean (post-processing of the DP sum: no ε).
    server_lr: float = 1.0


def company(devices: int, company_seed: int, days: int) -> list[list[np.ndarray]]:
    """Each employee's eligible days as training windows (thin days dropped, as the policy)."""
    out = []
    for seed, role in roster(devices, company_seed):
        employee = SimulatedEmployee(seed, role)
        windows = []
        for i, events in enumerate(day_volumes(seed, role, days)):
            if events <= WINDOW + 1:
                continue
            day = END_DAY - timedelta(days=days - 1 - i)
            tokens = np.array([r.token for r in employee.day_records(day, events)])
            w = make_windows(tokens, WINDOW, stride=TRAIN_STRIDE)
            if len(w) >= POLICY.min_block_windows:
                windows.append(w)
        out.append(windows)
    return out


def sigma_for(target: float, setup: Setup, dim: int) -> tuple[float, float, float]:
    """σ whose R rounds charge a day ``target`` ε (honest server); (σ, ε honest, ε broken)."""

    def eps(sigma: float, over: float = 1.0) -> float:
        spec = m.DayRoundSpec(sigma, setup.clip, setup.day_rate, setup.t)
        eff = m.effective_noise_multiplier(spec, ENCODING, dim) / over
        history = (Mechanism(eff, setup.day_rate, setup.rounds),)
        return enforced(epsilons(history, delta=POLICY.delta))

    lo, hi = 0.05, 200.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi, eps(hi), eps(hi, math.sqrt(setup.t))


def delta(new: list[np.ndarray], old: list[np.ndarray]) -> list[np.ndarray]:
    """A device's update, ``new - old`` per layer, in float64 (as the devices sum it)."""
    return [np.asarray(n, np.float64) - np.asarray(o, np.float64)
            for n, o in zip(new, old, strict=True)]


def sigma_for_record(target: float, rounds: int) -> tuple[float, float]:
    """σ whose ``rounds`` DP-SGD charges of the record defaults cost a day ``target`` ε; (σ, ε).

    Not below the device's floor (:attr:`DevicePolicy.noise_multiplier_min`):
    a device refuses less noise, so a larger target then charges less.
    """

    def eps(sigma: float) -> float:
        history = (Mechanism(sigma, RUN_DEFAULTS.sample_rate, RUN_DEFAULTS.local_steps * rounds),)
        return enforced(epsilons(history, delta=POLICY.delta))

    lo, hi = POLICY.noise_multiplier_min, 200.0
    if eps(lo) <= target:
        return lo, eps(lo)
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
    return hi, eps(hi)


def record_update(weights: list[np.ndarray], days: list[np.ndarray], sigma: float,
                  rnd: int, k: int) -> list[np.ndarray]:
    """One device's record-level round: DP-SGD on every day's windows, its weight delta."""
    windows = np.concatenate(days)
    job = TrainJob(weights=weights, train=windows, heldout=windows[:0],
                   noise_multiplier=sigma, max_grad_norm=RUN_DEFAULTS.max_grad_norm,
                   steps=RUN_DEFAULTS.local_steps,
                   batch_size=max(1, round(RUN_DEFAULTS.sample_rate * len(windows))),
                   poisson_rate=RUN_DEFAULTS.sample_rate,
                   learning_rate=RUN_DEFAULTS.learning_rate, seed=rnd * 10**5 + k)
    return delta(train_dp(job).weights, weights)


def federate_record(people: list[list[np.ndarray]], rounds: int, sigma: float,
                    evaluator: HeldoutEvaluator, pool: Executor | None = None) -> float:
    """Held-out accuracy after ``rounds`` record-level rounds (the plain mean of updates)."""
    weights = initial_weights(ModelConfig(), seed=0)
    active = [(k, days) for k, days in enumerate(people) if days]
    for rnd in range(rounds):
        args = [(weights, days, sigma, rnd, k) for k, days in active]
        updates = (pool.map(record_update, *zip(*args, strict=True), chunksize=8)
                   if pool is not None else (record_update(*a) for a in args))
        total = [np.zeros(w.shape) for w in weights]
        for update in updates:
            total = [a + b for a, b in zip(total, update, strict=True)]
        weights = [(w + t / len(active)).astype(w.dtype)
                   for w, t in zip(weights, total, strict=True)]
    return evaluator.score(weights).accuracy


def local_update(weights: list[np.ndarray], windows: np.ndarray, setup: Setup,
                 seed: int) -> list[np.ndarray]:
    job = TrainJob(weights=weights, train=windows, heldout=windows[:0], noise_multiplier=1.0,
                   max_grad_norm=1.0, steps=setup.local_steps, batch_size=setup.batch,
                   poisson_rate=None, learning_rate=setup.lr, seed=seed)
    return delta(train_nondp(job).weights, weights)


def device_share(weights: list[np.ndarray], days: list[np.ndarray], setup: Setup,
                 sigma: float | None, stream: int, rnd: int, k: int) -> list[np.ndarray]:
    """One device's round: its masked-to-be integer share (or, non-private, its raw sum)."""
    shapes = [w.shape for w in weights]
    rng = CryptoRandom.from_seed(stream * 10**7 + rnd * 10**4 + k, "utility")
    names = [str(i) for i in range(len(days))]
    chosen = names if sigma is None else m.sample_days(names, setup.day_rate, rng)
    updates = [local_update(weights, days[int(d)], setup, rnd * 10**5 + k * 10 + int(d))
               for d in chosen]
    if sigma is None:
        return [sum((u[i] for u in updates), np.zeros(s)) for i, s in enumerate(shapes)]
    spec = m.DayRoundSpec(sigma, setup.clip, setup.day_rate, setup.t)
    summed = m.clip_and_sum(updates, setup.clip, shapes)
    return parameters_mod(factor_combine(ENCODING.quantization_range,
                                         m.encode(summed, spec, ENCODING, rng)), MODULUS_RANGE)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def federate(people: list[list[np.ndarray]], setup: Setup, sigma: float | None,
             evaluator: HeldoutEvaluator, stream: int, pool: Executor | None = None) -> float:
    """Held-out accuracy after ``setup.rounds`` rounds (``sigma=None``: non-private FedAvg)."""
    weights = initial_weights(ModelConfig(), seed=0)
    n = len(people)
    for rnd in range(setup.rounds):
        args = [(weights, days, setup, sigma, stream, rnd, k) for k, days in enumerate(people)]
        shares = (pool.map(device_share, *zip(*args, strict=True), chunksize=8) if pool is not None
                  else (device_share(*a) for a in args))
        total: list[np.ndarray] | None = None
        for share in shares:
            if total is None:
                total = share
            elif sigma is None:
                total = [a + b for a, b in zip(total, share, strict=True)]
            else:
                total = parameters_mod(parameters_addition(total, share), MODULUS_RANGE)
        assert total is not None
        if sigma is None:
            mean = [t / n for t in total]
        else:  # as Flower's SecAgg+ workflow decodes the sum
            q_total, recon = factor_extract(total)
            mean = [(d - (n - 1) * ENCODING.clipping_range) * (ENCODING.quantization_range
                                                               / q_total)
                    for d in dequantize(recon, ENCODING.clipping_range,
                                        ENCODING.quantization_range)]
        step = 1.0 if sigma is None else setup.server_lr
        weights = [(w + step * u).astype(w.dtype) for w, u in zip(weights, mean, strict=True)]
    return evaluator.score(weights).accuracy


def central(people: list[list[np.ndarray]], setup: Setup, evaluator: HeldoutEvaluator) -> float:
    """One model trained on the union of every day (as many steps as a device sees, ×4 batch)."""
    union = np.concatenate([d for days in people for d in days])
    job = TrainJob(weights=initial_weights(ModelConfig(), seed=0), train=union,
                   heldout=union[:0], noise_multiplier=1.0, max_grad_norm=1.0,
                   steps=setup.rounds * setup.local_steps * 4, batch_size=64,
                   poisson_rate=None, learning_rate=setup.lr, seed=1)
    return evaluator.score(train_nondp(job).weights).accuracy


def parse_list(text: str, kind: type) -> list:  # type: ignore[type-arg]
    return [kind(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--epsilons", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="skip tuning's lr choice")
    parser.add_argument("--clip", type=float, default=None, help="skip tuning's C choice")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--tune-lrs", default="0.005,0.02,0.05")
    parser.add_argument("--tune-clips", default="0.5,1.0")
    parser.add_argument("--company", type=int, default=0)
    parser.add_argument("--tune-company", type=int, default=1)
    parser.add_argument("--heldout-employees", type=int, default=6)
    parser.add_argument("--units", default="employee-day,record",
                        help="mechanisms to tabulate: employee-day (the default unit), record")
    parser.add_argument("--no-central", action="store_true")
    parser.add_argument("--no-nonprivate", action="store_true")
    parser.add_argument("--workers", type=int, default=2, help="device processes")
    parser.add_argument("--server-lr", type=float, default=1.0,
                        help="employee-day: the server's step, w + server-lr × the decoded "
                        "mean (post-processing: no ε; the ServerApp's step is 1)")
    parser.add_argument("--t", type=int, default=POLICY.min_summed_devices,
                        help="the devices' min_summed_devices (policy default 3); each adds "
                        "noise σC/√t, so a sum of N devices carries σC·√(N/t)")
    args = parser.parse_args(argv)
    units = parse_list(args.units, str)
    if not set(units) <= {"employee-day", "record"}:
        parser.error(f"--units: employee-day and/or record, not {args.units!r}")
    pool = ProcessPoolExecutor(args.workers, initializer=_init_worker) if args.workers > 1 else None

    base = Setup(rounds=args.rounds, days=args.days, local_steps=args.local_steps,
                 batch=args.batch, lr=args.lr or RUN_DEFAULTS.learning_rate,
                 clip=args.clip or RUN_DEFAULTS.update_clip,
                 day_rate=RUN_DEFAULTS.day_sample_rate, t=args.t, server_lr=args.server_lr)
    dim = sum(int(w.size) for w in initial_weights(ModelConfig(), seed=0))
    evaluator = HeldoutEvaluator(HeldoutPopulation(employees=args.heldout_employees),
                                 ModelConfig())
    print(f"rounds {base.rounds}, {base.days} days per employee, day rate q {base.day_rate}, "
          f"t {base.t}, {base.local_steps} local steps of batch {base.batch}; held-out: "
          f"{args.heldout_employees} employees that never train", flush=True)

    if not args.no_tune:
        tune_people = company(100, args.tune_company, base.days)
        grid = [(lr, c) for lr in ([args.lr] if args.lr else parse_list(args.tune_lrs, float))
                for c in ([args.clip] if args.clip else parse_list(args.tune_clips, float))]
        scores = []
        for lr, c in grid:
            setup = Setup(**{**base.__dict__, "lr": lr, "clip": c})
            sigma, eps_h, _ = sigma_for(4.0, setup, dim)
            acc = federate(tune_people, setup, sigma, evaluator, stream=99, pool=pool)
            scores.append((acc, lr, c))
            print(f"  tune lr {lr} C {c}: σ {sigma:.3f} → held-out acc {acc:.4f}", flush=True)
        acc, lr, c = max(scores)
        base = Setup(**{**base.__dict__, "lr": lr, "clip": c})
        print(f"tuning: {len(grid)} runs at N = 100, ε 4 per day each, on company "
              f"{args.tune_company}'s simulated employees ({100 * len(grid)} simulated "
              f"employee-runs, each of their days charged ε ≤ 4 once per run); budget of real "
              f"people spent: none. Chosen lr {lr}, C {c}.", flush=True)

    header = (f"{'N':>5} {'unit':>12} {'ε/day honest':>12} {'ε/day broken':>12} {'σ':>7} "
              f"{'accuracy':>9} {'vs FedAvg':>9} {'seconds':>8}")
    rows = []
    for n in parse_list(args.sizes, int):
        started = time.monotonic()
        people = company(n, args.company, base.days)
        print(f"N = {n}: {sum(len(d) for d in people)} eligible days "
              f"({time.monotonic() - started:.0f} s to generate)", flush=True)
        nonprivate = None
        if not args.no_nonprivate:
            t0 = time.monotonic()
            nonprivate = federate(people, base, None, evaluator, stream=n, pool=pool)
            rows.append(f"{n:>5} {'none':>12} {'∞ (FedAvg)':>12} {'∞':>12} {'-':>7} "
                        f"{nonprivate:>9.4f} "
                        f"{1.0:>9.2f} {time.monotonic() - t0:>8.0f}")
            print(rows[-1], flush=True)
        for unit, target in ((u, e) for u in units for e in parse_list(args.epsilons, float)):
            t0 = time.monotonic()
            if unit == "employee-day":
                sigma, eps_h, eps_b = sigma_for(target, base, dim)
                acc = federate(people, base, sigma, evaluator, stream=n, pool=pool)
            else:  # the device's own noise: a broken aggregation learns no more
                sigma, eps_h = sigma_for_record(target, base.rounds)
                eps_b = eps_h
                acc = federate_record(people, base.rounds, sigma, evaluator, pool=pool)
            ratio = f"{acc / nonprivate:>9.2f}" if nonprivate else f"{'-':>9}"
            # A σ above the default policy's ceiling is a request a default
            # device refuses: the row is what a laxer policy would buy.
            refused = "*" if sigma > POLICY.noise_multiplier_max else ""
            rows.append(f"{n:>5} {unit + refused:>12} {eps_h:>12.2f} {eps_b:>12.2f} "
                        f"{sigma:>7.3f} {acc:>9.4f} {ratio} {time.monotonic() - t0:>8.0f}")
            print(rows[-1], flush=True)
        if not args.no_central:
            t0 = time.monotonic()
            acc = central(people, base, evaluator)
            ratio = f"{acc / nonprivate:>9.2f}" if nonprivate else f"{'-':>9}"
            rows.append(f"{n:>5} {'none':>12} {'central':>12} {'(union)':>12} {'-':>7} "
                        f"{acc:>9.4f} "
                        f"{ratio} {time.monotonic() - t0:>8.0f}")
            print(rows[-1], flush=True)
    print()
    print(f"employee-day: lr {base.lr}, C {base.clip}, q {base.day_rate}, t {base.t}, "
          f"server step {base.server_lr}; "
          f"record: lr {RUN_DEFAULTS.learning_rate}, C {RUN_DEFAULTS.max_grad_norm}, "
          f"q {RUN_DEFAULTS.sample_rate}, {RUN_DEFAULTS.local_steps} steps (ε per record "
          f"per day); {base.rounds} rounds")
    print(header)
    print("\n".join(rows))
    print(f"* σ above the default policy's noise_multiplier_max ({POLICY.noise_multiplier_max:g}):"
          " a default device refuses the request")
    print("goal: at N = 1,000 and ε ≤ 4 per employee-day, accuracy ≥ 0.90 × non-private FedAvg")


if __name__ == "__main__":
    sys.exit(main())
