"""The Flower ClientApp: a thin caller of the device daemon.

Flower ships this code from the server to every SuperNode and runs whatever it
receives, so nothing here is trusted with data. It never opens the store or
the data folder: it forwards the global weights and the run's request to
``Federation.Train`` on the daemon's federation socket (named by the
SuperNode's ``--node-config socket="..."``) and returns what the daemon
answers. A
refusal travels back to the ServerApp as a Flower ``Error`` whose reason is
the daemon's public sentence (``"refused by device policy: CODE"``).

A SecAgg+ round (the employee-day unit, the default) is relayed stage by
stage to ``Federation.SecAggStage`` (:mod:`keystay.client.secagg`): the
daemon runs the protocol and this code never holds a key, a share or an
update in clear. A record-level round goes to ``Federation.Train``.

What a (record-level) train reply carries (every key classified in
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

from keystay.client.federation_client import DeviceUnavailableError, FederationClient
from keystay.client.requests import device_socket, error_reply, train_request
from keystay.client.secagg import is_secagg_message, secagg_train
from keystay.client.serde import weights_from_proto
from keystay.common.wire import ERROR_FAILED, ERROR_REFUSED, ERROR_UNAVAILABLE

__all__ = ["ERROR_FAILED", "ERROR_REFUSED", "ERROR_UNAVAILABLE", "FEDAVG_WEIGHT", "app"]

#: The reason an evaluate message is declined.
NO_EVALUATE = "this device does not evaluate for the federation"
#: Every device's weight in FedAvg, sent as ``num-examples`` (see the module
#: docstring): a public constant of the protocol, never a count of data.
FEDAVG_WEIGHT = 1

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Forward a training round to the device daemon."""
    if is_secagg_message(msg):
        return secagg_train(msg, context)
    try:
        config = msg.content.config_records["config"]
        weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
        request = train_request(config, weights, context)
        with FederationClient(device_socket(context)) as device:
            reply = device.train(request)
    except (grpc.RpcError, DeviceUnavailableError, KeyError, ValueError) as error:
        return error_reply(msg, error)

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
