"""A round's record on the server: the rounds file, its rows and the checkpoint names.

Design
------
Both aggregation paths (plain FedAvg in :mod:`keystay.server.app`, SecAgg+
in :mod:`keystay.server.secagg`) write the same row per round to
:data:`ROUNDS_FILE`, file a device's error reply by its kind (a policy
refusal also goes to the ledger), score the global model on the server's own
held-out employees and compose central-DP rounds in the ledger. Those shared
pieces live here, below both paths, so neither imports the other.

A row also says where the round's time went on the server
(``stage_seconds``: the held-out scoring, and for SecAgg+ each protocol stage
from sending to the last reply), so ``bench/bench_round.py`` can set a round
beside Flower's bare floor stage by stage. These are the server's own clock
readings; nothing about a device's timing is in them beyond when its reply
landed, which the server sees anyway.

An error reply's kind comes from the ClientApp's codes
(:mod:`keystay.common.wire`) and Flower's own: only
:data:`~keystay.common.wire.ERROR_REFUSED` is a device's policy declining.

>>> error_kind(ERROR_REFUSED), error_kind(ERROR_UNAVAILABLE), error_kind(12345)
('refused', 'unavailable', 'failed')
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.files import out_of_space
from keystay.common.model import ModelConfig
from keystay.common.wire import ERROR_REFUSED, ERROR_UNAVAILABLE
from keystay.server.central_dp import (
    SAMPLING_DESCRIPTIONS,
    CentralDPAccountant,
)
from keystay.server.heldout import (
    HELDOUT_SET,
    HeldoutEvaluator,
    HeldoutPopulation,
    HeldoutScore,
)
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.settings import RunSettings

ROUNDS_FILE = "rounds.jsonl"
FINAL_CHECKPOINT = "final.pt"


# Flower's own codes for a message or node that could not be reached.
_FLOWER_UNAVAILABLE = frozenset({
    ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.NODE_UNAVAILABLE,
})

REFUSED, UNAVAILABLE, FAILED = "refused", "unavailable", "failed"


def error_kind(code: int) -> str:
    """What an error reply means: ``refused``, ``unavailable`` or ``failed``.

    Only :data:`ERROR_REFUSED` is a device's policy declining the round. A
    daemon that is down (``Stream removed``, ``Socket closed``) or a node Flower
    cannot reach is *unavailable*; every other code, known or not, is
    *failed*, so nothing is counted as a policy decision that was not one.
    """
    if code == ERROR_REFUSED:
        return REFUSED
    if code == ERROR_UNAVAILABLE or code in _FLOWER_UNAVAILABLE:
        return UNAVAILABLE
    return FAILED


@dataclass
class RoundLog:
    """What one round produced, as written to ``rounds.jsonl``.

    ``devices_answered`` counts devices that sent an update with a report;
    ``devices_reported`` those whose update was aggregated (report verified,
    update matching it). ``refusals``, ``unavailable`` and ``failed`` list
    the devices that sent no update, by :func:`error_kind`.
    """

    server_round: int
    started: float
    devices_sampled: int = 0
    devices_answered: int = 0
    devices_reported: int = 0
    refusals: list[dict[str, Any]] = field(default_factory=list)
    unavailable: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    central_epsilon: float | None = None
    delta: float | None = None
    checkpoint: str = ""
    heldout: HeldoutScore | None = None
    heldout_population: dict[str, Any] = field(default_factory=dict)
    #: Wall seconds of the round's parts on the server (see the module docstring).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def record_error(self, node: int, code: int, reason: str) -> str:
        """File an error reply under its kind; returns the kind."""
        kind = error_kind(code)
        entry = {"node": node, "code": code, "reason": reason}
        {REFUSED: self.refusals, UNAVAILABLE: self.unavailable, FAILED: self.failed}[
            kind
        ].append(entry)
        return kind

    def as_dict(self) -> dict[str, Any]:
        """The row, as ``rounds.jsonl`` holds it."""
        heldout = self.heldout.as_row() if self.heldout is not None else {
            "heldout_accuracy": None, "heldout_loss": None, "heldout_windows": 0,
        }
        return {
            "round": self.server_round,
            "seconds": round(time.time() - self.started, 3),
            "devices_sampled": self.devices_sampled,
            "devices_answered": self.devices_answered,
            "devices_reported": self.devices_reported,
            "refusals": self.refusals,
            "unavailable": self.unavailable,
            "failed": self.failed,
            "devices": self.devices,
            "central_epsilon": self.central_epsilon,
            "delta": self.delta,
            "checkpoint": self.checkpoint,
            **heldout,
            "heldout_set": HELDOUT_SET,
            "heldout_population": self.heldout_population,
            "stage_seconds": self.stage_seconds,
        }

    def as_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


def record_error_reply(
    ledger: ServerLedger, run_name: str, round_log: RoundLog, node: int, code: int, reason: str
) -> None:
    """File a device's error reply in the round row, and a policy refusal in the ledger.

    Only refusals go to the ledger: they are the device's policy at work, which
    a security reviewer reads there. An unavailable or failed device is an
    operational fact, kept in the round row and the log.
    """
    kind = round_log.record_error(node, code, reason)
    if kind == REFUSED:
        ledger.record_refusal(run_name, round_log.server_round, str(node), reason)
    log(WARNING, "round %s: device on node %s %s: %s", round_log.server_round, node, kind,
        reason)


def score_and_write(
    evaluator: HeldoutEvaluator,
    weights: list[np.ndarray],
    round_log: RoundLog,
    rounds_file: Path,
) -> HeldoutScore | None:
    """Score the global model on the server's held-out set and append the round's row.

    A model the evaluator cannot load (NaN weights, say) gets no figures; the
    row is written all the same, so the table never skips a round.
    """
    started = time.perf_counter()
    try:
        round_log.heldout = evaluator.score(weights)
    except ValueError as error:
        round_log.heldout = None
        log(WARNING, "round %s: the global model could not be scored: %s",
            round_log.server_round, error)
    round_log.stage_seconds["heldout_score"] = round(time.perf_counter() - started, 3)
    round_log.heldout_population = evaluator.population.describe()
    line = round_log.as_json()
    append_row(rounds_file, line, round_log.server_round)
    log(INFO, "round %s: %s", round_log.server_round, line)
    return round_log.heldout


class RoundsFileError(KeystayError, OSError):
    """A round's row could not be appended to ``rounds.jsonl`` (the disk is full, say).

    The file is left as it was before the row: never half a row.
    """

    exit_code = ExitCode.SERVER_RUN_FAILED


def append_row(rounds_file: Path, line: str, server_round: int) -> None:
    """Append one row to ``rounds_file``: whole, or (when the write fails) not at all.

    Raises
    ------
    RoundsFileError
        The row could not be written or flushed; the bytes already written
        are cut off again, so readers never meet a torn row of a live writer.
    """
    with rounds_file.open("a+b", buffering=0) as out:
        end = out.seek(0, os.SEEK_END)
        # A ServerApp killed mid-append leaves a line without its newline;
        # start on a fresh line so this row is not glued to the torn one.
        torn = end > 0 and (out.seek(-1, os.SEEK_END), out.read(1))[1] != b"\n"
        data = (("\n" if torn else "") + line + "\n").encode()
        try:
            written = 0
            while written < len(data):  # a raw write may write part of what it is given
                written += out.write(data[written:]) or 0
            os.fsync(out.fileno())
        except OSError as error:
            with contextlib.suppress(OSError):
                out.truncate(end)
            why = "the server's disk is full" if out_of_space(error) else "it cannot be written"
            raise RoundsFileError(
                f"round {server_round}'s row was not appended to {rounds_file}: "
                f"{why} ({error.strerror or error}); the run stops here, with the rows "
                "before it whole"
            ) from error


def heldout_evaluator(settings: RunSettings, model_config: ModelConfig) -> HeldoutEvaluator:
    """The run's evaluator, for the population its settings name."""
    return HeldoutEvaluator(
        HeldoutPopulation(
            employees=settings.heldout_employees,
            days=settings.heldout_days,
            events_per_day=settings.heldout_events_per_day,
        ),
        model_config,
    )


def account_central_round(
    ledger: ServerLedger,
    settings: RunSettings,
    accountant: CentralDPAccountant,
    server_round: int,
) -> float:
    """Compose one more central-DP round and record it; returns the run's ε so far.

    Every round goes to every connected device (no subsampling), so the
    accountant runs at q = 1 and the ledger says so.
    """
    accountant.step()
    epsilon = accountant.epsilon()
    ledger.record_central_dp(
        run_id=settings.run_name,
        server_round=server_round,
        noise_multiplier=settings.central_noise_multiplier,
        clip=settings.central_clip,
        sample_rate=1.0,
        sampling=SAMPLING_DESCRIPTIONS["all"],
        epsilon=epsilon,
        delta=accountant.delta,
    )
    return epsilon
