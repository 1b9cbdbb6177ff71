"""Fuzzed Device RPCs on both sockets: federation (Train) and control (the employee's).

A real gRPC server on two Unix sockets, in this process, over a real core
(store, ledger, identity; a fake trainer, as in test_core) and a real
recorder. Each method gets arbitrary bytes as its request (whatever protobuf
makes of them), and the control methods also get structured hostile values.
The contract: every call ends in a reply or a deliberate status (never
``UNKNOWN``, which is an exception escaping a servicer), nothing is charged
unless a Train reply came back, and nothing stored is lost unless the request
really was a valid forget.
"""
from __future__ import annotations

import math
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from keystay.client.capture.recorder import Recorder
from keystay.client.daemon.control_service import ControlServicer
from keystay.client.daemon.controls import MAX_PAUSE_S, Controls
from keystay.client.daemon.core import DeviceCore
from keystay.client.daemon.service import FederationServicer
from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.ledger import LEDGER_FILE, Ledger
from keystay.client.policy import DevicePolicy
from keystay.client.store import EventStore
from keystay.common.tokens import Tokenizer
from keystay.common.windows import WINDOW
from keystay.sim.employees import fill_store
from keystay.v1 import device_pb2, device_pb2_grpc

from .fuzzing import examples

FEDERATION = ["Train"]
CONTROL = ["Status", "Pause", "Resume", "Show", "Export", "Policy", "Forget"]


@dataclass
class Daemon:
    core: DeviceCore
    federation: grpc.Channel
    control: grpc.Channel
    recorder: Recorder

    def ledger_rows(self) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(self.core.data_dir / LEDGER_FILE)
        try:
            return conn.execute("SELECT * FROM charges").fetchall()
        finally:
            conn.close()

    def blocks(self) -> dict[str, int]:
        return {b.block: b.events for b in self.core.store.blocks()}


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    from tests.unit.client.daemon.test_core import YESTERDAY, FakeTrainer

    root = Path(tempfile.mkdtemp(prefix="ks-fuzz-", dir="/tmp"))  # short socket paths
    data = root / "d"
    store = EventStore.open(data)
    fill_store(store, seed=5, days=2, events_per_day=80 * (WINDOW + 1), end_day=YESTERDAY)
    core = DeviceCore(data, store, DevicePolicy(epsilon_per_block=32.0), Ledger.open(data),
                      DeviceIdentity.open(data), FakeTrainer())  # type: ignore[arg-type]
    recorder = Recorder(core, Tokenizer(), flush_interval=0.05)
    recorder.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    device_pb2_grpc.add_FederationServicer_to_server(FederationServicer(core), server)
    device_pb2_grpc.add_ControlServicer_to_server(
        ControlServicer(Controls(core, recorder, "simulated", "test")), server)
    server.add_insecure_port(f"unix://{data / 'federation.sock'}")
    server.add_insecure_port(f"unix://{data / 'control.sock'}")
    server.start()
    fed = grpc.insecure_channel(f"unix://{data / 'federation.sock'}")
    ctl = grpc.insecure_channel(f"unix://{data / 'control.sock'}")
    try:
        yield Daemon(core, fed, ctl, recorder)
    finally:
        fed.close()
        ctl.close()
        server.stop(0)
        recorder.stop()
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def _call(channel: grpc.Channel, service: str, method: str, body: bytes) -> grpc.StatusCode:
    stub = channel.unary_unary(f"/keystay.v1.{service}/{method}",
                               request_serializer=None, response_deserializer=None)
    try:
        stub(body, timeout=30)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _forget_would_delete(body: bytes, held: set[str]) -> bool:
    try:
        request = device_pb2.ForgetRequest.FromString(body)
    except Exception:  # not a ForgetRequest at all: the server refuses it too
        return False
    return request.all or bool(set(request.days) & held)


@examples(300)
@given(target=st.sampled_from([("Federation", m) for m in FEDERATION]
                              + [("Control", m) for m in CONTROL]),
       body=st.binary(max_size=200))
def test_any_bytes_on_both_sockets(daemon: Daemon, target: tuple[str, str], body: bytes) -> None:
    service, method = target
    held = daemon.blocks()
    if method == "Forget":
        assume(not _forget_would_delete(body, set(held)))
    charges = daemon.ledger_rows()
    channel = daemon.federation if service == "Federation" else daemon.control
    code = _call(channel, service, method, body)
    assert code != grpc.StatusCode.UNKNOWN, f"{service}.{method} raised on {body!r}"
    if method != "Train" or code != grpc.StatusCode.OK:
        assert daemon.ledger_rows() == charges, "charged without a Train reply"
    after = daemon.blocks()
    for block, events in held.items():
        assert after.get(block, 0) >= events, f"block {block} lost events"
    daemon.core.store  # noqa: B018 - still open
    daemon.recorder.resume()


@examples(200)
@given(seconds=st.floats(allow_nan=True, allow_infinity=True)
       | st.floats(min_value=-1e6, max_value=1e12) | st.floats(min_value=0, max_value=MAX_PAUSE_S))
def test_pause_any_duration(daemon: Daemon, seconds: float) -> None:
    stub = device_pb2_grpc.ControlStub(daemon.control)
    try:
        reply = stub.Pause(device_pb2.PauseRequest(seconds=seconds), timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "seconds" in (error.details() or "")
        assert not math.isfinite(seconds) or seconds < 0 or 0 < seconds < 1 \
            or seconds > MAX_PAUSE_S
    else:
        assert math.isfinite(seconds)
        if seconds > 0:
            assert reply.paused_until
    finally:
        daemon.recorder.resume()
    status = stub.Status(device_pb2.StatusRequest(), timeout=30)
    assert status.recording


@examples(200)
@given(day=st.text(max_size=20) | st.dates().map(str),
       method=st.sampled_from(["Show", "Export", "Forget"]))
def test_day_arguments(daemon: Daemon, day: str, method: str) -> None:
    held = daemon.blocks()
    assume(day not in held)
    stub = device_pb2_grpc.ControlStub(daemon.control)
    try:
        if method == "Show":
            stub.Show(device_pb2.ShowRequest(day=day), timeout=30)
        elif method == "Export":
            stub.Export(device_pb2.ExportRequest(day=day), timeout=30)
        else:
            stub.Forget(device_pb2.ForgetRequest(days=[day]), timeout=30)
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), \
            f"{method}({day!r}): {error.code()} {error.details()}"
        assert error.details()
    after = daemon.blocks()
    for block, events in held.items():
        assert after.get(block, 0) >= events
