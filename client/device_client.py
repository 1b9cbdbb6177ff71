"""A caller of the device daemon's ``Device`` service over its Unix socket.

Used by the Flower ClientApp and by the ``keystay device`` commands. It holds
no data of its own: whatever it gets back is what the daemon chose to answer.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import grpc

from keystay.v1 import device_pb2, device_pb2_grpc

SOCKET_NAME = "device.sock"

# Training a round can take minutes on a slow laptop; status calls are quick.
TRAIN_TIMEOUT_S = 1800.0
CALL_TIMEOUT_S = 30.0


def socket_path(data_dir: Path) -> Path:
    """Where the daemon for ``data_dir`` serves the Device service.

    ``KEYSTAY_SOCKET`` overrides it (the systemd units put the socket where
    the SuperNode's user can reach it).
    """
    override = os.environ.get("KEYSTAY_SOCKET")
    return Path(override) if override else Path(data_dir) / SOCKET_NAME


class DeviceUnavailableError(RuntimeError):
    """The daemon's socket is missing or nobody answers on it."""


class DeviceClient:
    """A connection to one device daemon.

    Parameters
    ----------
    socket : Path
        The daemon's Unix socket (``DATA_DIR/device.sock``).
    """

    def __init__(self, socket: Path) -> None:
        self.socket = Path(socket)
        if not self.socket.exists():
            raise DeviceUnavailableError(
                f"no device daemon socket at {self.socket}; start one with "
                f"'keystay device run --data {self.socket.parent}'"
            )
        self._channel = grpc.insecure_channel(
            # Absolute: "unix://" + a relative path reads as an authority,
            # which gRPC refuses (a relative --data used to break every command).
            f"unix://{self.socket.absolute()}",
            options=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ],
        )
        self.stub = device_pb2_grpc.DeviceStub(self._channel)

    def train(self, request: device_pb2.TrainRequest) -> device_pb2.TrainReply:
        return self.stub.Train(request, timeout=TRAIN_TIMEOUT_S)

    def status(self) -> device_pb2.StatusReply:
        return self.stub.Status(device_pb2.StatusRequest(), timeout=CALL_TIMEOUT_S)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
