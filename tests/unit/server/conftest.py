"""Fixtures for server tests: devices that sign privacy reports like real ones.

Keys are made directly with ``cryptography`` and payloads serialised the way
the device does (``keystay.client.ledger.report.canonical_bytes``: sorted
keys, compact separators, ASCII, no NaN), so server tests do not depend on
the device daemon. One ledger test checks the two stay in step.

:class:`InProcessGrid` stands in for the SuperLink and SuperNodes: it hands
each message (a deep copy, as the wire would) to ``keystay.client.app.app``
with that node's own Context, and returns the replies to the ServerApp side.
Each node's ClientApp reaches a stub ``Device`` daemon (:class:`StubDaemon`)
over a real Unix-socket gRPC channel; the stub returns a known update and a
report signed with an enrolled key. A node can be made to drop out (no reply,
as after a timeout) at any stage of the protocol, to refuse, or to have no
daemon at all.
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from keystay.client.app import app as client_app
from keystay.client.daemon.secagg_stages import SecAggStages, SessionKey
from keystay.client.daemon.service import configs_from_bytes, configs_to_bytes
from keystay.client.policy import Refusal
from keystay.client.serde import weights_from_proto, weights_to_proto
from keystay.common.digest import weights_sha256
from keystay.server.ledger.ledger import ServerLedger
from keystay.v1 import device_pb2, device_pb2_grpc
from tests.e2e.secagg_grid import OneProcessGrid

Block = tuple[str, float, float, bool]  # block, epsilon, budget, retired


def canonical(obj: Any) -> bytes:
    """The device's canonical JSON bytes."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("utf-8")


@dataclass
class FakeDevice:
    """A device identity that signs reports (test stand-in for the daemon)."""

    key: Ed25519PrivateKey

    @property
    def pem(self) -> str:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        pem = self.key.public_key().public_bytes(serialization.Encoding.PEM, spki)
        return pem.decode("ascii")

    @property
    def device_id(self) -> str:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return "dev-" + hashlib.sha256(raw).hexdigest()[:12]

    def payload(
        self,
        run_id: str,
        server_round: int,
        blocks: Sequence[Block],
        *,
        total: float | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "format": "keystay.privacy-report.v1",
            "device_id": self.device_id,
            "run_id": run_id,
            "server_round": server_round,
            "blocks": [
                {
                    "block": name,
                    "epsilon_rdp": eps * 1.1,
                    "epsilon_prv": eps * 0.98,
                    "epsilon": eps,
                    "budget": budget,
                    "retired": retired,
                }
                for name, eps, budget, retired in blocks
            ],
            "noise_multiplier": 1.0,
            "sample_rate": 0.05,
            "steps": 30,
            "delta": 1e-5,
            "accountant": "min(rdp, prv_upper)",
            "epsilon_round": 0.4,
            "epsilon_round_rdp": 0.5,
            "epsilon_total": total if total is not None else max(b[1] for b in blocks),
            "max_grad_norm": 1.0,
            "unit": "one training record = 33 consecutive input events of one employee-day; "
                    "records do not overlap, so each event is in exactly one record",
            "created": 1_700_000_000.0,
        }
        fields.update(overrides)
        return fields

    def sign(self, fields: dict[str, Any]) -> tuple[str, bytes]:
        payload = canonical(fields)
        return payload.decode("ascii"), self.key.sign(payload)

    def report(
        self, run_id: str, server_round: int, blocks: Sequence[Block], **kwargs: Any
    ) -> tuple[str, bytes]:
        """``(payload_json, signature)`` as the ClientApp forwards them."""
        return self.sign(self.payload(run_id, server_round, blocks, **kwargs))


@pytest.fixture
def make_device() -> Callable[[], FakeDevice]:
    return lambda: FakeDevice(Ed25519PrivateKey.generate())


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ServerLedger]:
    led = ServerLedger.open(tmp_path / "server")
    yield led
    led.close()


# ------------------------------------------------- an in-process federation (stubs)


class StubDaemon(device_pb2_grpc.FederationServicer):
    """A device daemon that 'trains' by adding a fixed random update, and signs a report.

    ``SecAggStage`` runs the daemon's real SecAgg+ stages
    (:class:`~keystay.client.daemon.secagg_stages.SecAggStages`, t = 2) and
    encodes the update without noise, so the server's mean is checkable.
    """

    def __init__(self, device: FakeDevice, index: int, scale: float, refuse: bool) -> None:
        self.device = device
        self.index = index
        self.scale = scale
        self.refuse = refuse
        self.sent: dict[int, list[np.ndarray]] = {}  # round -> weights returned
        self.stages = SecAggStages(2)

    def SecAggStage(  # noqa: N802
        self, request: device_pb2.SecAggStageRequest, context: grpc.ServicerContext
    ) -> device_pb2.SecAggStageReply:
        if self.refuse:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused: stub policy says no")
        try:
            return self._stage(request)
        except Refusal as refusal:  # as the real servicer: the code only
            context.abort(getattr(grpc.StatusCode, refusal.grpc_status), refusal.public_reason)
            raise

    def _stage(self, request: device_pb2.SecAggStageRequest) -> device_pb2.SecAggStageReply:
        key = SessionKey(request.run_id, int(request.server_round), int(request.node_id))
        configs = configs_from_bytes(request.configs)
        if configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
            result = {
                Stage.SETUP: self.stages.setup, Stage.SHARE_KEYS: self.stages.share_keys,
                Stage.UNMASK: self.stages.unmask,
            }[str(configs[Key.STAGE])](key, configs)
            return device_pb2.SecAggStageReply(configs=configs_to_bytes(dict(result)))
        masking = self.stages.open_masking(key, configs)
        server_round = int(request.server_round)
        weights = weights_from_proto(request.weights)
        rng = np.random.default_rng(1000 * self.index + server_round)
        new = [(w + rng.normal(0.0, self.scale, w.shape)).astype(w.dtype) for w in weights]
        self.sent[server_round] = new
        gamma = masking.quantization_range / (2 * masking.clipping_range)
        encoded = [
            np.rint(gamma * (n.astype(np.float64) - w + masking.clipping_range)).astype(np.int64)
            for n, w in zip(new, weights, strict=True)
        ]
        masked = masking.mask(encoded)
        payload, signature = self.device.report(
            request.run_name, server_round, [("2024-01-02", 0.5 * server_round, 8.0, False)],
            update_sha256=weights_sha256(masked),
        )
        reply = device_pb2.SecAggStageReply(
            configs=configs_to_bytes(dict(self.stages.masked_result(masked)))
        )
        reply.report.CopyFrom(device_pb2.PrivacyReport(
            device_id=self.device.device_id, epsilon_total=0.5 * server_round,
            payload_json=payload, signature=signature,
        ))
        return reply

    def Train(  # noqa: N802
        self, request: device_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> device_pb2.TrainReply:
        if self.refuse:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused: stub policy says no")
        server_round = int(request.server_round)
        weights = weights_from_proto(request.weights)
        rng = np.random.default_rng(1000 * self.index + server_round)
        new = [(w + rng.normal(0.0, self.scale, w.shape)).astype(w.dtype) for w in weights]
        self.sent[server_round] = new
        payload, signature = self.device.report(
            request.run_id, server_round, [("2024-01-02", 0.5 * server_round, 8.0, False)],
            update_sha256=weights_sha256(new),
        )
        return device_pb2.TrainReply(
            weights=weights_to_proto(new),
            report=device_pb2.PrivacyReport(
                device_id=self.device.device_id,
                epsilon_total=0.5 * server_round,
                payload_json=payload,
                signature=signature,
            ),
        )


@dataclass
class Node:
    node_id: int
    device: FakeDevice
    daemon: StubDaemon
    context: Context


def _stage(msg: Message) -> str:
    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
    return msg.metadata.message_type


@dataclass
class InProcessGrid(OneProcessGrid):
    """SuperLink + SuperNodes in one process (see module docstring)."""

    nodes: dict[int, Node]
    drop_at: dict[int, str] = field(default_factory=dict)
    received: list[tuple[str, Message]] = field(default_factory=list)  # what the server got
    sent_types: list[str] = field(default_factory=list)  # message type of all it sent
    gone: set[int] = field(default_factory=set)
    # Applied to each reply before the server sees it: what a modified
    # ClientApp (server-shipped code is not trusted) could send instead.
    tamper: Callable[[int, Message], None] | None = None

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent_types.append(msg.metadata.message_type)
            node_id, stage = msg.metadata.dst_node_id, _stage(msg)
            if self.drop_at.get(node_id) == stage:
                self.gone.add(node_id)
            if node_id in self.gone:
                continue  # no reply before the timeout: dropped out
            delivered = copy.deepcopy(msg)
            delivered.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            TaskIdentity.node_id = node_id
            try:
                reply = client_app(delivered, self.nodes[node_id].context)
            except Exception as error:  # as the SuperNode does: an error reply
                reply = Message(Error(code=1, reason=repr(error)), reply_to=delivered)
            finally:
                TaskIdentity.node_id = SUPERLINK_NODE_ID
            reply = copy.deepcopy(reply)
            if self.tamper is not None:
                self.tamper(node_id, reply)
            self.received.append((stage, reply))
            replies.append(reply)
        return replies


@pytest.fixture
def task_identity() -> Iterator[None]:
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def make_nodes(
    tmp_path: Path, make_device: Any, ledger: ServerLedger
) -> Iterator[Any]:
    servers: list[grpc.Server] = []

    def make(count: int, *, scale: float = 0.01, refuse: Iterable[int] = (),
             down: Iterable[int] = ()) -> dict[int, Node]:
        """``count`` nodes; those in ``refuse`` refuse by policy, those in ``down``
        have no daemon listening (as when it is stopped)."""
        nodes = {}
        for index in range(count):
            device = make_device()
            ledger.enroll_device(device.device_id, device.pem, f"stub-{index}")
            daemon = StubDaemon(device, index, scale, refuse=index in set(refuse))
            socket = tmp_path / f"d{index}.sock"
            if index not in set(down):
                server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
                device_pb2_grpc.add_FederationServicer_to_server(daemon, server)
                server.add_insecure_port(f"unix://{socket}")
                server.start()
                servers.append(server)
            node_id = 101 + index
            context = Context(run_id=7, node_id=node_id, node_config={"socket": str(socket)},
                              state=RecordDict(), run_config={})
            nodes[node_id] = Node(node_id, device, daemon, context)
        return nodes

    yield make
    for server in servers:
        server.stop(None)
