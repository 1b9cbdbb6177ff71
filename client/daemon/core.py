"""What the device daemon does when asked to train: validate, decide, charge, train, answer.

This is the device boundary. Every request is checked against the device's
own :class:`~keystay.client.policy.DevicePolicy`; the ε it would cost on each
block it reads is computed *before* training and written to the ledger
durably; only then does the warm trainer run, and the answer carries the
update and a signed privacy report — never a token of the data, and no
un-noised fact about it (no loss, no example count, no timing: see
:mod:`keystay.client.federation_fields`).

Order of a training request, and why:

1. ``policy.check_request`` — the request is well formed (run id, round,
   blocks, steps, learning rate, sample rate) and does not weaken the policy
   (noise floor and ceiling, clip, sampling-rate ceiling, steps, no-DP).
   Refused, never adjusted.
2. :func:`check_weights` — the weights are the shared model's: count, order
   (each position's shape), dtype, every value finite. A wrong-shape or NaN
   update would fail inside the trainer *after* the charge; checked here it
   costs nothing.
3. Choose blocks — the ones named, or every eligible complete day; a retired,
   unknown or too-small block is refused.
4. ``ledger.admit`` — per-block ε after this round (composed over every
   earlier charge), refuse over budget, else write the charge (write-ahead:
   a crash after this point never refunds). The ledger prices it itself,
   in this process, by composing the round into each block's stored
   accountant state (numpy/scipy, bounded time): the warm trainer is not
   needed to charge.
5. Train in the warm trainer process (torch lives there, not here).
6. Sign the report, mark the charge answered, reply.

Steps 1–3 touch nothing: a refused request leaves the ledger as it was.
Every :class:`~keystay.client.policy.Refusal` is written with its full reason
to the device's refusal log (:mod:`keystay.client.daemon.refusals`) before it
propagates; the servicer tells the federation only its code.

Clock changes: a block is an employee-day taken from the wall clock, and a
clock moved back (by hand, NTP after a long sleep, a time-zone change) would
make the recorder write into a day already charged or retired. That would
reopen a day whose ε history the ledger has already written, so
:meth:`DeviceCore.append` writes blocks in day order only: a batch never goes
to a block older than the newest the device holds or has charged, and never
to a charged or retired block (it goes to the next day after it instead).
Tokens recorded while the clock is behind are kept, under a later day; a
clock moved forward creates that later day early and the days in between
stay empty. Time zones and daylight-saving changes only move where midnight
falls, so they are the same case.

Employee-day rounds (:meth:`DeviceCore.employee_day_round`, the default
policy) go through SecAgg+ only, and the daemon runs that protocol itself
(:mod:`keystay.client.daemon.secagg_stages`, :meth:`DeviceCore.secagg_stage`):

1. the setup, share-keys and unmask stages are checked against the policy's
   ``min_summed_devices`` t by the state machine; nothing is charged there;
2. the masking stage first decrypts and counts the neighbours' key shares
   (fewer than t − 1: refused, nothing charged), then checks the request
   (σ, C, q, steps, unit) and the weights, charges **every** eligible day
   both mechanisms (write-ahead), samples days in secret, trains each
   sampled day separately from the global weights, clips and sums
   (:mod:`keystay.client.employee_day`), encodes with the device's discrete
   Gaussian noise, masks, and signs a report bound to the masked bytes;
3. ``Train`` refuses (``secure-aggregation-only``): the federation surface
   never returns an update that is not masked.

The Poisson sampling rate is the run's ``q`` (bounded by the policy), not
``B / n``: the report names the rate, and a rate derived from the window
count ``n`` would reveal it. The expected batch is ``q · n``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord
from flwr.app.typing import ConfigRecordValues
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from keystay.client.daemon.refusals import REFUSALS_FILE, RefusalLog
from keystay.client.daemon.secagg_stages import Masking, SecAggStages, SessionKey
from keystay.client.employee_day.mechanism import (
    DayRoundSpec,
    Encoding,
    check_scale,
    clip_and_sum,
    encode,
    mechanisms,
    sample_days,
)
from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.accounting import Mechanism
from keystay.client.ledger.ledger import Charge, Ledger
from keystay.client.ledger.report import PrivacyReport, build_report, sign_report
from keystay.client.policy import DevicePolicy, Refusal, TrainingRequest
from keystay.client.store import EventStore, block_for, is_block_id
from keystay.client.trainer.csprng import CryptoRandom
from keystay.client.trainer.job import TrainJob
from keystay.client.trainer.process import WarmTrainer
from keystay.common.digest import weights_sha256
from keystay.common.windows import TRAIN_STRIDE, WINDOW, make_windows, split_heldout

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1

#: What the model's weights must look like: per position, (shape, dtype str).
WeightSpec = tuple[tuple[tuple[int, ...], str], ...]


@dataclass(frozen=True)
class TrainResult:
    """What leaves the device after a round: the update and its signed report.

    Nothing else: the training loss, the example count and the wall time are
    exact facts about the data that no DP mechanism paid for, so the core
    does not even hand them to the servicer.
    """

    weights: list[np.ndarray]
    report: PrivacyReport
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class StageResult:
    """A SecAgg+ stage's answer: its ConfigRecord content, and for the masking
    stage the signed report of what the round cost (else None)."""

    configs: dict[str, ConfigRecordValues]
    report: PrivacyReport | None = None
    payload: bytes = b""
    signature: bytes = b""


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
    seed : int or None
        Tests only (a simulated device against a real daemon): draw the
        employee-day round's day sampling and noise, and every trainer job's
        randomness, from this seed instead of OS entropy. ``None`` (always, in
        the daemon: its CLI has no way to set it, and a test checks that).
    """

    def __init__(
        self,
        data_dir: Path,
        store: EventStore,
        policy: DevicePolicy,
        ledger: Ledger,
        identity: DeviceIdentity,
        trainer: WarmTrainer,
        seed: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self._seed = seed
        self.store = store
        self.policy = policy
        self.ledger = ledger
        self.identity = identity
        self.trainer = trainer
        # One training job at a time: the ledger's quote-then-charge must not
        # interleave with another request's.
        self._train_lock = threading.Lock()
        self.refusals = RefusalLog(data_dir / REFUSALS_FILE)
        self._weight_spec: WeightSpec | None = None
        # Day-order state for append() (see "Clock changes" above): the
        # blocks charged or retired (None: read from the ledger on the next
        # append; reset after every charge) and the newest block written.
        self._append_lock = threading.Lock()
        self._closed_blocks: set[str] | None = None
        self._newest_block: str | None = None
        self._last_moved: tuple[str, str] | None = None
        # SecAgg+ sessions, in memory only (their keys never touch the disk).
        self.secagg = SecAggStages(policy.min_summed_devices)

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
        windows = {info.block: window_count(info.events) for info in self.store.blocks()}
        return list(
            self.policy.select_blocks(requested, windows, self.ledger.retired_blocks())
        )

    def _load(self, blocks: Sequence[str]) -> list[BlockData]:
        data = []
        for block in blocks:
            windows = make_windows(self.store.block_tokens(block), WINDOW, stride=TRAIN_STRIDE)
            train, heldout = split_heldout(windows, HELDOUT_FRACTION, stride=TRAIN_STRIDE)
            data.append(BlockData(block, train, heldout))
        return data

    # -- training ----------------------------------------------------------

    def weight_spec(self) -> WeightSpec:
        """The shared model's weight shapes and dtypes (asked of the trainer once)."""
        if self._weight_spec is None:
            self._weight_spec = tuple(
                (tuple(int(d) for d in shape), str(dtype))
                for shape, dtype in self.trainer.weight_spec()
            )
        return self._weight_spec

    def train(self, request: TrainingRequest, weights: list[np.ndarray]) -> TrainResult:
        """Validate, decide, charge, train and sign one round (see the module docstring).

        Raises
        ------
        Refusal
            Before the ledger is touched: a malformed request or weights
            (``bad-request``), one that would weaken the policy, or blocks
            that may not be read; from the ledger: over budget, too soon.
            Logged with its full reason in :attr:`refusals`.
        """
        try:
            return self._train(request, weights)
        except Refusal as refusal:
            self.refusals.record(
                refusal, run_id=request.run_id, server_round=request.server_round
            )
            raise

    def _train(self, request: TrainingRequest, weights: list[np.ndarray]) -> TrainResult:
        if self.policy.privacy_unit == "employee-day":
            raise Refusal(
                "secure-aggregation-only",
                "refused: this device's privacy unit is the employee-day, and it answers "
                "only through secure aggregation (Federation.SecAggStage); a plain Train "
                "would return an update that is not masked",
            )
        self.policy.check_request(request)
        check_weights(weights, self.weight_spec())
        with self._train_lock:
            blocks = self.eligible_blocks(request.blocks)
            data = self._load(blocks)
            train = np.concatenate([d.train for d in data])
            heldout = np.concatenate([d.heldout for d in data])
            if len(train) < 1:
                raise Refusal("no-data", "refused: the chosen blocks hold no training windows")
            mechanism = Mechanism(
                noise_multiplier=request.noise_multiplier,
                sample_rate=float(request.sample_rate),
                steps=request.local_steps,
            )
            charge = self.ledger.admit(
                request=request,
                policy=self.policy,
                blocks=blocks,
                mechanism=mechanism,
            )
            self._closed_blocks = None  # these blocks are closed to new tokens now
            outcome = self.trainer.train(
                _job(weights, train, heldout, request, mechanism, self._seed)
            )
            return self._answer(request, mechanism, charge, outcome.weights)

    def secagg_stage(
        self,
        key: SessionKey,
        configs: ConfigRecord,
        request: TrainingRequest | None = None,
        weights: list[np.ndarray] | None = None,
    ) -> StageResult:
        """Answer one SecAgg+ stage (see the module docstring); refusals are logged.

        ``request`` and ``weights`` are needed by the masking stage only.

        Raises
        ------
        Refusal
            A stage out of order, parameters below the policy's
            ``min_summed_devices``, or (masking) any refusal of a round.
        """
        try:
            stage = self.secagg.stage_of(configs)
            # One line per stage, before the stage runs: what an operator (and
            # the fault matrix) reads to tell where a round stood when it died.
            log.info("SecAgg+ run %.128r round %d: %s", key.run_id, key.server_round, stage)
            if stage == Stage.SETUP:
                return StageResult(self.secagg.setup(key, configs))
            if stage == Stage.SHARE_KEYS:
                return StageResult(self.secagg.share_keys(key, configs))
            if stage == Stage.UNMASK:
                return StageResult(self.secagg.unmask(key, configs))
            if request is None or weights is None:
                raise Refusal("bad-request", "invalid request: the masking stage needs the "
                              "global weights and the round's spec")
            masking = self.secagg.open_masking(key, configs)
            result = self.employee_day_round(request, weights, masking)
            return StageResult(self.secagg.masked_result(result.weights), result.report,
                               result.payload, result.signature)
        except Refusal as refusal:
            self.refusals.record(refusal, run_id=key.run_id, server_round=key.server_round)
            raise

    def employee_day_round(
        self, request: TrainingRequest, weights: list[np.ndarray], masking: Masking
    ) -> TrainResult:
        """One employee-day round, masked: charge every eligible day, sample, train, encode.

        Returns a :class:`TrainResult` whose ``weights`` are the *masked*
        integer arrays (Flower's weight factor first) and whose report's
        ``update_sha256`` is their digest, so the server can check that the
        report it verifies came with the vector it sums.

        Raises
        ------
        Refusal
            A request the policy refuses (unit, σ, C, q, steps), weights that
            are not the model's, a noise scale the encoding cannot carry,
            no eligible day, or a budget the round would exceed; all before
            the charge.
        """
        if request.privacy_unit != "employee-day" or self.policy.privacy_unit != "employee-day":
            raise Refusal(
                "secure-aggregation-only",
                f"refused: the run asks for privacy unit {request.privacy_unit!r} through "
                f"secure aggregation; this device's policy unit is "
                f"{self.policy.privacy_unit!r}",
            )
        self.policy.check_request(request)
        check_weights(weights, self.weight_spec())
        spec = DayRoundSpec(
            noise_multiplier=request.noise_multiplier,
            update_clip=request.update_clip,
            day_sample_rate=request.day_sample_rate,
            min_summed_devices=masking.min_summed,
        )
        encoding = Encoding(masking.clipping_range, masking.quantization_range)
        shapes = [tuple(w.shape) for w in weights]
        dim = sum(int(w.size) for w in weights)
        unsafe = check_scale(spec, encoding, dim, masking.devices)
        if unsafe is not None:
            raise Refusal("bad-request", f"invalid request: {unsafe}")
        honest, broken = mechanisms(spec, encoding, dim)
        with self._train_lock:
            days = self.eligible_blocks(request.blocks)
            charge = self.ledger.admit(
                request=request,
                policy=self.policy,
                blocks=days,
                mechanism=honest,
                broken_mechanism=broken,
            )
            self._closed_blocks = None  # these blocks are closed to new tokens now
            rng = (CryptoRandom.from_os("employee-day") if self._seed is None
                   else CryptoRandom.from_seed(self._seed, "employee-day"))
            updates = []
            for day in sample_days(days, spec.day_sample_rate, rng):
                data = self._load([day])[0]
                outcome = self.trainer.train(
                    _day_job(weights, data, request, self.policy, self._seed))
                updates.append([
                    np.asarray(new, np.float64) - np.asarray(old, np.float64)
                    for new, old in zip(outcome.weights, weights, strict=True)
                ])
            total = clip_and_sum(updates, spec.update_clip, shapes)
            masked = masking.mask(encode(total, spec, encoding, rng))
            return self._answer(request, honest, charge, masked)

    def _answer(
        self,
        request: TrainingRequest,
        mechanism: Mechanism,
        charge: Charge,
        weights: list[np.ndarray],
    ) -> TrainResult:
        """Sign the report of a charged round for ``weights``, mark it answered, reply.

        The report names the digest of exactly what leaves (the update, or the
        masked vector), so the server can bind the two.
        """
        report = build_report(
            device_id=self.device_id,
            request=request,
            mechanism=mechanism,
            delta=self.policy.delta,
            charge=charge,
            ledger=self.ledger,
            update_sha256=weights_sha256(weights),
        )
        payload, signature = sign_report(report, self.identity)
        self.ledger.mark_answered(charge)
        return TrainResult(weights=weights, report=report, payload=payload,
                           signature=signature)

    def evaluate(self, weights: list[np.ndarray]) -> EvalResult:
        """Score weights on the held-out records of every kept day, for the employee.

        Only the control surface calls this: the figure is exact and uncharged,
        so it never goes to the federation. That is also why it reads every day
        kept, not just the days a round may train on (training eligibility is
        a privacy rule for what leaves; this leaves nothing).

        Raises
        ------
        Refusal
            ``no-data`` when no day has a held-out record yet.
        """
        blocks = [info.block for info in self.store.blocks()]
        parts = [d.heldout for d in self._load(blocks) if len(d.heldout)]
        if not parts:
            raise Refusal("no-data", "no day kept has a held-out record yet; record longer")
        heldout = np.concatenate(parts)
        scored = self.trainer.evaluate(weights, heldout)
        return EvalResult(num_examples=len(heldout), loss=scored.loss, accuracy=scored.accuracy)

    def today_block(self) -> str:
        return block_for(time.time())

    def reset_store(self) -> None:
        """Crypto-shred the store and start an empty one with a new key."""
        with self._train_lock:
            self.store.destroy()
            self.store = EventStore.open(self.data_dir)
            with self._append_lock:
                self._newest_block = None

    def append(self, block: str, records: Sequence[object]) -> None:
        """Write a batch to whichever store is current (it changes on forget --all),
        in day order (see "Clock changes" in the module doc)."""
        self.store.append(self.block_to_write(block), records)  # type: ignore[arg-type]

    def block_to_write(self, block: str) -> str:
        """The block a batch stamped ``block`` by the wall clock goes to.

        ``block`` itself, unless the clock went back: then the newest block
        the device holds or has charged, or the first day after it when that
        one is charged or retired. Never an earlier block than the last call
        returned, and never a charged or retired one.
        """
        with self._append_lock:
            if self._closed_blocks is None:
                self._closed_blocks = {t.block for t in self.ledger.totals()}
                self._closed_blocks |= self.ledger.retired_blocks()
            closed = self._closed_blocks
            if self._newest_block is None:
                # An altered block name (see EventStore) must not become "newest".
                held = [info.block for info in self.store.blocks() if is_block_id(info.block)]
                self._newest_block = max([*held, *closed], default=block)
            target = max(block, self._newest_block)
            while target in closed:
                target = (date.fromisoformat(target) + timedelta(days=1)).isoformat()
            if target != block and self._last_moved != (block, target):
                # Once per change of target, not once per batch.
                log.warning(
                    "the clock says %s, but that day is older than %s or already "
                    "charged; writing its tokens to %s so no charged day is reopened",
                    block, self._newest_block, target,
                )
            self._last_moved = (block, target) if target != block else None
            self._newest_block = target
            return target


def window_count(events: int) -> int:
    """Training-stride windows (before the held-out split) in a block of ``events`` tokens."""
    if events < WINDOW + 1:
        return 0
    return (events - WINDOW - 1) // TRAIN_STRIDE + 1


def check_weights(weights: Sequence[np.ndarray], spec: WeightSpec) -> None:
    """Refuse weights that are not the shared model's, before anything is charged.

    Checks, in order: the number of arrays; per position (the model's
    ``state_dict`` order, which the protocol fixes since tensors carry no
    names) the shape and the dtype; every value finite.

    Raises
    ------
    Refusal
        ``bad-request`` naming the first array that differs and how.
    """
    if len(weights) != len(spec):
        raise Refusal(
            "bad-request",
            f"invalid request: the model has {len(spec)} weight arrays, the request "
            f"carries {len(weights)}",
        )
    for i, (array, (shape, dtype)) in enumerate(zip(weights, spec, strict=True)):
        if tuple(array.shape) != shape:
            raise Refusal(
                "bad-request",
                f"invalid request: weight array {i} has shape {list(array.shape)}, the "
                f"model's is {list(shape)} (arrays must be in the model's order)",
            )
        if array.dtype.str != dtype:
            raise Refusal(
                "bad-request",
                f"invalid request: weight array {i} has dtype {array.dtype.str}, the "
                f"model's is {dtype}",
            )
        if not np.all(np.isfinite(array)):
            raise Refusal(
                "bad-request", f"invalid request: weight array {i} holds NaN or infinity"
            )


def _day_job(
    weights: list[np.ndarray], data: BlockData, request: TrainingRequest, policy: DevicePolicy,
    seed: int | None = None,
) -> TrainJob:
    """One sampled day's local training from the global weights.

    Plain minibatches unless the policy adds record-level DP-SGD inside
    (``record_level_dp``); either way the day's whole update is clipped to
    ``C`` afterwards. Batches of the run's record rate ``q_r`` of the day's
    windows (at least one window); OS entropy, never a server seed (``seed``
    is the core's test-only seed, else None).
    """
    return TrainJob(
        weights=weights,
        train=data.train,
        heldout=data.heldout,
        noise_multiplier=request.noise_multiplier,
        max_grad_norm=request.max_grad_norm if request.max_grad_norm > 0 else 1.0,
        steps=request.local_steps,
        batch_size=max(1, round(request.sample_rate * len(data.train))),
        poisson_rate=request.sample_rate if policy.record_level_dp else None,
        learning_rate=request.learning_rate,
        seed=seed,
        record_level_dp=policy.record_level_dp,
    )


def _job(
    weights: list[np.ndarray],
    train: np.ndarray,
    heldout: np.ndarray,
    request: TrainingRequest,
    mechanism: Mechanism,
    seed: int | None = None,
) -> TrainJob:
    # seed=None: sampling and noise draw fresh OS entropy. A seed from the
    # server would let it predict the batches and subtract the noise (``seed``
    # is only ever the core's test-only seed).
    return TrainJob(
        weights=weights,
        train=train,
        heldout=heldout,
        noise_multiplier=mechanism.noise_multiplier,
        max_grad_norm=request.max_grad_norm,
        steps=mechanism.steps,
        # The expected batch q·n, for a job that reads it; the rate is what counts.
        batch_size=max(1, round(mechanism.sample_rate * len(train))),
        poisson_rate=mechanism.sample_rate,
        learning_rate=request.learning_rate,
        seed=seed,
    )
