"""The ClientApp of a virtual node: the deployment ClientApp's reply, the device in-process.

What a virtual node sends back is exactly what :mod:`keystay.client.app`
sends from a real SuperNode: the noised update, ``num-examples`` = 1, the
report's ε copy and the signed report; a refusal, unavailable device or
failure as the same Flower ``Error`` codes (built by the same
:func:`~keystay.client.requests.error_reply`). The only difference is where
``Federation.Train`` is answered: by :meth:`SimulatedDevice.train` in this
process (the daemon's own servicer and core), not over a socket. Virtual
nodes do not evaluate for the federation either.

The node's ``partition-id`` (Flower's simulation numbering, 0 … N−1) picks
the simulated employee in the :class:`Population`.
"""

from __future__ import annotations

from dataclasses import dataclass
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

from keystay.client.app import FEDAVG_WEIGHT, NO_EVALUATE
from keystay.client.requests import error_reply, train_request
from keystay.client.serde import weights_from_proto
from keystay.common.wire import ERROR_REFUSED
from keystay.sim.federation.device import EmployeeData, SimulatedDevice
from keystay.v1 import device_pb2

#: The node-config key Flower's Simulation Engine numbers virtual nodes by.
PARTITION_ID = "partition-id"


@dataclass(frozen=True)
class Population:
    """The simulated employees of a run, one per virtual node, and where their folders are."""

    devices_dir: Path
    employees: tuple[EmployeeData, ...]

    def device(self, partition: int) -> SimulatedDevice:
        return SimulatedDevice(self.devices_dir / f"{partition:05d}", self.employees[partition])


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
