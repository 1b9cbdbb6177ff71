"""DP-SGD on the device's token windows, with Opacus.

:func:`train_dp` is one federated round of local training: the model starts
from the job's weights, takes exactly ``job.steps`` DP-SGD steps, and returns
its new weights. Each step

1. samples a batch by Poisson sampling: every training window joins
   independently with probability ``q`` (:attr:`TrainJob.sample_rate`: the run's
   rate when the daemon asks, never derived from ``n``), so batch sizes vary
   around ``q * n`` and may be 0 (Opacus's ``DPDataLoader``);
2. computes each window's gradient separately and clips it to L2 norm ``C``
   (``max_grad_norm``);
3. sums the clipped gradients, adds Gaussian noise of std ``sigma * C``
   (``noise_multiplier``), divides by the expected batch size ``q * n``;
4. lets the optimizer (Adam or SGD) post-process the noised gradient.

That is the Poisson-subsampled Gaussian mechanism the ledger's accountants
analyse (:mod:`keystay.client.ledger.accounting`); batches are never drawn by
shuffling, which the accountants do not cover. Accounting is not done here:
the device ledger composes every round's :class:`~keystay.client.ledger.accounting.Mechanism`
``(sigma, q, steps)``; this module only trains.

Everything here runs in the warm trainer process
(:mod:`keystay.client.trainer.process`), never in the daemon.
"""

from __future__ import annotations

import collections
import os
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from keystay.client.model import ModelConfig, NextEventModel, evaluate, get_weights, set_weights
from keystay.client.trainer.job import TrainJob, TrainOutcome

__all__ = ["TRAIN_THREADS", "TrainJob", "TrainOutcome", "train_dp", "train_nondp"]

#: Intra-op threads torch may use. One: the model is small enough that per-example
#: gradient kernels are dominated by per-op overhead, not arithmetic, so a second
#: thread buys little (measured in bench/bench_models.py), while the machine is an
#: employee's laptop whose recorder and applications must stay responsive.
TRAIN_THREADS = int(os.environ.get("KEYSTAY_TRAIN_THREADS", "1"))

# Losses of this many recent non-empty batches make up TrainOutcome.train_loss.
_LOSS_WINDOW = 10


def _generators(seed: int | None) -> tuple[torch.Generator, torch.Generator]:
    """Independent generators for batch sampling and for noise.

    ``None`` seeds both from ``os.urandom``: the server must not be able to
    predict which windows were sampled or what noise was added.
    """
    if seed is None:
        entropy: int | list[int] = int.from_bytes(os.urandom(16), "little")
    else:
        entropy = seed
    sample_seed, noise_seed = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return (
        torch.Generator().manual_seed(int(sample_seed)),
        torch.Generator().manual_seed(int(noise_seed)),
    )


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


def _dataset(windows: np.ndarray) -> TensorDataset:
    data = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    return TensorDataset(data[:, :-1], data[:, -1])


def _optimizer(job: TrainJob, model: nn.Module) -> torch.optim.Optimizer:
    if job.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=job.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=job.learning_rate, momentum=0.9)


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, forever: one pass is about ``1/q`` steps, a round may want more."""
    while True:
        yield from loader


def _run(
    job: TrainJob, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
) -> tuple[float, int]:
    """Take exactly ``job.steps`` optimizer steps; return (recent train loss, empty batches)."""
    criterion = nn.CrossEntropyLoss()
    recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=_LOSS_WINDOW)
    empty = 0
    batches = _batches(loader)
    with warnings.catch_warnings():
        # The model's input is token ids (no gradient), so torch notes that Opacus's full
        # backward hooks fire on module outputs only; that is what Opacus needs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(job.steps):
            empty += _step(model, optimizer, criterion, next(batches), recent)
    total = sum(n for _, n in recent)
    return (sum(s for s, _ in recent) / total if total else float("nan")), empty


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    recent: collections.deque[tuple[float, int]],
) -> int:
    """One optimizer step; returns 1 if the batch was empty."""
    x, y = batch
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    if len(y) == 0:
        # An empty Poisson batch is still a step of the mechanism (the accountant
        # counts it): Opacus's optimizer adds noise to a zero sum of clipped gradients.
        # It needs the backward pass to have run (for empty per-sample gradients), and
        # the mean loss of zero examples is NaN, so backpropagate an exact zero instead.
        logits.sum().backward()
        optimizer.step()
        return 1
    loss = criterion(logits, y)
    loss.backward()
    recent.append((float(loss.detach()) * len(y), len(y)))
    optimizer.step()
    return 0


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
    # Opacus's hooks stay on the trained module but record nothing in eval mode
    # without gradients, which is how evaluate() runs it.
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

    Uses ``opacus.PrivacyEngine.make_private`` on an Opacus ``DPDataLoader``
    (Poisson sampling) with rate ``q = job.sample_rate`` (the daemon's jobs
    carry the run's rate; otherwise ``batch_size / n``, see
    :func:`~keystay.client.trainer.job.sample_rate_for`), returned in the
    outcome. Raises ``RuntimeError`` rather than return a round whose
    mechanism differs from ``(noise_multiplier, q, steps)``.

    Parameters
    ----------
    job : TrainJob
    module : torch.nn.Module or None
        Train this module instead of ``NextEventModel(job.config)`` (for the
        architecture benchmark; it must take ``(batch, window)`` token ids and
        return logits, and ``job.weights`` must be its state). The device
        never passes one.

    Returns
    -------
    TrainOutcome
        With ``steps == job.steps`` and the sampling rate to charge.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    started = time.perf_counter()
    torch.set_num_threads(TRAIN_THREADS)
    model = _model(job, module)
    sample_gen, noise_gen = _generators(job.seed)
    n = int(job.train.shape[0])
    # The job's rate: the run's q when the daemon set it (data-independent),
    # else B / n for benchmarks and tests.
    sample_rate = job.sample_rate
    # Poisson sampling at exactly that q. make_private(poisson_sampling=True) would
    # derive q = 1 / ceil(n / B) from a batched loader instead, which is not the rate
    # the ledger charged; so the DPDataLoader is built here and handed over as is.
    loader = DPDataLoader(_dataset(job.train), sample_rate=sample_rate, generator=sample_gen)
    with warnings.catch_warnings():
        # Opacus warns that its secure RNG is off: noise comes from torch's Mersenne
        # Twister seeded from os.urandom (see _generators); torchcsprng, which secure_mode
        # needs, is not maintained for current torch.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # The accountant inside the engine is not used for reporting (the ledger composes
        # the whole history); here it only counts the noisy steps, checked below.
        engine = PrivacyEngine(accountant="rdp")
        private_model, optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=_optimizer(job, model),
            data_loader=loader,
            noise_multiplier=job.noise_multiplier,
            max_grad_norm=job.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples by Poisson
            noise_generator=noise_gen,
        )
    # What make_private(poisson_sampling=True) would also do: one batch per step, never
    # gradients accumulated across batches (that would change the mechanism).
    private_model.forbid_grad_accumulation()
    # make_private infers the expected batch size from the loader's length (int(1 / q)
    # batches per pass); the noised sum must be divided by q * n exactly. This only
    # scales the update: the privacy guarantee depends on sigma and q alone.
    optimizer.expected_batch_size = sample_rate * n
    if private_loader is not loader or float(private_loader.sample_rate) != sample_rate:
        raise RuntimeError(
            "Opacus replaced the Poisson loader; the sampling rate the ledger charged "
            "would not be the one used, so this round must not be reported"
        )
    train_loss, empty = _run(job, private_model, optimizer, private_loader)
    # Opacus's own accountant saw every optimizer step that added noise; it must have
    # seen exactly the steps the ledger charges for.
    counted = sum(steps for _, _, steps in engine.accountant.history)
    if counted != job.steps:
        raise RuntimeError(
            f"Opacus recorded {counted} noisy steps but the job asked for {job.steps}; "
            "do not report this round"
        )
    return _outcome(
        job,
        model,
        train_loss=train_loss,
        empty=empty,
        sample_rate=sample_rate,
        started=started,
        dp=True,
    )


def train_nondp(job: TrainJob, *, module: nn.Module | None = None) -> TrainOutcome:
    """The same training without privacy: shuffled batches, no clipping, no noise.

    For the architecture benchmark only (``bench/bench_models.py``): the
    device daemon never calls it. ``noise_multiplier`` and ``max_grad_norm``
    are ignored; ``sample_rate`` is reported as ``batch_size / n``.
    """
    started = time.perf_counter()
    torch.set_num_threads(TRAIN_THREADS)
    model = _model(job, module)
    sample_gen, _ = _generators(job.seed)
    loader = DataLoader(
        _dataset(job.train), batch_size=job.batch_size, shuffle=True, generator=sample_gen
    )
    train_loss, _ = _run(job, model, _optimizer(job, model), loader)
    return _outcome(
        job,
        model,
        train_loss=train_loss,
        empty=0,
        sample_rate=min(1.0, job.batch_size / job.train.shape[0]),
        started=started,
        dp=False,
    )
