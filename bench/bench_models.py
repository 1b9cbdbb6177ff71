"""Next-event model architectures on a privacy-utility-speed table.

Trains each architecture on the same simulated employee's data (written to an
encrypted store by ``keystay.sim.employees.fill_store`` and read
back as the daemon reads it), with the same training loop
(``keystay.client.trainer.dpsgd``), hyperparameters and number of epochs, one
after the other in one process, so the speed ratios are measured side by side:

(a) the window conv model (``NextEventModel``, the product's model) under DP-SGD
(b) the same model without DP (shuffled batches, no clipping, no noise)
(c) the MLP-over-the-window variant (``ModelConfig(arch="mlp")``) under DP-SGD
(d) a GRU built from ``opacus.layers.DPGRU`` under DP-SGD (its cells are
    ``nn.Linear`` layers called once per position, which the clipper supports)
plus the non-DP runs of (c) and (d) (``nn.GRU``), so every DP row has its own
non-private baseline.

Columns: CPU seconds per epoch of the training thread (training steps,
including per-example clipping by book-keeping and the noise, and the
held-out evaluation; one epoch = ``1/q`` steps), its ratio to the
same architecture without DP and to (b), top-1 held-out accuracy and loss on
the tail of each day (never trained on), and the epsilon spent (delta 1e-5,
the enforced bound ``min(RDP, PRV upper)``; non-DP rows spend infinity).

Prints figures only, no assertions. About three minutes on two busy cores::

    .venv/bin/python bench/bench_models.py [--epochs 2] [--days 3] [--events 8000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
from opacus.layers import DPGRU
from torch import nn

from keystay.client.ledger.accounting import Mechanism, enforced, epsilons
from keystay.client.store import EventStore
from keystay.client.trainer.dpsgd import TRAIN_THREADS, TrainJob, train_dp, train_nondp
from keystay.client.trainer.job import sample_rate_for
from keystay.common.model import ModelConfig, NextEventModel, get_weights
from keystay.common.tokens import VOCAB_SIZE
from keystay.common.windows import WINDOW, windows_for_blocks
from keystay.sim.employees import fill_store

DELTA = 1e-5


class GRUModel(nn.Module):
    """Embedding -> one-layer GRU -> LayerNorm -> Linear, on the last step's output.

    With ``dp=True`` the GRU is Opacus's ``DPGRU`` (the same maths built from
    ``RNNLinear`` cells, so per-sample gradients can be computed); otherwise
    torch's fused ``nn.GRU``.
    """

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 64, *, dp: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        gru = DPGRU if dp else nn.GRU
        self.rnn: nn.Module = gru(embed, hidden, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(self.norm(out[:, -1]))


@dataclass
class Row:
    name: str
    dp: bool
    params: int
    seconds_per_epoch: float
    accuracy: float
    loss: float
    epsilon: float


def _data(days: int, events: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        store = EventStore.open(Path(tmp))
        try:
            fill_store(store, seed=seed, days=days, events_per_day=events, end_day=date(2026, 3, 6))
            blocks = [store.block_tokens(b.block) for b in store.blocks()]
        finally:
            store.close()
    return windows_for_blocks(blocks, WINDOW, 0.1)


def _module(name: str, dp: bool) -> nn.Module:
    torch.manual_seed(0)
    if name == "conv":
        return NextEventModel(ModelConfig())
    if name == "mlp":
        return NextEventModel(ModelConfig(arch="mlp"))
    return GRUModel(VOCAB_SIZE, dp=dp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=3, help="employee-day blocks")
    parser.add_argument("--events", type=int, default=8000, help="token records per day")
    parser.add_argument("--epochs", type=float, default=2.0, help="passes over the data")
    parser.add_argument("--batch", type=int, default=128, help="expected batch size")
    parser.add_argument("--sigma", type=float, default=1.0, help="noise multiplier")
    parser.add_argument("--clip", type=float, default=1.0, help="per-sample clip norm")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=7, help="simulated employee")
    parser.add_argument(
        "--only", default="conv,mlp,gru", help="comma-separated architectures to run"
    )
    args = parser.parse_args()

    train, heldout = _data(args.days, args.events, args.seed)
    q = sample_rate_for(len(train), args.batch)
    steps_per_epoch = math.ceil(1 / q)
    steps = max(1, round(args.epochs * steps_per_epoch))
    eps = enforced(epsilons([Mechanism(args.sigma, q, steps)], delta=DELTA))
    print(
        f"data: {args.days} days x {args.events} tokens of simulated employee {args.seed} -> "
        f"{len(train):,} train / {len(heldout):,} held-out windows of {WINDOW}+1; "
        f"vocab {VOCAB_SIZE}"
    )
    print(
        f"training: batch {args.batch} (q = {q:.4f}), {steps} steps = {args.epochs:g} epochs, "
        f"Adam lr {args.lr:g}, sigma {args.sigma:g}, clip {args.clip:g}; "
        f"torch threads {TRAIN_THREADS}"
    )

    # Majority-class baseline: what "learned nothing" scores.
    counts = np.bincount(train[:, -1], minlength=VOCAB_SIZE)
    majority = float(np.mean(heldout[:, -1] == counts.argmax()))

    rows: list[Row] = []
    for name in args.only.split(","):
        for dp in (True, False):
            module = _module(name, dp)
            job = TrainJob(
                weights=get_weights(module),
                train=train,
                heldout=heldout,
                noise_multiplier=args.sigma,
                max_grad_norm=args.clip,
                steps=steps,
                batch_size=args.batch,
                learning_rate=args.lr,
                seed=1,
            )
            # CPU time of this thread (torch runs TRAIN_THREADS = 1 intra-op thread by
            # default): on a shared machine wall time also counts other processes.
            cpu = time.thread_time()
            outcome = (train_dp if dp else train_nondp)(job, module=module)
            cpu = time.thread_time() - cpu
            rows.append(
                Row(
                    name=name,
                    dp=dp,
                    params=sum(p.numel() for p in module.parameters()),
                    seconds_per_epoch=cpu / args.epochs,
                    accuracy=outcome.heldout_accuracy,
                    loss=outcome.heldout_loss,
                    epsilon=eps if dp else math.inf,
                )
            )
            print(
                f"  done {name} {'DP' if dp else 'non-DP'}: {outcome.seconds:.1f} s wall, "
                f"{cpu:.1f} s CPU",
                flush=True,
            )

    base = {r.name: r.seconds_per_epoch for r in rows if not r.dp}
    reference = base.get("conv", float("nan"))
    labels = {"conv": "window conv", "mlp": "window MLP", "gru": "GRU (DPGRU)"}
    print()
    print(
        f"{'model':<14}{'DP':<7}{'params':>8}{'s/epoch':>9}{'x own':>7}{'x conv':>8}"
        f"{'acc':>7}{'loss':>7}{'eps':>7}"
    )
    for r in rows:
        label = labels[r.name] if r.dp or r.name != "gru" else "GRU (nn.GRU)"
        print(
            f"{label:<14}{('yes' if r.dp else 'no'):<7}{r.params:>8,}"
            f"{r.seconds_per_epoch:>9.1f}{r.seconds_per_epoch / base[r.name]:>7.2f}"
            f"{r.seconds_per_epoch / reference:>8.2f}{r.accuracy:>7.3f}{r.loss:>7.3f}"
            f"{r.epsilon:>7.2f}"
        )
    print(f"majority-class baseline accuracy: {majority:.3f}; eps at delta = {DELTA:g}")


if __name__ == "__main__":
    main()
