"""Only what the ledger paid for leaves the device: replies, refusals and hostile requests.

A real daemon's ``Device`` servicer (real store, ledger, policy, identity and
DeviceCore; a fake trainer without torch) serves an in-process gRPC server on
a Unix socket. Against it:

* every field of every federation reply message (walked through the protobuf
  descriptors, recursively) and every key of the signed payload must be in
  :data:`keystay.client.federation_fields.FIELDS`;
* the shipped ClientApp's train reply is walked record by record the same
  way; its evaluate handler declines without asking the daemon;
* hostile requests (hypothesis): the server stays up, a refused request
  leaves the ledger unchanged, no status is UNKNOWN, refusal details are the
  code only, and an accepted reply carries only classified fields.
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message as ProtoMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystay.client import app as clientapp
from keystay.client.daemon.control_service import ControlServicer
from keystay.client.daemon.controls import Controls
from keystay.client.daemon.core import DeviceCore
from keystay.client.daemon.service import FederationServicer
from keystay.client.federation_fields import FEDERATION_RPCS, FIELDS
from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.accounting import Epsilons, Mechanism
from keystay.client.ledger.ledger import LEDGER_FILE, Ledger
from keystay.client.policy import DevicePolicy
from keystay.client.serde import weights_to_proto
from keystay.client.store import EventStore
from keystay.client.trainer.job import TrainJob, TrainOutcome
from keystay.common.windows import WINDOW
from keystay.sim.employees import fill_store
from keystay.v1 import device_pb2, device_pb2_grpc

SPEC = (((4, 3), "<f4"), ((3,), "<f4"))
YESTERDAY = date.today() - timedelta(days=1)
REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


class FakeTrainer:
    """A WarmTrainer stand-in: no torch, an additive accountant, noisy echo training."""

    ready = True

    def __init__(self) -> None:
        self.calls = 0

    def weight_spec(self) -> list[tuple[tuple[int, ...], str]]:
        return list(SPEC)

    def epsilons(self, history: Sequence[Mechanism], delta: float) -> Epsilons:
        total = sum(m.steps * m.sample_rate / m.noise_multiplier for m in history)
        return Epsilons(rdp=1.25 * total, prv=0.99 * total, prv_upper=total)

    def train(self, job: TrainJob) -> TrainOutcome:
        self.calls += 1
        rng = np.random.default_rng()
        new = [w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in job.weights]
        return TrainOutcome(weights=new, train_loss=0.5, heldout_accuracy=0.1,
                            heldout_loss=3.0, steps=job.steps, sample_rate=job.sample_rate,
                            num_examples=len(job.train), seconds=0.01)


@dataclass
class Daemon:
    core: DeviceCore
    trainer: FakeTrainer
    socket: Path
    stub: device_pb2_grpc.FederationStub

    def ledger_rows(self) -> dict[str, list[tuple[object, ...]]]:
        conn = sqlite3.connect(self.core.data_dir / LEDGER_FILE)
        try:
            names = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")]
            return {n: conn.execute(f"SELECT * FROM {n}").fetchall() for n in names}
        finally:
            conn.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # A short path: Unix socket paths are limited to about 100 bytes.
    root = Path(tempfile.mkdtemp(prefix="ks-replies-", dir="/tmp"))
    data = root / "d"
    store = EventStore.open(data)
    fill_store(store, seed=3, days=3, events_per_day=120 * (WINDOW + 1), end_day=YESTERDAY)
    trainer = FakeTrainer()
    # A large budget so the hypothesis run is not all budget refusals.
    # Record-level: these tests walk the plain Train reply (an employee-day
    # device refuses Train; its SecAgg+ replies are walked in
    # tests/unit/server/test_secagg.py and tests/unit/client/daemon/test_core.py).
    policy = DevicePolicy(epsilon_per_block=32.0, privacy_unit="record")
    core = DeviceCore(data, store, policy, Ledger.open(data), DeviceIdentity.open(data),
                      trainer)  # type: ignore[arg-type]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    device_pb2_grpc.add_FederationServicer_to_server(FederationServicer(core), server)
    socket = data / "federation.sock"
    server.add_insecure_port(f"unix://{socket}")
    # The employee's side, for the CLI (the uid gate is tested in test_surfaces).
    device_pb2_grpc.add_ControlServicer_to_server(
        ControlServicer(Controls(core, None, "none", "test")), server)
    server.add_insecure_port(f"unix://{data / 'control.sock'}")
    server.start()
    channel = grpc.insecure_channel(f"unix://{socket}")
    try:
        yield Daemon(core, trainer, socket, device_pb2_grpc.FederationStub(channel))
    finally:
        channel.close()
        server.stop(0)
        shutil.rmtree(root, ignore_errors=True)


def good_weights() -> list[np.ndarray]:
    return [np.zeros(shape, dtype=np.dtype(dtype)) for shape, dtype in SPEC]


def good_request(server_round: int = 1, **spec: Any) -> device_pb2.TrainRequest:
    values: dict[str, Any] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "local_steps": 5,
                              "sample_rate": 0.05, "learning_rate": 0.01, "dp": True}
    values.update(spec)
    return device_pb2.TrainRequest(run_id="run-a", server_round=server_round,
                                   weights=weights_to_proto(good_weights()),
                                   spec=device_pb2.TrainSpec(**values))


# --- walking what leaves --------------------------------------------------------------


def descriptor_fields(descriptor: Descriptor, seen: set[str] | None = None) -> set[str]:
    """Every ``Message.field`` reachable from ``descriptor``, through nested messages."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    out = set()
    for field in descriptor.fields:
        out.add(f"{descriptor.name}.{field.name}")
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            out |= descriptor_fields(field.message_type, seen)
    return out


def federation_reply_fields() -> set[str]:
    out: set[str] = set()
    methods = 0
    for service in device_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            if method.name in FEDERATION_RPCS or "Federation" in service.name:
                methods += 1
                out |= descriptor_fields(method.output_type)
    assert methods >= len(FEDERATION_RPCS), "a federation RPC is missing from the proto"
    return out


def present_fields(message: ProtoMessage) -> set[str]:
    """The fields a reply actually carries (set ones), recursively."""
    out = set()
    for field, value in message.ListFields():
        out.add(f"{message.DESCRIPTOR.name}.{field.name}")
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            for item in items:
                out |= present_fields(item)
    return out


def payload_keys(payload: dict[str, Any]) -> set[str]:
    out = {f"payload.{k}" for k in payload}
    for block in payload.get("blocks", []):
        out |= {f"payload.blocks[].{k}" for k in block}
    return out


def record_keys(content: RecordDict, prefix: str) -> set[str]:
    out = {f"{prefix}.{name}.*" for name in content.array_records}
    for name, metrics in content.metric_records.items():
        out |= {f"{prefix}.{name}.{k}" for k in metrics}
    for name, config in content.config_records.items():
        out |= {f"{prefix}.{name}.{k}" for k in config}
    return out


def test_every_federation_reply_field_is_classified() -> None:
    fields = federation_reply_fields()
    unclassified = sorted(fields - FIELDS.keys())
    assert not unclassified, f"classify these in client/federation_fields.py: {unclassified}"
    # The removed fields stay removed.
    for gone in ("TrainReply.train_loss", "TrainReply.num_examples", "TrainReply.seconds",
                 "TrainReply.heldout_accuracy", "PrivacyReport.num_examples"):
        assert gone not in fields


def test_the_table_has_no_stale_protobuf_entries() -> None:
    proto_keys = {k for k in FIELDS if not k.startswith(("payload.", "clientapp."))}
    assert proto_keys <= federation_reply_fields()
    assert all(kind in ("a", "b", "c") and reason for kind, reason in FIELDS.values())


def test_a_real_reply_and_its_signed_payload_carry_only_classified_fields(
    daemon: Daemon,
) -> None:
    reply = daemon.stub.Train(good_request(server_round=1_000))
    assert present_fields(reply) <= FIELDS.keys()
    payload = json.loads(reply.report.payload_json)
    assert payload_keys(payload) <= FIELDS.keys(), sorted(payload_keys(payload) - FIELDS.keys())
    assert "num_examples" not in payload and payload["sample_rate"] == 0.05


# --- the shipped ClientApp ------------------------------------------------------------


@pytest.fixture
def task_identity() -> Iterator[None]:
    """What a SuperNode sets before running a ClientApp (Flower's Message needs it)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def flower_message(kind: str, weights: list[np.ndarray], **config: Any) -> Message:
    values = {"run-name": "run-app", "server-round": 1, "noise-multiplier": 1.0,
              "max-grad-norm": 1.0, "local-steps": 5, "sample-rate": 0.05,
              "learning-rate": 0.01, "dp": True, "blocks": "", **config}
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(values)})
    msg = Message(content=content, dst_node_id=1, message_type=kind)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as if delivered
    return msg


def context(socket: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"socket": str(socket)},
                   state=RecordDict(), run_config={})


@pytest.mark.usefixtures("task_identity")
def test_the_clientapp_train_reply_carries_only_classified_keys(daemon: Daemon) -> None:
    msg = flower_message("train", good_weights(), **{"server-round": 2_000})
    reply = clientapp.train(msg, context(daemon.socket))
    assert not reply.has_error(), reply.error.reason
    keys = record_keys(reply.content, "clientapp.train")
    assert keys <= FIELDS.keys(), sorted(keys - FIELDS.keys())
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == clientapp.FEDAVG_WEIGHT == 1
    assert "train-loss" not in metrics and "seconds" not in metrics


@pytest.mark.usefixtures("task_identity")
def test_the_clientapp_declines_evaluate_without_asking_the_daemon(tmp_path: Path) -> None:
    # No daemon at this socket: a handler that asked one would report it unavailable.
    msg = flower_message("evaluate", good_weights())
    reply = clientapp.evaluate(msg, context(tmp_path / "absent.sock"))
    assert reply.has_error()
    assert reply.error.reason == "this device does not evaluate for the federation"
    assert reply.error.code == clientapp.ERROR_REFUSED


@pytest.mark.usefixtures("task_identity")
def test_a_refusal_reaches_the_server_as_its_code_only(daemon: Daemon) -> None:
    day = (YESTERDAY - timedelta(days=400)).isoformat()
    msg = flower_message("train", good_weights(), blocks=day, **{"server-round": 3_000})
    reply = clientapp.train(msg, context(daemon.socket))
    assert reply.error.reason == "refused by device policy: block-unknown"
    # The employee still sees the whole sentence, with the day it was about.
    assert day in daemon.core.refusals.recent()[-1]["reason"]


# --- hostile requests -----------------------------------------------------------------

FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 1e-12, 0.05, 0.25, 0.3, 1.0, 10.0, 11.0, 1e6, 1e308]),
)
DTYPES = st.sampled_from(["<f4", "<f8", "<i8", "|O", "xyz", "|S3", "<c8", "<f4,<f4", "(2,)f4",
                          "", "<U2", "|b1", "<f4" * 50])


@st.composite
def hostile_tensors(draw: st.DrawFn) -> list[device_pb2.Tensor]:
    tensors = weights_to_proto(good_weights())
    kind = draw(st.sampled_from(["good", "nan", "shape", "dtype", "count", "bytes", "huge"]))
    if kind == "nan":
        w = good_weights()
        w[draw(st.integers(0, 1))].flat[0] = draw(st.sampled_from([math.nan, math.inf]))
        tensors = weights_to_proto(w)
    elif kind == "shape":
        shape = draw(st.lists(st.integers(-3, 5), max_size=10))
        tensors[0] = device_pb2.Tensor(shape=shape, dtype="<f4", data=tensors[0].data)
    elif kind == "dtype":
        tensors[1] = device_pb2.Tensor(shape=tensors[1].shape, dtype=draw(DTYPES),
                                       data=tensors[1].data)
    elif kind == "count":
        n = draw(st.integers(0, 5))
        tensors = (tensors * 3)[:n]
    elif kind == "bytes":
        tensors[0] = device_pb2.Tensor(shape=tensors[0].shape, dtype="<f4",
                                       data=draw(st.binary(max_size=64)))
    elif kind == "huge":
        tensors[0] = device_pb2.Tensor(shape=[2**62, 2**62], dtype="<f8", data=b"")
    return tensors


@st.composite
def hostile_requests(draw: st.DrawFn) -> device_pb2.TrainRequest:
    blocks = draw(st.lists(st.one_of(
        st.sampled_from([YESTERDAY.isoformat(), "1999-01-01", "2025-02-30", "", "../x"]),
        st.text(max_size=40),
    ), max_size=3))
    spec = device_pb2.TrainSpec(
        noise_multiplier=draw(FLOATS), max_grad_norm=draw(FLOATS),
        local_steps=draw(st.sampled_from([0, 1, 5, 200, 201, 2**32 - 1])),
        learning_rate=draw(FLOATS), sample_rate=draw(FLOATS), dp=draw(st.booleans()),
        blocks=blocks,
    )
    run_id = draw(st.one_of(st.just("run-h"), st.text(max_size=20),
                            st.just("r" * 10_000)))
    server_round = draw(st.one_of(st.integers(0, 2**64 - 1),
                                  st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**63, 2**64 - 1])))
    return device_pb2.TrainRequest(run_id=run_id, server_round=server_round,
                                   weights=draw(hostile_tensors()), spec=spec)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=st.one_of(hostile_requests(), st.builds(
    lambda r, q: good_request(server_round=r, sample_rate=q),
    st.integers(10_000, 2**31 - 1), st.sampled_from([0.01, 0.05, 0.25]))))
def test_hostile_requests_are_refused_uncharged_and_never_unknown(
    daemon: Daemon, request: device_pb2.TrainRequest
) -> None:
    before = daemon.ledger_rows()
    calls = daemon.trainer.calls
    try:
        reply = daemon.stub.Train(request, timeout=30)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        assert code in REFUSED, (code, details)
        assert daemon.ledger_rows() == before, f"refused ({details}) yet the ledger moved"
        assert daemon.trainer.calls == calls
        if code != grpc.StatusCode.INVALID_ARGUMENT:
            assert details.startswith("refused by device policy: "), details
        assert "Traceback" not in details and "Error" not in details, details
    else:
        assert present_fields(reply) <= FIELDS.keys()
        assert payload_keys(json.loads(reply.report.payload_json)) <= FIELDS.keys()
    # Still serving: a well-formed request below the noise floor gets the
    # policy's refusal (and charges nothing), not a dead socket.
    with pytest.raises(grpc.RpcError) as still:
        daemon.stub.Train(good_request(server_round=1, noise_multiplier=0.2), timeout=30)
    assert still.value.code() in REFUSED, still.value


def test_security_md_carries_the_classification_table() -> None:
    text = (Path(__file__).resolve().parents[2] / "SECURITY.md").read_text(encoding="utf-8")
    missing = [key for key, (kind, _) in FIELDS.items() if f"| `{key}` | {kind} |" not in text]
    assert not missing, f"SECURITY.md's 'What leaves the device' table lacks {missing}"


def test_the_employee_reads_the_unit_and_the_full_refusals(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from keystay.client.device_cli import device
    from keystay.common.windows import PRIVACY_UNIT

    monkeypatch.delenv("KEYSTAY_SOCKET", raising=False)
    with pytest.raises(grpc.RpcError):
        daemon.stub.Train(good_request(server_round=4_000, noise_multiplier=0.2))
    data = str(daemon.core.data_dir)
    status = CliRunner().invoke(device, ["status", "--data", data, "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["privacy_unit"] == PRIVACY_UNIT
    human = CliRunner().invoke(device, ["status", "--data", data])
    assert "ε is per record" in human.output and "exactly one of them" in human.output
    show = CliRunner().invoke(device, ["show", "--data", data])
    assert show.exit_code == 0, show.output
    assert "the server saw only the code" in show.output
    assert "noise_multiplier 0.2 but this device's floor is 0.8" in show.output
