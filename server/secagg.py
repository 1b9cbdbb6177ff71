"""SecAgg+ runs: the server learns the sum of the device updates, not one of them.

A run with ``privacy-unit = "employee-day"`` (the default) goes through Flower's SecAgg+ protocol
(``SecAggPlusWorkflow``), which in Flower 1.39 runs on the legacy workflow
API: a ``LegacyContext``, ``DefaultWorkflow(fit_workflow=..., evaluate_workflow=...)``
and a legacy ``flwr.server.strategy.FedAvg``. Each device masks its update
with pairwise masks (agreed with its neighbours) and a private mask, whose
seeds are secret-shared among its neighbours; the server adds the masked
vectors and asks the survivors for just the shares that remove the masks
from the *sum*. The device side runs in each device's daemon
(:mod:`keystay.client.daemon.secagg_stages`), which encodes its update
with its own discrete Gaussian noise (:mod:`keystay.client.employee_day`);
the ClientApp only relays (:mod:`keystay.client.secagg`). Flower's workflow
here is unchanged: the daemon's vector decodes with it.

The encoding ranges (:data:`CLIPPING_RANGE` c, :data:`QUANTIZATION_RANGE` R,
:data:`MODULUS_RANGE` M) are chosen so the sum decodes without wrap-around:
a device sends ``round(γ (U + c)) + noise`` with ``γ = R / 2c``, so the
sum over n devices is ``γ (Σ U + n c) + noise``; it stays in ``[0, M)``
while every coordinate of a device's ``U`` (at most days · C, C ≤ 1) plus
its share of the noise stays within ``±c`` on average, and ``n R (1 + 1/2)
< M`` (n up to 43,000 devices). γC = 2^17 C integer units: the rounding
costs σ less than 0.3 % at the default model (``√D / γC``), and each
device's noise scale ``γσC/√t`` is tens of thousands of units, far above the
discrete Gaussian's limit for the sum to be charged as Gaussian.

What keystay adds around Flower's workflow, and why:

* **Reports before the sum.** A device's signed privacy report travels in
  clear beside its masked vector (Flower's mod clears only the arrays of the
  reply). :meth:`SecAggFedAvg.admit` records each in the server ledger when
  it arrives and drops a masked vector whose report does not verify *before*
  it enters the sum; to the protocol that device simply dropped out, so the
  rule of a plain round holds: an update without a trustworthy report is never
  aggregated.
* **Only the aggregate reaches the strategy.** The workflow hands
  ``aggregate_fit`` one ``FitRes`` per surviving device, all carrying the
  same unmasked *mean*; :meth:`SecAggFedAvg.aggregate_fit` checks that
  structurally and refuses anything else.
* **Equal weights, updates not weights.** Devices send their update
  (``new - global``) with weight 1; the mean of the survivors' updates is
  what comes back (devices no longer add their training loss: an un-noised
  statistic of their data; the server could not read it anyway).
* **Reports bound to the masked bytes.** A device's report carries the
  digest of the masked vector it sent (``update_sha256``); a vector whose
  digest differs is dropped before the sum, like an unverified report.
* **Both ε per day in the row.** Every verified report states, per day it
  charged, the ε against an honest-but-curious server and against one that
  breaks aggregation; the row keeps both means over the days reported.
* **Central DP on the sum** (no longer reachable: ``central-dp`` is refused
  with the employee-day unit, whose noise the devices add) stays for the
  record: :func:`secure_central_dp_step`.
* **Dropouts before the masking stage.** Flower 1.39 tries to rebuild the
  key of every device that was sampled but left before sharing its keys, and
  no device holds shares of it, so the round halts. Such a device never
  masked anything with anyone, so :class:`KeystaySecAggPlusWorkflow` forgets
  it instead.
* **No device evaluation.** After each round the server scores the new
  global model on its own held-out set (:mod:`keystay.server.heldout`) and
  sends devices no evaluate message, as in a plain run; a SecAgg run writes
  the same ``rounds.jsonl`` rows, checkpoints and ``final.pt`` as a plain
  one, plus a ``secagg`` entry per row.
* **Where the time goes.** Each row's ``stage_seconds`` holds the wall
  seconds of the four protocol stages (each from sending to the last reply),
  of the report checks inside them (:meth:`SecAggFedAvg.admit`) and of the
  held-out scoring, so ``bench/bench_round.py`` can set a keystay round
  beside Flower's own SecAgg+ stage by stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from keystay.common.digest import weights_sha256
from keystay.common.model import ModelConfig, initial_weights, save_checkpoint
from keystay.server.central_dp import CentralDP, CentralDPAccountant
from keystay.server.heldout import HeldoutEvaluator
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.runlog import (
    FINAL_CHECKPOINT,
    ROUNDS_FILE,
    RoundLog,
    account_central_round,
    heldout_evaluator,
    record_error_reply,
    score_and_write,
)
from keystay.server.settings import RunSettings

#: ``c``: the offset of every coordinate (see the module docstring).
CLIPPING_RANGE = 64.0
#: ``R``: ``γ = R / 2c = 2**17`` integer units per unit of the update.
QUANTIZATION_RANGE = 2**24
#: ``M``: the masked vectors are added modulo this.
MODULUS_RANGE = 2**40
#: Devices send weight 1, so the workflow's ``max_weight`` is 1 (devices
#: refuse any other).
MAX_WEIGHT = 1.0

Gate = Callable[[list[Message], list[Message]], list[Message]]
#: Told each stage's name and wall seconds (:meth:`SecAggFedAvg.record_stage`).
StageClock = Callable[[str, float], None]


def check_secagg_settings(settings: RunSettings) -> None:
    """Refuse SecAgg+ parameters Flower rejects or that weaken the masking.

    See :meth:`RunSettings.check_secagg`, where ``keystay round start``
    already applies the same rules before submitting.
    """
    settings.check_secagg()


def secure_central_dp_step(
    global_weights: Sequence[np.ndarray],
    mean_update: Sequence[np.ndarray],
    num_summed: int,
    mechanism: CentralDP,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    r"""New global weights from the SecAgg+ mean of clipped updates, with central DP.

    The devices clipped their updates to ``S`` before masking, so the sum
    :math:`\sum_k \tilde\Delta_k = m \cdot \bar\Delta` (``m`` devices summed)
    changes by at most ``S`` when one device is added or removed. As in
    :meth:`keystay.server.central_dp.CentralDP.aggregate`:

    .. math::
        \theta' = \theta + \frac{1}{n}\sum_k \tilde\Delta_k + \mathcal N(0, (zS/n)^2 I)

    with ``n`` = ``mechanism.num_sampled``, the devices the round was sent to.

    Raises
    ------
    ValueError
        More devices summed than sampled, or shapes that do not match.
    """
    if not 0 < num_summed <= mechanism.num_sampled:
        raise ValueError(
            f"{num_summed} devices summed but the round was sent to {mechanism.num_sampled}"
        )
    std = mechanism.noise_std
    new = []
    for g, mean in zip(global_weights, mean_update, strict=True):
        if np.shape(g) != np.shape(mean):
            raise ValueError(f"secure sum has shape {np.shape(mean)} where the model has "
                             f"{np.shape(g)}")
        step = np.asarray(mean, dtype=np.float64) * num_summed / mechanism.num_sampled
        if std > 0:
            step = step + rng.normal(0.0, std, size=step.shape)
        base = np.asarray(g)
        new.append((base.astype(np.float64) + step).astype(base.dtype))
    return new


@dataclass
class SecAggRoundLog(RoundLog):
    """A round's row, plus what the secure aggregation did."""

    secagg: dict[str, Any] = field(default_factory=dict)
    #: (ε honest-but-curious, ε broken aggregation) of every day in every
    #: verified report this round.
    day_epsilons: list[tuple[float, float | None]] = field(default_factory=list)

    def as_json(self) -> str:
        row = json.loads(super().as_json())
        row["secagg"] = self.secagg
        honest, broken = mean_day_epsilons(self.day_epsilons)
        row["epsilon_day_mean"] = honest
        row["epsilon_day_mean_broken_aggregation"] = broken
        return json.dumps(row, sort_keys=True)


def _day_epsilons(payload: dict[str, Any]) -> list[tuple[float, float | None]]:
    """Each charged day's (ε honest, ε broken aggregation) from a verified payload."""
    out: list[tuple[float, float | None]] = []
    for block in payload.get("blocks", []):
        if not isinstance(block, dict) or "epsilon" not in block:
            continue
        broken = block.get("epsilon_broken")
        out.append((float(block["epsilon"]), None if broken is None else float(broken)))
    return out


def mean_day_epsilons(
    days: Sequence[tuple[float, float | None]],
) -> tuple[float | None, float | None]:
    """Mean ε per day under each assumption (None when no day reported it)."""
    honest = [h for h, _ in days]
    broken = [b for _, b in days if b is not None]
    return (float(np.mean(honest)) if honest else None,
            float(np.mean(broken)) if broken else None)


class SecAggFedAvg(FedAvg):
    """The legacy strategy of a SecAgg+ run: configures rounds, keeps the books.

    Parameters
    ----------
    settings : RunSettings
        The validated run configuration (``secagg = true``).
    ledger : ServerLedger
        Where device reports, refusals and central DP are recorded.
    model_config : ModelConfig
        The model the weights belong to (for checkpoints).
    initial : list of numpy.ndarray
        The initial global weights.
    rng : numpy.random.Generator or None
        Central-DP noise source; None draws from OS entropy (never seed it
        from a value others know).
    evaluator : HeldoutEvaluator or None
        Scores each round's global model; None builds one from ``settings``.
    """

    def __init__(
        self,
        settings: RunSettings,
        ledger: ServerLedger,
        model_config: ModelConfig,
        initial: list[np.ndarray],
        rng: np.random.Generator | None = None,
        evaluator: HeldoutEvaluator | None = None,
    ) -> None:
        super().__init__(
            # As a plain run: a fixed count drawn without replacement (at least
            # min-devices); no amplification by this sampling is claimed.
            fraction_fit=settings.fraction_train,
            # No federated evaluation: devices are never asked to score weights.
            fraction_evaluate=0.0,
            min_fit_clients=settings.min_devices,
            min_evaluate_clients=0,
            min_available_clients=settings.min_devices,
            initial_parameters=ndarrays_to_parameters(initial),
            accept_failures=True,
        )
        self.settings = settings
        self.ledger = ledger
        self.model_config = model_config
        self.evaluator = evaluator or heldout_evaluator(settings, model_config)
        self.weights = [np.asarray(w) for w in initial]
        self.checkpoints = settings.run_dir / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._rng = rng if rng is not None else np.random.default_rng()
        self._round: SecAggRoundLog | None = None
        self._sampled: set[int] = set()
        self.central: CentralDPAccountant | None = None
        if settings.central_dp:
            # Every connected device gets every round: q = 1, no amplification.
            self.central = CentralDPAccountant(
                noise_multiplier=settings.central_noise_multiplier, sample_rate=1.0, delta=1e-5
            )

    def __repr__(self) -> str:
        return f"SecAggFedAvg(run={self.settings.run_name!r})"

    # -- configure ------------------------------------------------------------

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        """What every device receives with its training request."""
        config: dict[str, Scalar] = {**self.settings.train_config(), "server-round": server_round}
        return config

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.weights = parameters_to_ndarrays(parameters)
        sampled = super().configure_fit(server_round, parameters, client_manager)
        fit_ins = FitIns(parameters, self.fit_config(server_round))
        instructions = [(proxy, fit_ins) for proxy, _ in sampled]
        self._sampled = {proxy.node_id for proxy, _ in instructions}
        self._round = SecAggRoundLog(server_round=server_round, started=time.time())
        self._round.devices_sampled = len(instructions)
        self._round.secagg = {
            "num_shares": self.settings.secagg_num_shares,
            "threshold": self.settings.secagg_reconstruction_threshold,
            "sampled_nodes": sorted(self._sampled),
            "summed_nodes": [],
            "dropped_nodes": sorted(self._sampled),
            "aggregate_only": None,
        }
        return instructions

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        # Devices are never asked to score weights; evaluate_workflow scores
        # the global model on the server's own held-out set instead.
        return []

    # -- replies ----------------------------------------------------------------

    def admit(self, sent: list[Message], replies: list[Message]) -> list[Message]:
        """Record every reply of the protocol; drop masked vectors whose report fails.

        Called by :class:`KeystaySecAggPlusWorkflow` on each stage's replies.
        Refusals and errors are recorded (the workflow counts them as
        dropouts). A masked-vector reply carries the device's signed report:
        it is verified and recorded here, and removed from ``replies`` unless
        the report is verified and unflagged, so its vector never enters the
        sum (to the protocol, that device dropped out). The time it takes is
        the row's ``stage_seconds["report_checks"]`` (part of the stage's own).
        """
        started = time.perf_counter()
        round_log = self._current()
        server_round = round_log.server_round
        kept: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                record_error_reply(self.ledger, self.settings.run_name, round_log, node,
                                   int(msg.error.code), msg.error.reason or "no reason given")
                kept.append(msg)
                continue
            metrics = msg.content.config_records.get("fitres.metrics")
            if metrics is None or "payload-json" not in metrics:
                kept.append(msg)  # a key-exchange or unmask reply: nothing to record
                continue
            if self._record_report(server_round, node, metrics) and self._bound(
                server_round, node, metrics, msg
            ):
                kept.append(msg)
        spent = round_log.stage_seconds.get("report_checks", 0.0)
        round_log.stage_seconds["report_checks"] = round(
            spent + time.perf_counter() - started, 3)
        return kept

    def _bound(self, server_round: int, node: int, metrics: ConfigRecord, msg: Message) -> bool:
        """True when the signed report names the digest of the masked vector that came."""
        try:
            masked = msg.content.config_records[RECORD_KEY_CONFIGS][SecAggKey.MASKED_PARAMETERS]
            received = weights_sha256([bytes_to_ndarray(b) for b in cast(list[bytes], masked)])
            claimed = json.loads(str(metrics["payload-json"])).get("update_sha256")
        except (KeyError, ValueError, AttributeError):
            received, claimed = "", None
        if claimed == received:
            return True
        device_id = str(metrics.get("device-id", "")) or f"node-{node}"
        entry = self._current().devices.get(device_id)
        if entry is not None:
            entry["flags"].append("update-mismatch")
        log(WARNING, "round %s: masked vector from %s does not match its signed report; "
            "left out of the sum", server_round, device_id)
        return False

    def _record_report(self, server_round: int, node: int, metrics: ConfigRecord) -> bool:
        round_log = self._current()
        payload_json = str(metrics["payload-json"])
        verdict = self.ledger.record_report(
            self.settings.run_name,
            server_round,
            payload_json,
            bytes(cast(bytes, metrics["signature"])),
            node_id=node,
        )
        try:
            payload = json.loads(payload_json)
        except json.JSONDecodeError:
            payload = {}
        payload = payload if isinstance(payload, dict) else {}
        device_id = str(metrics.get("device-id", "")) or f"node-{node}"
        round_log.devices_answered += 1
        round_log.devices[device_id] = {
            "node": node,
            "epsilon_total": float(payload.get("epsilon_total", float("nan"))),
            "accountant": payload.get("accountant"),
            "verified": bool(verdict.verified),
            "flags": list(verdict.flags),
        }
        if verdict.ok:
            round_log.day_epsilons.extend(_day_epsilons(payload))
        if "delta" in payload:
            round_log.delta = float(payload["delta"])
        if not verdict.ok:
            log(WARNING, "round %s: report from %s does not verify (%s); its masked update "
                "is left out of the sum", server_round, device_id, ", ".join(verdict.flags))
        return verdict.ok

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Turn the secure mean into the next global model (and its checkpoint).

        Raises
        ------
        RuntimeError
            The results do not all carry one and the same aggregate: this
            strategy must never be handed an individual update.
        """
        round_log = self._current()
        if not results:
            return None, {}
        aggregate = results[0][1].parameters
        if any(fitres.parameters is not aggregate for _, fitres in results):
            raise RuntimeError(
                "SecAgg+ strategy received individual updates; it only accepts the secure "
                "aggregate (is the fit workflow SecAggPlusWorkflow?)"
            )
        summed = sorted(proxy.node_id for proxy, _ in results)
        round_log.secagg.update(
            aggregate_only=True,
            summed_nodes=summed,
            dropped_nodes=sorted(self._sampled - set(summed)),
        )
        mean = parameters_to_ndarrays(aggregate)
        if len(mean) != len(self.weights):
            raise RuntimeError(
                f"secure aggregate has {len(mean)} arrays; expected the model's "
                f"{len(self.weights)}"
            )
        mean_update = mean
        round_log.devices_reported = len(results)
        if self.central is not None:
            new = self._central_step(server_round, mean_update, len(results))
        else:
            new = [
                (np.asarray(g, dtype=np.float64) + m).astype(np.asarray(g).dtype)
                for g, m in zip(self.weights, mean_update, strict=True)
            ]
        self.weights = new
        path = self.checkpoints / f"round-{server_round:03d}.pt"
        save_checkpoint(path, new, self.model_config,
                        {"run": self.settings.run_name, "round": server_round, "secagg": True})
        round_log.checkpoint = str(path)
        return ndarrays_to_parameters(new), {"devices-summed": len(results)}

    def _central_step(
        self, server_round: int, mean_update: list[np.ndarray], num_summed: int
    ) -> list[np.ndarray]:
        assert self.central is not None
        round_log = self._current()
        mechanism = CentralDP(
            clip_norm=self.settings.central_clip,
            noise_multiplier=self.settings.central_noise_multiplier,
            num_sampled=round_log.devices_sampled,
        )
        new = secure_central_dp_step(self.weights, mean_update, num_summed, mechanism, self._rng)
        round_log.central_epsilon = account_central_round(
            self.ledger, self.settings, self.central, server_round
        )
        return new

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    # -- evaluation and the round's row -----------------------------------------

    def record_stage(self, stage: str, seconds: float) -> None:
        """Note a SecAgg+ stage's wall seconds in the round's row (``stage_seconds``)."""
        self._current().stage_seconds[stage] = round(seconds, 3)

    def evaluate_workflow(self, grid: Grid, context: Context) -> None:
        """Score the new global model on the server's held-out set; write the row.

        Sends devices nothing (see :mod:`keystay.server.heldout` for why).
        """
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        server_round = int(cast(int, cfg[WorkflowKey.CURRENT_ROUND]))
        round_log = self._current(server_round)
        if round_log.secagg.get("aggregate_only") is None:
            round_log.secagg["aggregate_only"] = False
            log(WARNING, "round %s: secure aggregation did not complete; the global model "
                "is unchanged", server_round)
        score_and_write(self.evaluator, self.weights, round_log,
                        self.settings.run_dir / ROUNDS_FILE)
        self._round = None

    def _current(self, server_round: int | None = None) -> SecAggRoundLog:
        if self._round is None or (
            server_round is not None and self._round.server_round != server_round
        ):
            # No configure_fit this round (nobody to sample): an empty row.
            self._round = SecAggRoundLog(server_round=server_round or 0, started=time.time())
        return self._round


class _GatedGrid(Grid):
    """A Grid that passes every batch of replies through ``gate`` (see SecAggFedAvg.admit)."""

    def __init__(self, grid: Grid, gate: Gate) -> None:
        self._grid = grid
        self._gate = gate

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        return self._gate(sent, replies)


class KeystaySecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ fit workflow, with keystay's report gate and early-dropout fix.

    Parameters
    ----------
    gate : callable
        ``gate(sent, replies) -> replies`` applied to every stage's replies
        (:meth:`SecAggFedAvg.admit`).
    num_shares, reconstruction_threshold : int
        SecAgg+ neighbourhood size and share threshold (see
        :func:`check_secagg_settings`).
    timeout : float
        Seconds to wait for each stage's replies; a device that has not
        answered by then has dropped out of the round.
    clock : callable or None
        ``clock(stage, seconds)`` after each stage (setup, share_keys,
        collect_masked_vectors, unmask), for the round's ``stage_seconds``.
    """

    def __init__(
        self, gate: Gate, *, num_shares: int, reconstruction_threshold: int, timeout: float,
        clock: StageClock | None = None,
    ) -> None:
        super().__init__(
            num_shares,
            reconstruction_threshold,
            max_weight=MAX_WEIGHT,
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE,
            timeout=timeout,
        )
        self._gate = gate
        self._clock = clock

    def __call__(self, grid: Grid, context: Context) -> None:
        super().__call__(_GatedGrid(grid, self._gate), context)

    def _timed(self, name: str, started: float) -> None:
        if self._clock is not None:
            self._clock(name, time.perf_counter() - started)

    def _check_threshold(self, state: WorkflowState) -> bool:
        # Flower checks each sampled device's neighbours only: once every
        # device has refused (and been forgotten) that check passes vacuously
        # and the unmask stage fails on an empty sum. Halt instead.
        if len(state.active_node_ids) < 2:
            log(WARNING, "SecAgg+: %s device(s) left in the round; halted",
                len(state.active_node_ids))
            return False
        return super()._check_threshold(state)

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        started = time.perf_counter()
        ok = super().setup_stage(grid, context, state)
        self._timed("setup", started)
        if not state.sampled_node_ids:
            return ok  # nothing sampled: the round was cancelled
        _forget_early_dropouts(state)
        return self._check_threshold(state)

    def share_keys_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        started = time.perf_counter()
        super().share_keys_stage(grid, context, state)
        self._timed("share_keys", started)
        _forget_early_dropouts(state)
        return self._check_threshold(state)

    def collect_masked_vectors_stage(
        self, grid: Grid, context: LegacyContext, state: WorkflowState
    ) -> bool:
        started = time.perf_counter()
        ok = super().collect_masked_vectors_stage(grid, context, state)
        self._timed("collect_masked_vectors", started)
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        started = time.perf_counter()
        ok = super().unmask_stage(grid, context, state)
        self._timed("unmask", started)
        return ok


def _forget_early_dropouts(state: WorkflowState) -> None:
    """Forget devices that left before their key shares went out.

    A device that did not answer setup or share-keys distributed no shares
    and was never given anyone's; the survivors add pairwise masks only with
    devices whose shares they received. Nothing of it is in any masked vector,
    so there is nothing to rebuild, and Flower's attempt to rebuild its key
    (from shares nobody holds) would halt the round.
    """
    gone = state.sampled_node_ids - state.active_node_ids
    if not gone:
        return
    state.sampled_node_ids = set(state.active_node_ids)
    for node in gone:
        state.nid_to_neighbours.pop(node, None)
    for neighbours in state.nid_to_neighbours.values():
        neighbours -= gone
    log(INFO, "SecAgg+: %s device(s) left before sharing keys: %s", len(gone), sorted(gone))


def run_secagg(grid: Grid, context: Context, settings: RunSettings) -> None:
    """Run ``num-server-rounds`` keystay rounds through SecAgg+ (ServerApp entry point).

    Writes the same ``rounds.jsonl`` rows, per-round checkpoints and
    ``final.pt`` as a plain run, so ``keystay round start`` prints the same
    table.

    Raises
    ------
    SettingsError
        SecAgg+ parameters that Flower rejects or that weaken the masking.
    """
    check_secagg_settings(settings)
    model_config = ModelConfig()
    ledger = ServerLedger.open(settings.server_dir)
    try:
        strategy = SecAggFedAvg(
            settings, ledger, model_config, initial_weights(model_config, settings.seed)
        )
        legacy = LegacyContext(
            context,
            config=ServerConfig(num_rounds=settings.num_server_rounds,
                                round_timeout=settings.round_timeout),
            strategy=strategy,
        )
        workflow = DefaultWorkflow(
            fit_workflow=KeystaySecAggPlusWorkflow(
                strategy.admit,
                num_shares=settings.secagg_num_shares,
                reconstruction_threshold=settings.secagg_reconstruction_threshold,
                timeout=settings.round_timeout,
                clock=strategy.record_stage,
            ),
            evaluate_workflow=strategy.evaluate_workflow,
        )
        log(INFO, "keystay run %s: SecAgg+ with %s shares, threshold %s", settings.run_name,
            settings.secagg_num_shares, settings.secagg_reconstruction_threshold)
        workflow(grid, legacy)
        final = settings.run_dir / FINAL_CHECKPOINT
        save_checkpoint(final, strategy.weights, model_config,
                        {"run": settings.run_name, "rounds": settings.num_server_rounds,
                         "secagg": True})
        log(INFO, "keystay run %s finished; final model: %s", settings.run_name, final)
    finally:
        ledger.close()

