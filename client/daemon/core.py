"""What the device daemon does when asked to train: decide, charge, train, answer.

This is the device boundary. Every request is checked against the device's
own :class:`~keystay.client.policy.DevicePolicy`; the ε it would cost on each
block it reads is computed *before* training and written to the ledger
durably; only then does the warm trainer run, and the answer carries the
update and a signed privacy report — never a token of the data.

Order of a training request, and why:

1. ``policy.check_request`` — request-level rules (noise floor, clip, steps,
   no-DP). Refused, never adjusted.
2. Choose blocks — the ones named, or every eligible complete day; a retired,
   unknown or too-small block is refused by name.
3. ``ledger.admit`` — per-block ε after this round (composed over every
   earlier charge), refuse over budget, else write the charge (write-ahead:
   a crash after this point never refunds). The ledger prices it itself,
   in this process, by composing the round into each block's stored
   accountant state (numpy/scipy, bounded time): the warm trainer is not
   needed to charge.
4. Train in the warm trainer process (torch lives there, not here).
5. Sign the report, mark the charge answered, reply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keystay.client.digest import weights_sha256
from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.accounting import Mechanism
from keystay.client.ledger.ledger import Ledger
from keystay.client.ledger.report import PrivacyReport, build_report, sign_report
from keystay.client.policy import DevicePolicy, Refusal, TrainingRequest
from keystay.client.store import EventStore, block_for
from keystay.client.trainer.job import TrainJob, sample_rate_for
from keystay.client.trainer.process import WarmTrainer
from keystay.client.windows import WINDOW, make_windows, split_heldout

HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class TrainResult:
    """What leaves the device after a round: the update and its signed report."""

    weights: list[np.ndarray]
    num_examples: int
    train_loss: float
    seconds: float
    report: PrivacyReport
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class BlockData:
    block: str
    train: np.ndarray
    heldout: np.ndarray


class DeviceCore:
    """The device's decision-maker, shared by the gRPC servicer and the CLI.

    Parameters
    ----------
    data_dir : Path
        The device's data folder (store, ledger, keys, policy, socket).
    store : EventStore
        The encrypted event store; only this object reads it.
    policy : DevicePolicy
        The employee's policy; fixed for the daemon's lifetime.
    ledger : Ledger
        The per-block privacy ledger.
    identity : DeviceIdentity
        Signs privacy reports.
    trainer : WarmTrainer
        The long-lived torch process.
    """

    def __init__(
        self,
        data_dir: Path,
        store: EventStore,
        policy: DevicePolicy,
        ledger: Ledger,
        identity: DeviceIdentity,
        trainer: WarmTrainer,
    ) -> None:
        self.data_dir = data_dir
        self.store = store
        self.policy = policy
        self.ledger = ledger
        self.identity = identity
        self.trainer = trainer
        # One training job at a time: the ledger's quote-then-charge must not
        # interleave with another request's.
        self._train_lock = threading.Lock()

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    # -- data --------------------------------------------------------------

    def eligible_blocks(self, requested: Sequence[str] = ()) -> list[str]:
        """The blocks a round may read (the policy decides; see ``select_blocks``).

        Raises
        ------
        Refusal
            Naming any requested block that is unknown, retired, too thin or
            still being recorded, or ``no-data`` when nothing is eligible.
        """
        windows = {info.block: _window_count(info.events) for info in self.store.blocks()}
        return list(
            self.policy.select_blocks(requested, windows, self.ledger.retired_blocks())
        )

    def _load(self, blocks: Sequence[str]) -> list[BlockData]:
        data = []
        for block in blocks:
            windows = make_windows(self.store.block_tokens(block), WINDOW)
            train, heldout = split_heldout(windows, HELDOUT_FRACTION)
            data.append(BlockData(block, train, heldout))
        return data

    # -- training ----------------------------------------------------------

    def train(self, request: TrainingRequest, weights: list[np.ndarray]) -> TrainResult:
        """Decide, charge, train and sign one round (see the module docstring)."""
        self.policy.check_request(request)
        with self._train_lock:
            blocks = self.eligible_blocks(request.blocks)
            data = self._load(blocks)
            train = np.concatenate([d.train for d in data])
            heldout = np.concatenate([d.heldout for d in data])
            if len(train) < request.batch_size:
                raise Refusal(
                    "no-data",
                    f"refused: {len(train)} training windows cannot support an expected "
                    f"batch of {request.batch_size}",
                )
            mechanism = Mechanism(
                noise_multiplier=request.noise_multiplier,
                sample_rate=sample_rate_for(len(train), request.batch_size),
                steps=request.local_steps,
            )
            charge = self.ledger.admit(
                request=request,
                policy=self.policy,
                blocks=blocks,
                mechanism=mechanism,
            )
            started = time.monotonic()
            outcome = self.trainer.train(
                _job(weights, train, heldout, request, mechanism)
            )
            report = build_report(
                device_id=self.device_id,
                request=request,
                mechanism=mechanism,
                delta=self.policy.delta,
                charge=charge,
                ledger=self.ledger,
                num_examples=len(train),
                update_sha256=weights_sha256(outcome.weights),
            )
            payload, signature = sign_report(report, self.identity)
            self.ledger.mark_answered(charge)
            return TrainResult(
                weights=outcome.weights,
                num_examples=len(train),
                train_loss=outcome.train_loss,
                seconds=time.monotonic() - started,
                report=report,
                payload=payload,
                signature=signature,
            )

    def evaluate(self, weights: list[np.ndarray]) -> EvalResult:
        """Score weights on the held-out windows of the eligible blocks."""
        blocks = self.eligible_blocks()
        heldout = np.concatenate([d.heldout for d in self._load(blocks)])
        scored = self.trainer.evaluate(weights, heldout)
        return EvalResult(num_examples=len(heldout), loss=scored.loss, accuracy=scored.accuracy)

    def today_block(self) -> str:
        return block_for(time.time())

    def reset_store(self) -> None:
        """Crypto-shred the store and start an empty one with a new key."""
        with self._train_lock:
            self.store.destroy()
            self.store = EventStore.open(self.data_dir)

    def append(self, block: str, records: Sequence[object]) -> None:
        """Write a batch to whichever store is current (it changes on forget --all)."""
        self.store.append(block, records)  # type: ignore[arg-type]


def _window_count(events: int) -> int:
    return max(0, events - WINDOW)


def _job(
    weights: list[np.ndarray],
    train: np.ndarray,
    heldout: np.ndarray,
    request: TrainingRequest,
    mechanism: Mechanism,
) -> TrainJob:
    # seed=None: sampling and noise draw fresh OS entropy. A seed from the
    # server would let it predict the batches and subtract the noise.
    return TrainJob(
        weights=weights,
        train=train,
        heldout=heldout,
        noise_multiplier=mechanism.noise_multiplier,
        max_grad_norm=request.max_grad_norm,
        steps=mechanism.steps,
        batch_size=request.batch_size,
        learning_rate=request.learning_rate,
        seed=None,
    )
