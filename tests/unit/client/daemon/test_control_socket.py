"""The control socket's gate: the kernel's peer uid decides, before any RPC."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from keystay.client.daemon.control_socket import ControlGate, peer_credentials
from keystay.v1 import device_pb2, device_pb2_grpc


class CountingControl(device_pb2_grpc.ControlServicer):
    """Answers Status and echoes Export; counts every call that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    def Status(  # noqa: N802
        self, request: device_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> device_pb2.StatusReply:
        self.calls += 1
        return device_pb2.StatusReply(device_id="dev-1", recording=True)

    def Export(  # noqa: N802
        self, request: device_pb2.ExportRequest, context: grpc.ServicerContext
    ) -> device_pb2.ExportReply:
        self.calls += 1
        # Large both ways: the relay must move several MB in each direction.
        return device_pb2.ExportReply(json=json.dumps({"day": request.day * 2}))


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[Path, CountingControl]]:
    private = tmp_path / "control.d"
    private.mkdir(mode=0o700)
    path = private / "grpc.sock"
    servicer = CountingControl()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ])
    device_pb2_grpc.add_ControlServicer_to_server(servicer, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    yield path, servicer
    server.stop(0)


def _stub(path: Path) -> tuple[grpc.Channel, device_pb2_grpc.ControlStub]:
    channel = grpc.insecure_channel(f"unix://{path}", options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ])
    return channel, device_pb2_grpc.ControlStub(channel)


def test_peer_credentials_are_the_callers() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_credentials(left) == (os.getpid(), os.geteuid(), os.getegid())


def test_own_uid_is_relayed(tmp_path: Path, backend: tuple[Path, CountingControl]) -> None:
    path, servicer = backend
    gate = ControlGate(tmp_path / "control.sock", path)
    gate.start()
    try:
        assert stat.S_IMODE((tmp_path / "control.sock").stat().st_mode) == 0o600
        channel, stub = _stub(tmp_path / "control.sock")
        with channel:
            assert stub.Status(device_pb2.StatusRequest(), timeout=10).device_id == "dev-1"
            day = "x" * (3 * 1024 * 1024)
            reply = stub.Export(device_pb2.ExportRequest(day=day), timeout=30)
            assert json.loads(reply.json)["day"] == day * 2
        assert servicer.calls == 2 and gate.refused == 0
    finally:
        gate.stop()
    assert not (tmp_path / "control.sock").exists()


def test_other_uid_is_cut_off_before_any_rpc(
    tmp_path: Path, backend: tuple[Path, CountingControl]
) -> None:
    path, servicer = backend
    # Serve someone else: this process is now the stranger.
    gate = ControlGate(tmp_path / "control.sock", path, allowed_uid=os.geteuid() + 1)
    gate.start()
    try:
        channel, stub = _stub(tmp_path / "control.sock")
        with channel, pytest.raises(grpc.RpcError) as refused:
            stub.Status(device_pb2.StatusRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert servicer.calls == 0
        assert gate.refused >= 1
    finally:
        gate.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a socket to another uid needs root")
def test_client_names_the_user_to_be(tmp_path: Path) -> None:
    from keystay.client.control_client import ControlClient
    from keystay.client.device_client import DeviceUnavailableError

    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        os.chown(path, 65534, 65534)
        with pytest.raises(DeviceUnavailableError, match="serves only its own user, nobody"):
            ControlClient(path)
