"""What the warm trainer process saves: a typical round, warm versus cold.

A typical round: 3,000 random training windows, expected batch 64, 50 DP-SGD steps
on the product model. *Cold* is a fresh interpreter that imports torch and
Opacus and then trains (what a round would cost if the daemon spawned a
trainer per round); *warm* is a round sent to an already running
:class:`~keystay.client.trainer.process.WarmTrainer` (pickling the job over
the pipe included). Also times the ledger's epsilon call in the warm process.

Prints figures only (no assertions)::

    .venv/bin/python bench/bench_warm_trainer.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time

import numpy as np

from keystay.client.ledger.accounting import Mechanism
from keystay.client.trainer.job import TrainJob
from keystay.client.trainer.process import WarmTrainer
from keystay.common.tokens import VOCAB_SIZE
from keystay.common.windows import WINDOW

N_TRAIN, N_HELDOUT, BATCH, STEPS = 3000, 300, 64, 50

COLD = f"""
import time
t0 = time.perf_counter()
import numpy as np
import opacus
from keystay.common.model import initial_weights
from keystay.client.trainer.dpsgd import train_dp
from keystay.client.trainer.job import TrainJob
imported = time.perf_counter() - t0
rng = np.random.default_rng(0)
windows = rng.integers(1, {VOCAB_SIZE}, size=({N_TRAIN + N_HELDOUT}, {WINDOW + 1}))
job = TrainJob(weights=initial_weights(seed=0), train=windows[:{N_TRAIN}],
               heldout=windows[{N_TRAIN}:], noise_multiplier=1.0, max_grad_norm=1.0,
               steps={STEPS}, batch_size={BATCH}, learning_rate=1e-3)
outcome = train_dp(job)
print(imported, outcome.seconds)
"""


def _weights() -> list[np.ndarray]:
    # Made in a throwaway interpreter so this process never imports torch.
    code = (
        "import sys, numpy as np; from keystay.common.model import initial_weights; "
        "np.savez(sys.stdout.buffer, *initial_weights(seed=0))"
    )
    raw = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    archive = np.load(io.BytesIO(raw))
    return [archive[k] for k in archive.files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind")
    args = parser.parse_args()
    print(f"round: {N_TRAIN:,} windows, batch {BATCH}, {STEPS} DP-SGD steps")

    cold = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", COLD], capture_output=True, text=True, check=True
        ).stdout.split()
        cold.append((time.perf_counter() - t0, float(out[0]), float(out[1])))
    for total, imported, trained in cold:
        print(
            f"cold: {total:5.2f} s wall "
            f"(torch + opacus + keystay imports {imported:.2f} s, train {trained:.2f} s)"
        )

    rng = np.random.default_rng(0)
    windows = rng.integers(1, VOCAB_SIZE, size=(N_TRAIN + N_HELDOUT, WINDOW + 1))
    job = TrainJob(
        weights=_weights(),
        train=windows[:N_TRAIN],
        heldout=windows[N_TRAIN:],
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        steps=STEPS,
        batch_size=BATCH,
        learning_rate=1e-3,
    )
    t0 = time.perf_counter()
    trainer = WarmTrainer()
    trainer.start()
    print(f"warm trainer start (imports + warm-up step): {time.perf_counter() - t0:.2f} s")
    try:
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            outcome = trainer.train(job)
            total = time.perf_counter() - t0
            print(f"warm: {total:5.2f} s round trip (train {outcome.seconds:.2f} s in the child)")
        history = [Mechanism(1.0, job.sample_rate, STEPS)] * 30
        t0 = time.perf_counter()
        trainer.epsilons(history, 1e-5)
        print(f"epsilons of 30 identical rounds: {time.perf_counter() - t0:.2f} s")
        varied = [Mechanism(1.0, job.sample_rate * (1 + i / 100), STEPS) for i in range(30)]
        t0 = time.perf_counter()
        trainer.epsilons(varied, 1e-5)
        print(f"epsilons of 30 rounds, all different q: {time.perf_counter() - t0:.2f} s (first)")
        t0 = time.perf_counter()
        trainer.epsilons(varied, 1e-5)
        print(f"  same again (RDP curves cached): {time.perf_counter() - t0:.2f} s")
    finally:
        trainer.close()
    print("torch imported in this (daemon-like) process:", "torch" in sys.modules)


if __name__ == "__main__":
    main()
