"""The ClientApp side of SecAgg+: a relay to the daemon, which runs the protocol.

A SecAgg+ run (the employee-day unit, ``SecAggPlusWorkflow`` on the server)
sends four ``train`` messages per round: setup, share keys, collect masked
vectors, unmask. The ClientApp is server-shipped code, so it must not hold
the masking keys, the neighbours' key shares or the update before masking
(Flower's own ``secaggplus_mod`` would keep all three in ``context.state``).
:func:`secagg_train` forwards each stage's ConfigRecord, serialised as Flower
serialises it, to ``Federation.SecAggStage`` on the daemon's socket
(:mod:`keystay.client.daemon.secagg_stages` runs the stage) and wraps the
daemon's ConfigRecord in the reply. For the masking stage it also forwards
the round's global weights and the run's request (σ, C, q, steps), and puts
the daemon's signed privacy report beside the masked vector (a
``fitres.metrics`` record, as Flower's compat layer expects; the server
verifies each report before its vector enters the sum).

Nothing else crosses: no secret, no update in clear, no example count (the
weight is the constant 1, :data:`~keystay.common.wire.SECAGG_WEIGHT`), no
loss, no timing (keys classified in :mod:`keystay.client.federation_fields`).
A refusal comes back as the daemon's public sentence in a Flower ``Error``.
"""

from __future__ import annotations

import grpc
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord

from keystay.client.federation_client import DeviceUnavailableError, FederationClient
from keystay.client.requests import device_socket, error_reply, round_spec
from keystay.client.serde import weights_to_proto
from keystay.common.wire import SECAGG_WEIGHT
from keystay.v1 import device_pb2

__all__ = [
    "SECAGG_WEIGHT", "is_secagg_message", "secagg_train", "stage_reply", "stage_request",
]


def is_secagg_message(msg: Message) -> bool:
    """True for a message of Flower's SecAgg+ protocol (its configs record present)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def stage_request(msg: Message, context: Context) -> device_pb2.SecAggStageRequest:
    """The daemon request for one stage message (weights and spec for masking only).

    The session is named by what every stage message carries: Flower's run
    id, the round (the message's group id) and this SuperNode's node id.

    Raises
    ------
    KeyError, ValueError
        The message lacks what its stage needs.
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    request = device_pb2.SecAggStageRequest(
        run_id=str(msg.metadata.run_id),
        server_round=int(msg.metadata.group_id),
        node_id=int(msg.metadata.dst_node_id),
        configs=config_record_to_proto(configs).SerializeToString(),
    )
    if configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        run_name, server_round, spec = round_spec(ConfigRecord(dict(fitins.config)))
        if server_round != request.server_round:
            raise ValueError(f"fit config round {server_round} is not the message's "
                             f"{request.server_round}")
        request.weights.extend(weights_to_proto(parameters_to_ndarrays(fitins.parameters)))
        request.spec.CopyFrom(spec)
        request.run_name = run_name  # the ledger's run id, as in a plain round
    return request


def secagg_train(msg: Message, context: Context) -> Message:
    """Relay one SecAgg+ stage message to the daemon (see the module docstring)."""
    try:
        request = stage_request(msg, context)
        with FederationClient(device_socket(context)) as device:
            reply = device.secagg_stage(request)
        return stage_reply(msg, reply)
    except (grpc.RpcError, DeviceUnavailableError, KeyError, ValueError) as error:
        return error_reply(msg, error)


def stage_reply(msg: Message, reply: device_pb2.SecAggStageReply) -> Message:
    """The Flower reply to ``msg`` carrying the daemon's stage answer.

    Shared with the simulation's virtual nodes (:mod:`keystay.sim.federation.clientapp`),
    which get ``reply`` from the daemon's servicer in-process.

    Raises
    ------
    ValueError
        The daemon's ConfigRecord does not parse.
    """
    proto = ProtoConfigRecord()
    try:
        proto.ParseFromString(reply.configs)
    except Exception as error:  # protobuf's DecodeError
        raise ValueError(f"the daemon's SecAgg+ reply does not parse: {error}") from None
    result = config_record_from_proto(proto)
    content = RecordDict()
    if reply.HasField("report"):
        report = reply.report
        content = compat.fitres_to_recorddict(
            FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=Parameters(tensors=[], tensor_type=""),
                num_examples=SECAGG_WEIGHT,
                metrics={
                    "device-id": report.device_id,
                    "payload-json": report.payload_json,
                    "signature": bytes(report.signature),
                },
            ),
            keep_input=False,
        )
        for record in content.array_records.values():
            record.clear()  # as Flower's mod does: no arrays beside the masked vector
    content.config_records[RECORD_KEY_CONFIGS] = result
    return Message(content, reply_to=msg)
