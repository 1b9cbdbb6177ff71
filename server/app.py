"""The Flower ServerApp: FedAvg over device updates, with their privacy reports.

The server never sees event data. What it receives from each device per
round is a clipped, noised model update, the number of windows it was
computed on, and a signed privacy report. This module aggregates the updates
(FedAvg, optionally user-level central DP on top), records every report in the
server ledger (verifying its signature), records every refusal with the
device's reason, scores the new global model through each device's held-out
windows, and writes, per round, a checkpoint and one line of ``rounds.jsonl``
that ``keystay round start`` turns into the table an ML engineer reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
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
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.settings import RunSettings

app = ServerApp()

ROUNDS_FILE = "rounds.jsonl"
FINAL_CHECKPOINT = "final.pt"


@dataclass
class RoundLog:
    """What one round produced, as written to ``rounds.jsonl``."""

    server_round: int
    started: float
    devices_sampled: int = 0
    devices_reported: int = 0
    train_loss_mean: float | None = None
    refusals: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    central_epsilon: float | None = None
    delta: float | None = None
    checkpoint: str = ""

    def as_json(self) -> str:
        return json.dumps(
            {
                "round": self.server_round,
                "seconds": round(time.time() - self.started, 3),
                "devices_sampled": self.devices_sampled,
                "devices_reported": self.devices_reported,
                "train_loss_mean": self.train_loss_mean,
                "refusals": self.refusals,
                "devices": self.devices,
                "central_epsilon": self.central_epsilon,
                "delta": self.delta,
                "checkpoint": self.checkpoint,
            },
            sort_keys=True,
        )


class KeystayFedAvg(FedAvg):
    """FedAvg that also keeps the privacy books.

    Parameters
    ----------
    settings : RunSettings
        The validated run configuration.
    ledger : ServerLedger
        Where every device report and refusal is recorded and verified.
    model_config : ModelConfig
        The model the weights belong to (for checkpoints).
    """

    def __init__(
        self, settings: RunSettings, ledger: ServerLedger, model_config: ModelConfig
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=settings.min_devices,
            min_evaluate_nodes=settings.min_devices,
            min_available_nodes=settings.min_devices,
            weighted_by_key="num-examples",
        )
        self.settings = settings
        self.ledger = ledger
        self.model_config = model_config
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
                reason = msg.error.reason or "no reason given"
                round_log.refusals.append({"node": node, "code": msg.error.code, "reason": reason})
                self.ledger.record_refusal(self.settings.run_name, server_round, str(node), reason)
                log(WARNING, "round %s: device on node %s declined: %s", server_round, node, reason)
                continue
            report = msg.content.config_records["report"]
            signature = report["signature"]
            verdict = self.ledger.record_report(
                self.settings.run_name,
                server_round,
                str(report["payload-json"]),
                signature if isinstance(signature, bytes) else b"",
            )
            payload = json.loads(str(report["payload-json"]))
            device_id = str(report["device-id"])
            metrics = msg.content.metric_records["metrics"]
            round_log.devices[device_id] = {
                "node": node,
                # Devices no longer send their loss or window count (exact
                # facts about their data); num-examples is the constant 1.
                "train_loss": None,
                "fedavg_weight": int(_scalar(metrics, "num-examples")),
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
            received = weights_sha256(msg.content.array_records["arrays"].to_numpy_ndarrays())
            if payload.get("update_sha256") != received:
                # The signed report accounts for a different update than the
                # one that arrived: aggregate neither.
                round_log.devices[device_id]["flags"].append("update-mismatch")
                log(WARNING, "round %s: update from %s does not match its signed report; "
                    "dropped", server_round, device_id)
                continue
            accepted.append(msg)

        round_log.devices_reported = len(accepted)
        round_log.train_loss_mean = None

        if not accepted:
            return None, None
        arrays: ArrayRecord | None
        aggregated_metrics: MetricRecord | None
        if self.central is not None:
            arrays = self._aggregate_central(server_round, accepted)
            aggregated_metrics = self.train_metrics_aggr_fn(
                [m.content for m in accepted], self.weighted_by_key
            )
        else:
            arrays, aggregated_metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None:
            path = self.checkpoints / f"round-{server_round:03d}.pt"
            save_checkpoint(
                path,
                arrays.to_numpy_ndarrays(),
                self.model_config,
                {"run": self.settings.run_name, "round": server_round},
            )
            round_log.checkpoint = str(path)
        return arrays, aggregated_metrics

    def _aggregate_central(self, server_round: int, accepted: list[Message]) -> ArrayRecord:
        assert self.central is not None and self._global is not None
        updates = [m.content.array_records["arrays"].to_numpy_ndarrays() for m in accepted]
        examples = [int(_scalar(m.content.metric_records["metrics"], "num-examples"))
                    for m in accepted]
        new = aggregate_with_central_dp(
            self._global,
            updates,
            examples,
            clip_norm=self.settings.central_clip,
            noise_multiplier=self.settings.central_noise_multiplier,
            rng=self._rng,
            num_sampled=self._round(server_round).devices_sampled,
        )
        self._round(server_round).central_epsilon = account_central_round(
            self.ledger, self.settings, self.central, server_round
        )
        return ArrayRecord(new)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        round_log = self._round(server_round)
        for msg in replies:
            if msg.has_error():
                continue
            device_id = str(msg.content.config_records["device"]["device-id"])
            metrics = msg.content.metric_records["metrics"]
            entry = round_log.devices.setdefault(device_id, {"node": msg.metadata.src_node_id})
            entry["heldout_accuracy"] = _scalar(metrics, "heldout-accuracy")
            entry["heldout_loss"] = _scalar(metrics, "heldout-loss")
            entry["heldout_examples"] = int(_scalar(metrics, "num-examples"))
        aggregated = super().aggregate_evaluate(server_round, replies)
        with (self.run_dir / ROUNDS_FILE).open("a", encoding="utf-8") as out:
            out.write(round_log.as_json() + "\n")
        log(INFO, "round %s: %s", server_round, round_log.as_json())
        self._current = None
        return aggregated

    def _round(self, server_round: int) -> RoundLog:
        if self._current is None or self._current.server_round != server_round:
            self._current = RoundLog(server_round=server_round, started=time.time())
        return self._current


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of keystay federated training."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    settings.run_dir.mkdir(parents=True, exist_ok=True)
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
        evaluate_config=ConfigRecord({"run-name": settings.run_name}),
    )
    final = settings.run_dir / FINAL_CHECKPOINT
    # Every device may have declined every round: the global model is then
    # still the initial one, and the checkpoint says so by being it.
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


def _scalar(metrics: MetricRecord, key: str) -> float:
    value = metrics[key]
    if not isinstance(value, int | float):
        raise ValueError(f"metric '{key}' = {value!r} is not a number")
    return float(value)

