"""The Flower ServerApp: FedAvg over device updates, with their privacy reports.

The server never sees event data. What it receives from each device per
round is a clipped, noised model update, a signed privacy report of what it
cost, and ``num-examples`` = 1 (a public constant: every device weighs the
same). This module aggregates the updates (an equal-weight mean, optionally
user-level central DP on top), records every report in the server ledger
(verifying its signature), and sorts every device that sent no update into
*refused* (its policy said no: recorded in the ledger with its reason),
*unavailable* (its daemon or node could not be reached) or *failed*
(anything else), using the ClientApp's error codes.

It asks devices nothing else. No evaluate message is sent: a device's exact
held-out loss for weights the server picks is an unpaid query on its data.
Instead, after each round's aggregation the ServerApp scores the new global
model on its own held-out set, simulated employees that never train
(:mod:`keystay.server.heldout`). Nor does it read a device's training loss,
time or example count: devices stop sending them, and nothing here needs
them. Per round it writes a checkpoint and one line of ``rounds.jsonl`` that
``keystay round start`` turns into the table an ML engineer reads.

A round is one Flower message phase (train), and its replies are collected
as they land (:class:`keystay.server.grid_poll.PromptGrid`), not on Flower's
3 s pull tick: what a round costs beyond Flower's floor is measured by
``bench/bench_round.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from keystay.client.digest import weights_sha256
from keystay.client.model import ModelConfig, initial_weights, save_checkpoint
from keystay.server.central_dp import (
    SAMPLING_DESCRIPTIONS,
    CentralDPAccountant,
    aggregate_with_central_dp,
)
from keystay.server.grid_poll import prompt_grid
from keystay.server.heldout import (
    HELDOUT_SET,
    HeldoutEvaluator,
    HeldoutPopulation,
    HeldoutScore,
)
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.settings import RunSettings

app = ServerApp()

ROUNDS_FILE = "rounds.jsonl"
FINAL_CHECKPOINT = "final.pt"


# The ClientApp's Flower Error codes (keystay.client.app; a test holds the two
# sides together, the server does not import device code).
ERROR_REFUSED = 4001
ERROR_UNAVAILABLE = 4002
ERROR_FAILED = 4003
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
    try:
        round_log.heldout = evaluator.score(weights)
    except ValueError as error:
        round_log.heldout = None
        log(WARNING, "round %s: the global model could not be scored: %s",
            round_log.server_round, error)
    round_log.heldout_population = evaluator.population.describe()
    line = round_log.as_json()
    with rounds_file.open("a", encoding="utf-8") as out:
        out.write(line + "\n")
    log(INFO, "round %s: %s", round_log.server_round, line)
    return round_log.heldout


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


def equal_mean(updates: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The element-wise mean of the devices' arrays, every device weighing 1.

    Devices send ``num-examples`` = 1, a public constant; a real count would
    be an uncharged statistic of the employee's data and would let one device
    outweigh the others, so the server never weights by it.
    """
    return [
        np.mean(np.stack([np.asarray(a, dtype=np.float64) for a in arrays]), axis=0).astype(
            np.asarray(arrays[0]).dtype
        )
        for arrays in zip(*updates, strict=True)
    ]


class KeystayFedAvg(FedAvg):
    """FedAvg that keeps the privacy books and scores its model on its own held-out set.

    Parameters
    ----------
    settings : RunSettings
        The validated run configuration.
    ledger : ServerLedger
        Where every device report and refusal is recorded and verified.
    model_config : ModelConfig
        The model the weights belong to (for checkpoints).
    evaluator : HeldoutEvaluator or None
        Scores each round's global model; None builds one from ``settings``.
    """

    def __init__(
        self,
        settings: RunSettings,
        ledger: ServerLedger,
        model_config: ModelConfig,
        evaluator: HeldoutEvaluator | None = None,
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            # No federated evaluation: devices are never asked to score weights
            # (see the module docstring); configure_evaluate also sends nothing.
            fraction_evaluate=0.0,
            min_train_nodes=settings.min_devices,
            min_available_nodes=settings.min_devices,
        )
        self.settings = settings
        self.ledger = ledger
        self.model_config = model_config
        self.evaluator = evaluator or heldout_evaluator(settings, model_config)
        self.run_dir = settings.run_dir
        self.checkpoints = self.run_dir / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._current: RoundLog | None = None
        self._global: list[np.ndarray] | None = None
        # OS entropy, never the run's seed: the seed travels in the run config,
        # and whoever knows it could regenerate the noise and subtract it.
        self._rng = np.random.default_rng()
        self.central: CentralDPAccountant | None = None
        if settings.central_dp:
            # Flower's FedAvg with fraction_train=1.0 sends every round to every
            # connected device: no subsampling, so no amplification is claimed.
            self.central = CentralDPAccountant(
                noise_multiplier=settings.central_noise_multiplier,
                sample_rate=1.0,
                delta=1e-5,
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_numpy_ndarrays()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._current = RoundLog(server_round=server_round, started=time.time())
        self._current.devices_sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        round_log = self._round(server_round)
        accepted: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                record_error_reply(self.ledger, self.settings.run_name, round_log, node,
                                   int(msg.error.code), msg.error.reason or "no reason given")
                continue
            try:
                report = msg.content.config_records["report"]
                payload_json = str(report["payload-json"])
                signature = report["signature"]
                device_id = str(report["device-id"])
                update = msg.content.array_records["arrays"]
            except KeyError as missing:
                # Not what keystay's ClientApp sends: nothing in it can be trusted.
                record_error_reply(self.ledger, self.settings.run_name, round_log, node,
                                   ERROR_FAILED, f"reply without {missing}; not a keystay "
                                   "device reply, nothing aggregated")
                continue
            round_log.devices_answered += 1
            verdict = self.ledger.record_report(
                self.settings.run_name,
                server_round,
                payload_json,
                signature if isinstance(signature, bytes) else b"",
            )
            payload = _json_object(payload_json)
            round_log.devices[device_id] = {
                "node": node,
                "epsilon_total": float(payload.get("epsilon_total", float("nan"))),
                "accountant": payload.get("accountant"),
                "verified": bool(verdict.verified),
                "flags": list(verdict.flags),
            }
            round_log.delta = float(payload.get("delta", 0.0))
            if not verdict.ok:
                # Not aggregated: an unverifiable report says nothing we can
                # trust about the privacy the update cost, and an over-budget
                # or contradictory one says it cost too much.
                log(WARNING, "round %s: report from %s does not verify (%s); update dropped",
                    server_round, device_id, ", ".join(verdict.flags))
                continue
            received = weights_sha256(update.to_numpy_ndarrays())
            if payload.get("update_sha256") != received:
                # The signed report accounts for a different update than the
                # one that arrived: aggregate neither.
                round_log.devices[device_id]["flags"].append("update-mismatch")
                log(WARNING, "round %s: update from %s does not match its signed report; "
                    "dropped", server_round, device_id)
                continue
            accepted.append(msg)

        round_log.devices_reported = len(accepted)
        if not accepted:
            return None, None
        updates = [m.content.array_records["arrays"].to_numpy_ndarrays() for m in accepted]
        if self.central is not None:
            new = self._aggregate_central(server_round, updates)
        else:
            new = equal_mean(updates)
        path = self.checkpoints / f"round-{server_round:03d}.pt"
        save_checkpoint(
            path, new, self.model_config, {"run": self.settings.run_name, "round": server_round}
        )
        round_log.checkpoint = str(path)
        # Only what the server itself knows: no device metric is aggregated.
        return ArrayRecord(new), MetricRecord({"devices-aggregated": len(accepted)})

    def _aggregate_central(
        self, server_round: int, updates: list[list[np.ndarray]]
    ) -> list[np.ndarray]:
        assert self.central is not None and self._global is not None
        new = aggregate_with_central_dp(
            self._global,
            updates,
            clip_norm=self.settings.central_clip,
            noise_multiplier=self.settings.central_noise_multiplier,
            rng=self._rng,
            num_sampled=self._round(server_round).devices_sampled,
        )
        self._round(server_round).central_epsilon = account_central_round(
            self.ledger, self.settings, self.central, server_round
        )
        return new

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Never ask devices to score weights, whatever fraction_evaluate says.
        return []

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Score the round's global model on the server's held-out set; write the row.

        Flower's ``evaluate_fn``: called after every round's aggregation (and
        once before round 1, which has no row and is not scored).
        """
        if server_round == 0:
            return None
        round_log = self._round(server_round)
        score = score_and_write(self.evaluator, arrays.to_numpy_ndarrays(), round_log,
                                self.run_dir / ROUNDS_FILE)
        self._current = None
        if score is None:
            return None
        return MetricRecord({
            "heldout-accuracy": score.accuracy, "heldout-loss": score.loss,
            "heldout-windows": score.windows,
        })

    def _round(self, server_round: int) -> RoundLog:
        if self._current is None or self._current.server_round != server_round:
            self._current = RoundLog(server_round=server_round, started=time.time())
        return self._current


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of keystay federated training."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    # Replies are collected as they land, not on Flower's 3 s pull tick.
    grid = prompt_grid(grid)
    (settings.run_dir / "settings.json").write_text(
        json.dumps(settings.as_run_config(), indent=2, sort_keys=True)
    )
    if settings.secagg:
        # Imported here: keystay.server.secagg builds on this module's RoundLog.
        from keystay.server.secagg import run_secagg

        run_secagg(grid, context, settings)
        return
    model_config = ModelConfig()
    ledger = ServerLedger.open(settings.server_dir)
    strategy = KeystayFedAvg(settings, ledger, model_config)
    initial = initial_weights(model_config, settings.seed)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        train_config=ConfigRecord(settings.train_config()),
        evaluate_fn=strategy.evaluate_global,
    )
    final = settings.run_dir / FINAL_CHECKPOINT
    # Every device may have refused or been unreachable every round: the global model is
    # then still the initial one, and the checkpoint says so by being it.
    weights = result.arrays.to_numpy_ndarrays() if len(result.arrays) else initial
    save_checkpoint(
        final,
        weights,
        model_config,
        {"run": settings.run_name, "rounds": settings.num_server_rounds},
    )
    log(INFO, "keystay run %s finished; final model: %s", settings.run_name, final)


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


def _json_object(text: str) -> dict[str, Any]:
    """The report payload as a dict; {} when it is not a JSON object (the ledger
    has then flagged it unverifiable, and nothing in it is used)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
