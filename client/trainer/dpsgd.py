"""DP-SGD on the device's token windows: Poisson sampling, per-example clipping, Gaussian noise.

:func:`train_dp` is one federated round of local training: the model starts
from the job's weights, takes exactly ``job.steps`` DP-SGD steps, and returns
its new weights. Each step

1. samples a batch by Poisson sampling: every training window joins
   independently with probability ``q`` (:attr:`TrainJob.sample_rate`: the run's
   rate when the daemon asks, never derived from ``n``), so batch sizes vary
   around ``q * n`` and may be 0;
2. computes each window's gradient norm and the sum of the gradients each
   clipped to L2 norm ``C`` (``max_grad_norm``), by book-keeping
   (:mod:`keystay.client.trainer.clipping`: one forward, one backward);
3. adds Gaussian noise of std ``sigma * C`` (``noise_multiplier``) to every
   coordinate of that SUM, then divides by the *expected* batch size
   ``q * n`` (not the drawn one, whose size depends on the data), exactly as
   Opacus's ``DPOptimizer`` does; an empty batch still gets the noise;
4. lets the optimizer (Adam or SGD) post-process the noised gradient.

That is the Poisson-subsampled Gaussian mechanism ``(sigma, q, steps)`` the
ledger's accountants analyse (:mod:`keystay.client.ledger.accounting`); batches
are never drawn by shuffling, which the accountants do not cover. Accounting is
not done here: the device ledger composes every round's
:class:`~keystay.client.ledger.accounting.Mechanism`; this module only trains.

The batch draws and the noise come from ChaCha20 keyed with 256 bits of
``os.urandom`` (:mod:`keystay.client.trainer.csprng`), never from torch's
generator, which keeps only 32 bits of its seed (the noise of a round could be
found by trying every seed). Opacus is no longer on this path (its per-sample
hooks made a DP epoch cost 2.4-4x a non-private one; see
``bench/bench_dpsgd.py``); it stays the reference the clipping is tested
against. With book-keeping, a DP step of the shipped model costs about 1.35-1.4x
a non-private one at batch 64-256 on one thread, noise and sampling included.
So that per-step buffers are not page-faulted back from the kernel every step,
the trainer process keeps freed memory (:func:`_keep_freed_memory`).

Everything here runs in the warm trainer process
(:mod:`keystay.client.trainer.process`), never in the daemon.
"""

from __future__ import annotations

import collections
import ctypes
import os
import platform
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from keystay.client.trainer.clipping import PerExampleClipper
from keystay.client.trainer.csprng import CryptoRandom
from keystay.client.trainer.job import TrainJob, TrainOutcome
from keystay.common.model import ModelConfig, NextEventModel, evaluate, get_weights, set_weights

__all__ = ["TRAIN_THREADS", "TrainJob", "TrainOutcome", "train_dp", "train_nondp"]

#: Intra-op threads torch may use. One: the model is small enough that per-example
#: gradient kernels are dominated by per-op overhead, not arithmetic, so a second
#: thread buys little (measured in bench/bench_models.py), while the machine is an
#: employee's laptop whose recorder and applications must stay responsive.
TRAIN_THREADS = int(os.environ.get("KEYSTAY_TRAIN_THREADS", "1"))

# Losses of this many recent non-empty batches make up TrainOutcome.train_loss.
_LOSS_WINDOW = 10


_memory_kept = False


def _keep_freed_memory() -> None:
    """Stop glibc returning each step's large buffers to the OS (Linux only; once).

    A DP step allocates and frees tens of MB of per-example tensors. Blocks
    over glibc's mmap threshold are unmapped on free and page-faulted back
    (zeroed by the kernel) on the next step, which measured 20-40% of a step at
    batch 256. Raising the mmap threshold to 32 MiB and the trim threshold to
    256 MiB keeps those pages in the trainer process, which exists only to
    train; the daemon is another process and is unaffected.
    """
    global _memory_kept
    if _memory_kept or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    _memory_kept = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc after all; nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 256 * 2**20)


def _model(job: TrainJob, module: nn.Module | None) -> nn.Module:
    config = job.config if job.config is not None else ModelConfig()
    if job.train.shape[1] != config.window + 1:
        raise ValueError(
            f"train windows have {job.train.shape[1]} tokens but the model reads "
            f"{config.window} and predicts 1; make them with make_windows(tokens, "
            f"{config.window})"
        )
    for name, windows in (("train", job.train), ("heldout", job.heldout)):
        if windows.size and (windows.min() < 0 or windows.max() >= config.vocab_size):
            raise ValueError(
                f"{name} windows hold token ids outside [0, {config.vocab_size}); the data "
                "and the model use different vocabularies"
            )
    model = module if module is not None else NextEventModel(config)
    set_weights(model, job.weights)
    model.train()
    return model


def _windows(windows: np.ndarray) -> torch.Tensor:
    # One tensor indexed per step: a DataLoader over a TensorDataset would fetch and
    # collate window by window, which costs more than a small model's step.
    # Writable too: windows from a read-only buffer (the store's decoded pages)
    # are copied once rather than shared, which torch warns it cannot do safely.
    return torch.from_numpy(np.require(windows, np.int64, ["C_CONTIGUOUS", "WRITEABLE"]))


def _optimizer(job: TrainJob, model: nn.Module) -> torch.optim.Optimizer:
    if job.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=job.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=job.learning_rate, momentum=0.9)


def _mean_loss(recent: collections.deque[tuple[float, int]]) -> float:
    total = sum(n for _, n in recent)
    return sum(s for s, _ in recent) / total if total else float("nan")


def _outcome(
    job: TrainJob,
    trained: nn.Module,
    *,
    train_loss: float,
    empty: int,
    sample_rate: float,
    started: float,
    dp: bool,
) -> TrainOutcome:
    heldout_loss, accuracy = evaluate(trained, job.heldout)
    return TrainOutcome(
        weights=get_weights(trained),
        train_loss=train_loss,
        heldout_accuracy=accuracy,
        heldout_loss=heldout_loss,
        steps=job.steps,
        sample_rate=sample_rate,
        num_examples=int(job.train.shape[0]),
        seconds=time.perf_counter() - started,
        empty_batches=empty,
        noise_multiplier=job.noise_multiplier if dp else 0.0,
        dp=dp,
    )


def train_dp(job: TrainJob, *, module: nn.Module | None = None) -> TrainOutcome:
    """Train with DP-SGD: Poisson sampling, per-example clipping, Gaussian noise.

    Every step draws its batch with rate ``q = job.sample_rate`` (the run's
    rate when the daemon asks, else ``batch_size / n``; returned in the outcome,
    the rate the ledger charged) and noises the sum of
    clipped gradients with std ``noise_multiplier * max_grad_norm`` before
    dividing by ``q * n``; exactly ``job.steps`` steps, empty batches included.

    Parameters
    ----------
    job : TrainJob
        ``job.seed is None`` (the device) keys the sampling and noise generator
        from ``os.urandom``; an integer keys it reproducibly (tests, benchmarks).
    module : torch.nn.Module or None
        Train this module instead of ``NextEventModel(job.config)`` (for the
        architecture benchmark; it must take ``(batch, window)`` token ids,
        return logits, be built from the layers
        :mod:`~keystay.client.trainer.clipping` supports, and ``job.weights``
        must be its state). The device never passes one.

    Returns
    -------
    TrainOutcome
        With ``steps == job.steps`` and the sampling rate to charge.
    """
    started = time.perf_counter()
    torch.set_num_threads(TRAIN_THREADS)
    _keep_freed_memory()
    model = _model(job, module)
    clipper = PerExampleClipper(model)
    optimizer = _optimizer(job, model)
    sampler, noise = CryptoRandom.pair(job.seed)
    data = _windows(job.train)
    n = int(data.shape[0])
    sample_rate = job.sample_rate
    # Opacus's convention: the noised sum is divided by the expected batch size, a
    # public constant; dividing by the drawn size would make the scale data-dependent.
    expected_batch = sample_rate * n
    noise_std = job.noise_multiplier * job.max_grad_norm
    params = clipper.params
    sizes = [p.numel() for p in params]
    total_size = sum(sizes)
    dtype = params[0].dtype if params else torch.float32
    recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=_LOSS_WINDOW)
    empty = 0
    for _ in range(job.steps):
        chosen = torch.from_numpy(np.flatnonzero(sampler.bernoulli(n, sample_rate)))
        if len(chosen) == 0:
            # Still a step of the mechanism (the accountant counts it): noise alone.
            sums = [torch.zeros_like(p) for p in params]
            empty += 1
        else:
            batch = data[chosen]
            result = clipper.clipped_sum(batch[:, :-1], batch[:, -1], job.max_grad_norm)
            sums = result.grads
            recent.append((result.loss_sum, len(chosen)))
        # One draw for all parameters: fewer calls into the generator and fewer ops.
        draws = torch.from_numpy(noise.normal(total_size, np.float32)).to(dtype).mul_(noise_std)
        for p, total, z in zip(params, sums, draws.split(sizes), strict=True):
            p.grad = torch.add(total, z.view_as(p).to(p.dtype)).div_(expected_batch)
        optimizer.step()
    return _outcome(
        job,
        model,
        train_loss=_mean_loss(recent),
        empty=empty,
        sample_rate=sample_rate,
        started=started,
        dp=True,
    )


def train_nondp(job: TrainJob, *, module: nn.Module | None = None) -> TrainOutcome:
    """The same training without privacy: shuffled batches, no clipping, no noise.

    For benchmarks only (``bench/bench_models.py``, ``bench/bench_dpsgd.py``):
    the device daemon never calls it. ``noise_multiplier`` and
    ``max_grad_norm`` are ignored; ``sample_rate`` is reported as
    ``batch_size / n``. Its shuffling protects nothing, so it uses torch's
    generator.
    """
    started = time.perf_counter()
    torch.set_num_threads(TRAIN_THREADS)
    _keep_freed_memory()  # as train_dp does, so the two are timed alike
    model = _model(job, module)
    optimizer = _optimizer(job, model)
    data = _windows(job.train)
    n = int(data.shape[0])
    shuffle = torch.Generator().manual_seed((job.seed or 0) % 2**63)
    recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=_LOSS_WINDOW)
    order = torch.randperm(n, generator=shuffle)
    position = 0
    for _ in range(job.steps):
        if position >= n:  # a new epoch
            order, position = torch.randperm(n, generator=shuffle), 0
        batch = data[order[position : position + job.batch_size]]
        position += job.batch_size
        optimizer.zero_grad(set_to_none=True)
        loss = functional.cross_entropy(model(batch[:, :-1]), batch[:, -1])
        loss.backward()
        optimizer.step()
        recent.append((float(loss.detach()) * len(batch), len(batch)))
    return _outcome(
        job,
        model,
        train_loss=_mean_loss(recent),
        empty=0,
        sample_rate=min(1.0, job.batch_size / n),
        started=started,
        dp=False,
    )
