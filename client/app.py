"""The Flower ClientApp: a thin caller of the device daemon.

Flower ships this code from the server to every SuperNode and runs whatever it
receives, so nothing here is trusted with data. It never opens the store or
the data folder: it forwards the global weights and the run's request to
``Federation.Train`` on the daemon's federation socket (named by the
SuperNode's ``--node-config socket="..."``) and returns what the daemon
answers. A
refusal travels back to the ServerApp as a Flower ``Error`` whose reason is
the daemon's public sentence (``"refused by device policy: CODE"``).

What a train reply carries (every key classified in
:mod:`keystay.client.federation_fields`, and a test walks the reply):

* ``arrays``: the DP-noised weights;
* ``report``: the device id, the signed report's payload and signature;
* ``metrics``: ``num-examples`` = :data:`FEDAVG_WEIGHT` and
  ``epsilon-total``, a copy of the signed report's figure.

``num-examples`` is a public constant, 1, not the device's window count:
every device's update weighs the same in FedAvg. A true count is a fact
about the employee's data that no DP mechanism paid for (and weighting by it
would let one device with many windows dominate the average, which user-level
DP clips away anyway). The loss, the training time and the held-out scores
are not sent at all: they were exact, free queries on the data.

There is no evaluation for the federation: a server that sends an
``evaluate`` message gets an error reply, without the daemon being asked.
The employee evaluates locally (``keystay device evaluate``, on the control
socket); the server evaluates on its own held-out data.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
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

from keystay.client.federation_client import DeviceUnavailableError, FederationClient
from keystay.client.secagg import is_secagg_message, secagg_train
from keystay.client.serde import weights_from_proto, weights_to_proto
from keystay.v1 import device_pb2

# Codes for Flower's Error.code, so the ServerApp can tell a policy decision
# from a broken device.
ERROR_REFUSED = 4001
ERROR_UNAVAILABLE = 4002
ERROR_FAILED = 4003
#: The reason an evaluate message is declined.
NO_EVALUATE = "this device does not evaluate for the federation"
#: Every device's weight in FedAvg, sent as ``num-examples`` (see the module
#: docstring): a public constant of the protocol, never a count of data.
FEDAVG_WEIGHT = 1

app = ClientApp()


def _socket(context: Context) -> Path:
    socket = context.node_config.get("socket")
    if not isinstance(socket, str) or not socket:
        raise DeviceUnavailableError(
            "this SuperNode has no 'socket' in its --node-config; start it through "
            "'keystay device run --superlink ...' so it knows its daemon"
        )
    return Path(socket)


def _number(config: ConfigRecord, key: str) -> float:
    if key not in config:
        # e.g. a server from before "sample-rate" replaced "batch-size".
        raise ValueError(f"run config has no '{key}'; this device needs it")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"run config '{key}' = {value!r} is not a number")
    return float(value)


def _spec(config: ConfigRecord) -> device_pb2.TrainSpec:
    blocks = str(config.get("blocks", "") or "")
    return device_pb2.TrainSpec(
        noise_multiplier=_number(config, "noise-multiplier"),
        max_grad_norm=_number(config, "max-grad-norm"),
        local_steps=int(_number(config, "local-steps")),
        sample_rate=_number(config, "sample-rate"),
        learning_rate=_number(config, "learning-rate"),
        dp=bool(config["dp"]),
        blocks=[b.strip() for b in blocks.split(",") if b.strip()],
    )


def train_request(
    config: ConfigRecord, weights: list[np.ndarray], context: Context
) -> device_pb2.TrainRequest:
    """The Device.Train request for one round (shared with the SecAgg+ path)."""
    return device_pb2.TrainRequest(
        run_id=str(config.get("run-name", context.run_id)),
        server_round=_round(config),
        weights=weights_to_proto(weights),
        spec=_spec(config),
    )


def _round(config: ConfigRecord) -> int:
    value = _number(config, "server-round")
    # The proto field is uint64: a negative or huge round would raise inside
    # protobuf; the daemon checks the range it accepts.
    if not value.is_integer() or not 0 <= value < 2**64:
        raise ValueError(f"run config 'server-round' = {value!r} is not a round number")
    return int(value)


def _error_reply(msg: Message, error: Exception) -> Message:
    if isinstance(error, grpc.RpcError):
        code = error.code()
        refused = code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)
        unavailable = code == grpc.StatusCode.UNAVAILABLE
        reason = error.details() or str(code)
        error_code = (
            ERROR_REFUSED if refused else ERROR_UNAVAILABLE if unavailable else ERROR_FAILED
        )
        return Message(error=Error(code=error_code, reason=reason), reply_to=msg)
    if isinstance(error, DeviceUnavailableError):
        return Message(error=Error(code=ERROR_UNAVAILABLE, reason=str(error)), reply_to=msg)
    return Message(error=Error(code=ERROR_FAILED, reason=str(error)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Forward a training round to the device daemon."""
    if is_secagg_message(msg):
        return secagg_train(msg, context)
    try:
        config = msg.content.config_records["config"]
        weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
        request = train_request(config, weights, context)
        with FederationClient(_socket(context)) as device:
            reply = device.train(request)
    except (grpc.RpcError, DeviceUnavailableError, KeyError, ValueError) as error:
        return _error_reply(msg, error)

    report = reply.report
    content = RecordDict(
        {
            "arrays": ArrayRecord(weights_from_proto(reply.weights)),
            "metrics": MetricRecord(
                {
                    "num-examples": FEDAVG_WEIGHT,
                    "epsilon-total": float(report.epsilon_total),
                }
            ),
            "report": ConfigRecord(
                {
                    "device-id": report.device_id,
                    "payload-json": report.payload_json,
                    "signature": bytes(report.signature),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Decline: this device does not evaluate for the federation (see the module docstring).

    Not even asked of the daemon: a held-out loss or accuracy is an exact
    statistic of the employee's data that no DP mechanism paid for.
    """
    return Message(error=Error(code=ERROR_REFUSED, reason=NO_EVALUATE), reply_to=msg)
