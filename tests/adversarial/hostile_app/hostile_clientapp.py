"""A hostile ClientApp: the code a malicious server ships to every device.

Flower runs whatever ClientApp the server submits on each SuperNode, as the
SuperNode's user, with the SuperNode's ``--node-config``. keystay's answer is
that this code can reach the daemon only through ``federation.sock``, whose
one RPC is ``Federation.Train``, and that every Train request is checked
against the device policy and charged before anything leaves. This app
tests that from the attacker's side: it tries every channel the issue "Only
what the ledger paid for leaves the device" lists and sends back what it got
as ConfigRecord strings, which is the exfiltration path a real attacker has.

On a ``train`` message it

* calls every Control RPC name (Status, Show, Export, Pause, Resume, Forget,
  Policy, Evaluate) under the ``Control``, ``Federation`` and ``Device``
  service names on the federation socket, with empty requests (an empty
  ``PauseRequest`` pauses indefinitely, an empty ``ForgetRequest`` is a
  forget: those are the attacks);
* connects to ``control.sock`` beside the federation socket and calls the
  read-only ``Status`` and ``Policy`` there (nothing that changes the
  device: in the single-user mode the test devices run in, the same uid may
  use that socket, which keystay documents as no guarantee against the
  server; the test records it and asserts nothing on it);
* asks ``Federation.SecAggStage`` for a masked update without the protocol
  behind it (:data:`SECAGG_PROBES`): a masking stage with no setup, a forged
  setup whose threshold would let one device be unmasked, then a masking
  stage on it, and an unmask before any vector was sent;
* sends Train requests meant as exact queries (:data:`TRAIN_PROBES`), each
  with its own ``server_round`` so a charge in the ledger names its probe,
  and records the status code, the details and, for an accepted reply, every
  field the reply carries (recursively) and the signed payload's keys.

On an ``evaluate`` message it tries the federation socket's ``Evaluate``
names; it replies with the figures if any answered, with an error otherwise.

The module imports only Flower, gRPC, NumPy and keystay's generated protobuf
code (which an attacker could ship too): nothing of the device side.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message as ProtoMessage

from keystay.v1 import device_pb2

app = ClientApp()

#: Every Control RPC, tried on the federation socket under each service name.
CONTROL_METHODS = ("Status", "Show", "Export", "Pause", "Resume", "Forget", "Policy",
                   "Evaluate")
SERVICES = ("keystay.v1.Control", "keystay.v1.Federation", "keystay.v1.Device")
#: Read-only calls tried on control.sock (nothing that would change the device).
CONTROL_SOCKET_METHODS = ("Status", "Policy")
#: The error code of this app's evaluate reply when nothing answered.
NO_EVALUATION = 4999

SpecChange = dict[str, Any]
WeightsChange = Callable[[list[np.ndarray]], list[np.ndarray]]


def _same(weights: list[np.ndarray]) -> list[np.ndarray]:
    return weights


def _nan(weights: list[np.ndarray]) -> list[np.ndarray]:
    out = [w.copy() for w in weights]
    out[0].flat[0] = np.nan
    return out


def _wrong_shape(weights: list[np.ndarray]) -> list[np.ndarray]:
    return [np.zeros((3, 3), dtype=weights[0].dtype), *weights[1:]]


#: name -> (server_round, TrainSpec changes, weights change, raw seed field?).
#: Rounds are distinct so that a charge in the ledger names its probe.
TRAIN_PROBES: dict[str, tuple[int, SpecChange, WeightsChange, bool]] = {
    # Noise so large the update carries nothing, but q = 1 and one step: an
    # attacker's "count the data" query if the device priced it as free.
    "huge-sigma-q1-one-step": (1, {"noise_multiplier": 1e6, "sample_rate": 1.0,
                                   "local_steps": 1}, _same, False),
    "q1": (2, {"sample_rate": 1.0}, _same, False),
    "lr-zero": (3, {"learning_rate": 0.0}, _same, False),
    "lr-negative": (4, {"learning_rate": -0.01}, _same, False),
    "nan-weights": (5, {}, _nan, False),
    "wrong-shapes": (6, {}, _wrong_shape, False),
    "round-2^63": (2**63, {}, _same, False),
    "round-2^64-1": (2**64 - 1, {}, _same, False),
    "unknown-block": (7, {"blocks": ["1999-01-01"]}, _same, False),
    "path-block": (8, {"blocks": ["../../ledger.v1.sqlite"]}, _same, False),
    "no-dp": (9, {"dp": False}, _same, False),
    # The extreme the default policy admits: largest σ, largest q, one step.
    "policy-edge": (10, {"noise_multiplier": 10.0, "sample_rate": 0.25,
                         "local_steps": 1}, _same, False),
    # An honest request plus the reserved field 8 ("seed") as raw bytes: the
    # proto has no seed, so the daemon must ignore it (it draws its own).
    "seed-field": (11, {"local_steps": 1}, _same, True),
}
HONEST_SPEC: SpecChange = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "local_steps": 2,
                           "sample_rate": 0.05, "learning_rate": 0.01, "dp": True}


def _tensors(weights: list[np.ndarray]) -> list[device_pb2.Tensor]:
    return [device_pb2.Tensor(shape=list(w.shape), dtype=w.dtype.str,
                              data=np.ascontiguousarray(w).tobytes()) for w in weights]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def train_request_bytes(run_id: str, weights: list[np.ndarray], probe: str) -> bytes:
    """The wire bytes of one probe's ``TrainRequest``."""
    server_round, change, reweigh, seed = TRAIN_PROBES[probe]
    spec = device_pb2.TrainSpec(**{**HONEST_SPEC, **change})
    head = device_pb2.TrainRequest(run_id=run_id, server_round=server_round,
                                   weights=_tensors(reweigh(weights)))
    spec_bytes = spec.SerializeToString()
    if seed:
        # Field 8, varint (tag 0x40): the reserved "seed", set to 1234.
        spec_bytes += b"\x40" + _varint(1234)
    # Field 4 (spec), length-delimited (tag 0x22).
    return head.SerializeToString() + b"\x22" + _varint(len(spec_bytes)) + spec_bytes


def present_fields(message: ProtoMessage) -> list[str]:
    """Every ``Message.field`` a reply carries, recursively (as the tests name them)."""
    out: set[str] = set()
    for field, value in message.ListFields():
        out.add(f"{message.DESCRIPTOR.name}.{field.name}")
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                out |= set(present_fields(item))
    return sorted(out)


def _call(socket: Path, method: str, request: bytes, timeout: float) -> tuple[str, str, bytes]:
    """``(status code name, details, reply bytes)`` of one raw unary call."""
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        rpc = channel.unary_unary(method)  # no (de)serializers: raw bytes both ways
        try:
            reply = rpc(request, timeout=timeout)
        except grpc.RpcError as error:
            return error.code().name, error.details() or "", b""
        return "OK", "", reply


def probe_channels(socket: Path) -> dict[str, dict[str, str]]:
    """Every Control RPC name on the federation socket, then read-only calls on control.sock."""
    out: dict[str, dict[str, str]] = {}
    for service in SERVICES:
        for method in CONTROL_METHODS:
            code, details, reply = _call(socket, f"/{service}/{method}", b"", 10.0)
            out[f"federation:{service}/{method}"] = {"code": code, "details": details,
                                                     "reply_bytes": str(len(reply))}
    control = socket.parent / "control.sock"
    for method in CONTROL_SOCKET_METHODS:
        code, details, reply = _call(control, f"/keystay.v1.Control/{method}", b"", 10.0)
        out[f"control:{method}"] = {"code": code, "details": details,
                                    "reply_bytes": str(len(reply))}
    return out


def probe_train(socket: Path, run_id: str, weights: list[np.ndarray]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for probe in TRAIN_PROBES:
        code, details, raw = _call(socket, "/keystay.v1.Federation/Train",
                                   train_request_bytes(run_id, weights, probe), 300.0)
        entry: dict[str, Any] = {"round": str(TRAIN_PROBES[probe][0]), "code": code,
                                 "details": details}
        if code == "OK":
            reply = device_pb2.TrainReply.FromString(raw)
            entry["fields"] = present_fields(reply)
            entry["payload_keys"] = sorted(json.loads(reply.report.payload_json or "{}"))
            entry["payload_blocks_keys"] = sorted(
                {k for b in json.loads(reply.report.payload_json or "{}").get("blocks", [])
                 for k in b})
        out[probe] = entry
    return out


#: name -> (server_round, stage configs). Each a SecAggStage call of its own;
#: "forged-setup-then-mask" sends its setup first, then the masking stage.
SECAGG_PROBES: dict[str, tuple[int, list[dict[str, Any]]]] = {
    "mask-without-setup": (101, [{"stage": "collect_masked_vectors", "ctxts": [b"x"],
                                  "srcs": [1]}]),
    "forged-setup-then-mask": (102, [
        {"stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 1,
         "clipping_range": 64.0, "target_range": 2**24, "mod_range": 2**40,
         "max_weight": 1.0},
        {"stage": "collect_masked_vectors", "ctxts": [b"x"], "srcs": [1]},
    ]),
    "unmask-without-vector": (103, [{"stage": "unmask", "active_nids": [1, 2, 3],
                                     "dead_nids": []}]),
}


def probe_secagg(socket: Path, run_id: str, weights: list[np.ndarray]) -> dict[str, Any]:
    """Every SecAgg+ probe's calls: ``[{code, details}, ...]`` in order."""
    from flwr.common.serde import config_record_to_proto

    out: dict[str, Any] = {}
    for probe, (server_round, stages) in SECAGG_PROBES.items():
        calls = []
        for configs in stages:
            request = device_pb2.SecAggStageRequest(
                run_id="hostile", server_round=server_round, node_id=1, run_name=run_id,
                configs=config_record_to_proto(ConfigRecord(configs)).SerializeToString(),
                weights=_tensors(weights),
                spec=device_pb2.TrainSpec(privacy_unit="employee-day", noise_multiplier=1.0,
                                          update_clip=0.5, day_sample_rate=1.0,
                                          local_steps=1, sample_rate=0.05,
                                          learning_rate=0.01, max_grad_norm=1.0, dp=True),
            )
            code, details, raw = _call(socket, "/keystay.v1.Federation/SecAggStage",
                                       request.SerializeToString(), 120.0)
            calls.append({"code": code, "details": details, "reply_bytes": len(raw)})
        out[probe] = calls
    return out


def _socket(context: Context) -> Path:
    return Path(str(context.node_config.get("socket", "")))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Try every channel; send back everything it got, as strings."""
    socket = _socket(context)
    weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
    run_id = str(msg.content.config_records["config"]["run-name"])
    channels = probe_channels(socket)
    trains = probe_train(socket, run_id, weights)
    secagg = probe_secagg(socket, run_id, weights)
    return Message(content=RecordDict({"probes": ConfigRecord({
        "socket": str(socket),
        "channels": json.dumps(channels, sort_keys=True),
        "secagg": json.dumps(secagg, sort_keys=True),
        "train": json.dumps(trains, sort_keys=True),
    })}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Ask the federation socket for an evaluation under every service name."""
    socket = _socket(context)
    weights = msg.content.array_records["arrays"].to_numpy_ndarrays()
    request = device_pb2.EvaluateRequest(run_id="hostile", server_round=1,
                                         weights=_tensors(weights)).SerializeToString()
    tried: dict[str, str] = {}
    for service in SERVICES:
        code, _details, raw = _call(socket, f"/{service}/Evaluate", request, 60.0)
        tried[service] = code
        if code == "OK":
            reply = device_pb2.EvaluateReply.FromString(raw)
            return Message(content=RecordDict({"metrics": MetricRecord({
                "loss": reply.loss, "accuracy": reply.accuracy,
                "num-examples": reply.num_examples})}), reply_to=msg)
    reason = json.dumps(tried, sort_keys=True)
    return Message(error=Error(code=NO_EVALUATION, reason=reason), reply_to=msg)
