"""The ClientApp of a virtual node: the deployment ClientApp's reply, the device in-process.

What a virtual node sends back is exactly what :mod:`keystay.client.app`
sends from a real SuperNode. In an employee-day run (the default) that is
each SecAgg+ stage's answer, built from the same request and into the same
reply as the deployment's relay (:func:`keystay.client.secagg.stage_request`
and :func:`~keystay.client.secagg.stage_reply`): keys, encrypted shares,
the masked vector with the signed report, the unmasking shares. In a
record-level run it is the noised update, ``num-examples`` = 1, the
report's ε copy and the signed report. A refusal, unavailable device or
failure comes back as the same Flower ``Error`` codes (built by the same
:func:`~keystay.client.requests.error_reply`). The only difference is where
the device answers: :meth:`SimulatedDevice.secagg_stage` and
:meth:`SimulatedDevice.train` call the daemon's own servicer and core in
this process, not over a socket. Virtual nodes do not evaluate for the
federation either.

A virtual node's four SecAgg+ stages may run in different Ray actors, so
its session (the keys and shares the daemon would keep in memory) waits
between stages in the node's Flower context (``context.state``, record
:data:`SESSIONS_RECORD`), which Flower's engine keeps per node, as Flower's
own SecAgg+ mod keeps its state there.

The node's ``partition-id`` (Flower's simulation numbering, 0 … N−1) picks
the simulated employee in the :class:`Population`. Each answered message,
refusals included, is counted for the driver's progress line (round and
stage only: :mod:`keystay.sim.federation.progress`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from keystay.client.app import FEDAVG_WEIGHT, NO_EVALUATE
from keystay.client.policy import DevicePolicy
from keystay.client.requests import error_reply, train_request
from keystay.client.secagg import is_secagg_message, stage_reply, stage_request
from keystay.client.serde import weights_from_proto
from keystay.common.wire import CONFIG_SERVER_ROUND, ERROR_REFUSED
from keystay.sim.federation import progress
from keystay.sim.federation.device import EmployeeData, SimulatedDevice
from keystay.v1 import device_pb2

#: The node-config key Flower's Simulation Engine numbers virtual nodes by.
PARTITION_ID = "partition-id"
#: The ``context.state`` record where a virtual node's SecAgg+ session waits.
SESSIONS_RECORD = "keystay-sim-secagg-sessions"


@dataclass(frozen=True)
class Population:
    """The simulated employees of a run, one per virtual node, and where their folders are."""

    devices_dir: Path
    employees: tuple[EmployeeData, ...]
    #: Every device's policy (its privacy unit is the run's).
    policy: DevicePolicy = field(default_factory=DevicePolicy)

    def device(self, partition: int) -> SimulatedDevice:
        return SimulatedDevice(self.devices_dir / f"{partition:05d}", self.employees[partition],
                               policy=self.policy)


def secagg_reply(msg: Message, context: Context, device: SimulatedDevice) -> Message:
    """One SecAgg+ stage of a virtual node, as the deployment relay answers it."""
    state = context.state.config_records
    if SESSIONS_RECORD not in state:
        state[SESSIONS_RECORD] = ConfigRecord()
    sessions = state[SESSIONS_RECORD]
    try:
        reply = device.secagg_stage(stage_request(msg, context), sessions)  # type: ignore[arg-type]
        return stage_reply(msg, reply)
    except (grpc.RpcError, KeyError, ValueError) as error:  # as keystay.client.secagg files
        return error_reply(msg, error)


def reply_content(reply: device_pb2.TrainReply) -> RecordDict:
    """A ``TrainReply`` as the deployment ClientApp returns it to the ServerApp."""
    report = reply.report
    return RecordDict({
        "arrays": ArrayRecord(weights_from_proto(reply.weights)),
        "metrics": MetricRecord({
            "num-examples": FEDAVG_WEIGHT,
            "epsilon-total": float(report.epsilon_total),
        }),
        "report": ConfigRecord({
            "device-id": report.device_id,
            "payload-json": report.payload_json,
            "signature": bytes(report.signature),
        }),
    })


def client_app(population: Population) -> ClientApp:
    """The ClientApp whose virtual nodes are ``population``'s devices."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = answer(msg, context)
        # Counted after the answer, refusals included: the driver's progress line.
        progress.record(population.devices_dir, _round(msg), _stage(msg))
        return reply

    def answer(msg: Message, context: Context) -> Message:
        if is_secagg_message(msg):
            return secagg_reply(msg, context,
                                population.device(int(context.node_config[PARTITION_ID])))
        try:
            config = msg.content.config_records["config"]
            weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
            request = train_request(config, weights, context)
            device = population.device(int(context.node_config[PARTITION_ID]))
            reply = device.train(request)
        except (grpc.RpcError, KeyError, ValueError) as error:  # as keystay.client.app files
            return error_reply(msg, error)
        return Message(content=reply_content(reply), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(error=Error(code=ERROR_REFUSED, reason=NO_EVALUATE), reply_to=msg)

    return app


def _round(msg: Message) -> int:
    """The message's round, 0 when it names none.

    A plain round names it in its config record (``server-round``, as the
    device reads it); SecAgg+ stage messages in Flower's group id.
    """
    if not is_secagg_message(msg):
        with contextlib.suppress(KeyError, ValueError):
            value = msg.content.config_records["config"][CONFIG_SERVER_ROUND]
            if isinstance(value, int | float | str):
                return int(value)
    with contextlib.suppress(ValueError):
        return int(msg.metadata.group_id)
    return 0


def _stage(msg: Message) -> str:
    """The SecAgg+ stage the message asks for, or ``train`` for a plain round."""
    if is_secagg_message(msg):
        return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "unknown"))
    return "train"
