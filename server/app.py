"""The Flower ServerApp: FedAvg over device updates, with their privacy reports.

The server never sees event data. What it receives from each device per
round is a clipped, noised model update, a signed privacy report of what it
cost, and ``num-examples`` = 1 (a public constant: every device weighs the
same). This module aggregates the updates (an equal-weight mean, optionally
user-level central DP on top), records every report in the server ledger
(verifying its signature), and sorts every device that sent no update into
*refused* (its policy said no: recorded in the ledger with its reason),
*unavailable* (its daemon or node could not be reached) or *failed*
(anything else), using the ClientApp's error codes. A device sent the round
that sends nothing back before the round timeout (its daemon, SuperNode or
ClientApp was killed, or the laptop slept) is *unavailable* too, so the
lists always add up to the devices sampled.

It asks devices nothing else. No evaluate message is sent: a device's exact
held-out loss for weights the server picks is an unpaid query on its data.
Instead, after each round's aggregation the ServerApp scores the new global
model on its own held-out set, simulated employees that never train
(:mod:`keystay.server.heldout`). Nor does it read a device's training loss,
time or example count: devices stop sending them, and nothing here needs
them. Per round it writes a checkpoint and one line of ``rounds.jsonl`` that
``keystay round start`` turns into the table an ML engineer reads.

Crash safety (docs/faults.md): checkpoints and ``settings.json`` are written
beside and renamed over (fsynced), so a SIGKILL leaves the old file or the
new one; a row torn by a SIGKILL mid-append is skipped by readers and the
next row starts on a fresh line. A killed ServerApp is not resumed: its run
is failed, and the operator starts a new run; what devices were charged for
it stays charged.

A round is one Flower message phase (train), and its replies are collected
as they land (:class:`keystay.server.grid_poll.PromptGrid`), not on Flower's
3 s pull tick: what a round costs beyond Flower's floor is measured by
``bench/bench_round.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from keystay.common.digest import weights_sha256
from keystay.common.files import write_private
from keystay.common.model import ModelConfig, initial_weights, save_checkpoint
from keystay.common.wire import ERROR_FAILED, ERROR_REFUSED, ERROR_UNAVAILABLE
from keystay.server.central_dp import (
    CentralDPAccountant,
    aggregate_with_central_dp,
)
from keystay.server.grid_poll import prompt_grid
from keystay.server.heldout import (
    HeldoutEvaluator,
)
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.runlog import (
    FAILED,
    FINAL_CHECKPOINT,
    REFUSED,
    ROUNDS_FILE,
    UNAVAILABLE,
    RoundLog,
    account_central_round,
    error_kind,
    heldout_evaluator,
    record_error_reply,
    score_and_write,
)
from keystay.server.secagg import run_secagg
from keystay.server.settings import RunSettings

# Re-exported: the rounds file, its row and the error kinds are this module's
# public face for the CLI and the tests (they live in keystay.server.runlog).
__all__ = [
    "ERROR_FAILED", "ERROR_REFUSED", "ERROR_UNAVAILABLE", "FAILED", "FINAL_CHECKPOINT",
    "REFUSED", "ROUNDS_FILE", "UNAVAILABLE", "RoundLog", "account_central_round", "app",
    "error_kind", "heldout_evaluator", "record_error_reply", "score_and_write",
]

app = ServerApp()

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
            fraction_train=settings.fraction_train,
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
        self._sampled: set[int] = set()  # node ids the current round was sent to
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
        self._sampled = {m.metadata.dst_node_id for m in messages}
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

        # A sampled device that never replied (its daemon, SuperNode or
        # ClientApp died mid-round; a laptop went to sleep) is unavailable:
        # without this it would be in no list, and the row would not add up.
        replied = {msg.metadata.src_node_id for msg in replies}
        for node in sorted(self._sampled - replied):
            round_log.unavailable.append({
                "node": node, "code": None,
                "reason": f"no reply within the round timeout ({self.settings.round_timeout:g} s)",
            })
            log(WARNING, "round %s: device on node %s unavailable: no reply", server_round, node)
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
    # Beside and renamed over: a ServerApp killed here leaves the old file or
    # the new one, never half of one.
    write_private(settings.run_dir / "settings.json",
                  json.dumps(settings.as_run_config(), indent=2, sort_keys=True).encode())
    if settings.employee_day:
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


def _json_object(text: str) -> dict[str, Any]:
    """The report payload as a dict; {} when it is not a JSON object (the ledger
    has then flagged it unverifiable, and nothing in it is used)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
