"""How anything reaches the device daemon: its two sockets and a gRPC channel.

The daemon serves two surfaces on two Unix sockets (see
``protos/keystay/v1/device.proto``):

* ``federation.sock``: :class:`~keystay.client.federation_client.
  FederationClient`, used by the Flower ClientApp (code shipped by the
  server). Only ``Train``.
* ``control.sock``: :class:`~keystay.client.control_client.ControlClient`,
  used by the ``keystay device`` commands. The employee's controls; the
  daemon serves only its own uid there.

This module holds what both clients share and no data of its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from keystay.common.errors import KeystayError

FEDERATION_SOCKET = "federation.sock"
CONTROL_SOCKET = "control.sock"

# Weights of the shared model travel both ways in one message.
_MAX_MESSAGE = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
]


class DeviceUnavailableError(KeystayError, RuntimeError):
    """The daemon's socket is missing, refuses this caller, or nobody answers on it."""


def federation_socket_path(data_dir: Path) -> Path:
    """Where the daemon for ``data_dir`` serves the Federation service.

    ``KEYSTAY_FEDERATION_SOCKET`` overrides it (the systemd units put it where
    the SuperNode's user can reach it).
    """
    override = os.environ.get("KEYSTAY_FEDERATION_SOCKET")
    return Path(override) if override else Path(data_dir) / FEDERATION_SOCKET


def control_socket_path(data_dir: Path) -> Path:
    """Where the daemon for ``data_dir`` serves the employee's Control service.

    Always inside the data folder (0700): nothing moves it somewhere others
    could reach.
    """
    return Path(data_dir) / CONTROL_SOCKET


def open_channel(socket: Path) -> grpc.Channel:
    """An insecure (Unix-socket) channel to ``socket``, which must exist.

    Raises
    ------
    DeviceUnavailableError
        If no daemon socket is there, saying how to start one.
    """
    socket = Path(socket)
    if not socket.exists():
        raise DeviceUnavailableError(
            f"no device daemon socket at {socket}; start one with "
            f"'keystay device run --data {socket.parent}'"
        )
    # Absolute: "unix://" + a relative path reads as an authority, which gRPC
    # refuses (a relative --data used to break every command).
    return grpc.insecure_channel(f"unix://{socket.absolute()}", options=CHANNEL_OPTIONS)


class SocketClient:
    """An open channel to one of the daemon's sockets, closed on ``with`` exit.

    :class:`~keystay.client.federation_client.FederationClient` and
    :class:`~keystay.client.control_client.ControlClient` add the stub of
    their own service; each socket serves one service.

    Raises
    ------
    DeviceUnavailableError
        If the socket does not exist.
    """

    def __init__(self, socket: Path) -> None:
        self.socket = Path(socket)
        self._channel = open_channel(self.socket)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
