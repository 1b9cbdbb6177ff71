"""What DP-SGD costs over non-private training, per batch size and method, side by side.

For the shipped model (``NextEventModel(ModelConfig())``) on a simulated
employee's windows, at each expected batch size, times the same number of
optimizer steps of

``non-DP``
    ``train_nondp``: shuffled batches of exactly ``B``, mean loss, one backward.
``keystay DP``
    ``train_dp``: Poisson sampling and Gaussian noise from ChaCha20, per-example
    clipping by book-keeping (``keystay.client.trainer.clipping``).
``Opacus hooks``
    the reference: Opacus's ``GradSampleModule`` per-sample gradients, clipped
    and summed by hand, with the same sampler and noise.

with torch's intra-op threads set as the warm trainer sets them
(``TRAIN_THREADS``, one by default), held-out evaluation left out. The machine
is shared, so methods are interleaved (A B C A B C ...) and each figure is the
median over repeats of the CPU seconds per step of the calling thread (with one
torch thread, all of the training's work; wall time also counts other
processes' time slices, so it is printed beside it but not used for the
verdict). The ratio is to ``non-DP`` at the same batch size; the goal (DP at
most 1.5x non-private, moonshot 1.1x) is printed beside it.

Prints figures only, no assertions. About two minutes on two busy cores::

    .venv/bin/python bench/bench_dpsgd.py [--batches 64,128,256] [--steps 10] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule
from torch.nn import functional

from keystay.client.store import EventStore
from keystay.client.trainer.csprng import CryptoRandom
from keystay.client.trainer.dpsgd import TRAIN_THREADS, train_dp, train_nondp
from keystay.client.trainer.job import TrainJob
from keystay.common.model import ModelConfig, NextEventModel, initial_weights, set_weights
from keystay.common.windows import WINDOW, windows_for_blocks
from keystay.sim.employees import fill_store

GOAL = 1.5
MOONSHOT = 1.1


def _windows(days: int, events: int, seed: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        store = EventStore.open(Path(tmp))
        try:
            fill_store(store, seed=seed, days=days, events_per_day=events, end_day=date(2026, 3, 6))
            blocks = [store.block_tokens(b.block) for b in store.blocks()]
        finally:
            store.close()
    train, _ = windows_for_blocks(blocks, WINDOW, 0.1)
    return train


def train_opacus(job: TrainJob) -> None:
    """The reference: Opacus per-sample gradients, clipped, summed and noised by hand.

    Same Poisson sampler and noise generator as ``train_dp``.
    """
    torch.set_num_threads(TRAIN_THREADS)
    model = NextEventModel(job.config)
    set_weights(model, job.weights)
    sampled = GradSampleModule(model, loss_reduction="sum")
    optimizer = torch.optim.Adam(model.parameters(), lr=job.learning_rate)
    sampler, noise = CryptoRandom.pair(job.seed)
    data = torch.from_numpy(np.ascontiguousarray(job.train, dtype=np.int64))
    n = data.shape[0]
    q = job.sample_rate
    params = list(model.parameters())
    for _ in range(job.steps):
        batch = data[torch.from_numpy(np.flatnonzero(sampler.bernoulli(n, q)))]
        optimizer.zero_grad(set_to_none=True)
        if len(batch):
            loss = functional.cross_entropy(sampled(batch[:, :-1]), batch[:, -1], reduction="sum")
            loss.backward()
            per_sample = [p.grad_sample.flatten(1) for p in params]  # type: ignore[union-attr]
            norms = torch.cat(per_sample, 1).norm(dim=1)
            factor = (job.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            sums = [factor @ g for g in per_sample]
            for p in params:
                p.grad_sample = None  # type: ignore[attr-defined]
        else:
            sums = [torch.zeros(p.numel()) for p in params]
        for p, total in zip(params, sums, strict=True):
            z = torch.from_numpy(noise.normal(p.numel())).to(p.dtype)
            p.grad = ((total + job.noise_multiplier * job.max_grad_norm * z) / (q * n)).view_as(p)
        optimizer.step()
    sampled._close()


def _timed(run: Callable[[TrainJob], object], job: TrainJob) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one run."""
    cpu, wall = time.thread_time(), time.perf_counter()
    run(job)
    return time.thread_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,128,256", help="expected batch sizes")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved runs per method")
    parser.add_argument("--days", type=int, default=3, help="simulated employee-days")
    parser.add_argument("--events", type=int, default=8000, help="token records per day")
    parser.add_argument("--no-opacus", action="store_true", help="skip the Opacus reference")
    args = parser.parse_args()

    torch.set_num_threads(TRAIN_THREADS)
    train = _windows(args.days, args.events, seed=7)
    config = ModelConfig()
    weights = initial_weights(config, seed=0)
    params = sum(w.size for w in weights)
    print(
        f"model: NextEventModel(ModelConfig()) {params:,} parameters; {len(train):,} windows; "
        f"torch threads {TRAIN_THREADS} (as the warm trainer); {args.steps} steps x "
        f"{args.repeats} interleaved repeats, medians per step"
    )

    methods: dict[str, Callable[[TrainJob], object]] = {
        "non-DP": train_nondp,
        "keystay DP": train_dp,
    }
    if not args.no_opacus:
        methods["Opacus hooks"] = train_opacus

    batches = [int(b) for b in args.batches.split(",")]
    table: dict[int, dict[str, tuple[float, float]]] = {}
    for batch in batches:
        job = TrainJob(
            weights=weights,
            train=train,
            heldout=train[:0],  # evaluation is not what is timed
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            steps=args.steps,
            batch_size=batch,
            learning_rate=1e-3,
            seed=1,
            config=config,
        )
        for run in methods.values():  # first-call costs (allocator, kernels) out of the way
            run(replace(job, steps=2))
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        wall: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, run in methods.items():
                seconds = _timed(run, job)
                cpu[name].append(seconds[0] / args.steps)
                wall[name].append(seconds[1] / args.steps)
        table[batch] = {
            name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in methods
        }
        print(f"  batch {batch} done", flush=True)

    print()
    print(
        f"{'batch':>6}  {'method':<14}{'CPU ms/step':>12}{'x non-DP':>10}"
        f"{'wall ms/step':>14}{'x (wall)':>10}  goal <= {GOAL}x (CPU)"
    )
    for batch, row in table.items():
        base_cpu, base_wall = row["non-DP"]
        for name, (cpu_s, wall_s) in row.items():
            ratio = cpu_s / base_cpu
            verdict = (
                ""
                if name == "non-DP"
                else ("moonshot" if ratio <= MOONSHOT else "met" if ratio <= GOAL else "MISSED")
            )
            print(
                f"{batch:>6}  {name:<14}{cpu_s * 1e3:>12.1f}{ratio:>10.2f}"
                f"{wall_s * 1e3:>14.1f}{wall_s / base_wall:>10.2f}  {verdict}"
            )


if __name__ == "__main__":
    main()
