"""The ``keystay device`` commands' way to the daemon: the Control service.

Only the daemon's own OS user is served on ``control.sock`` (the daemon checks
each connection's peer uid). This client checks the socket's owner first, so
someone running the command as the wrong user is told which user to be,
instead of getting a dropped connection.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from keystay.client.device_client import DeviceUnavailableError, SocketClient
from keystay.v1 import device_pb2, device_pb2_grpc

# Evaluate runs a model over every held-out window; the rest are quick.
CALL_TIMEOUT_S = 60.0
EVALUATE_TIMEOUT_S = 600.0


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class ControlClient(SocketClient):
    """A connection to one daemon's control socket.

    Parameters
    ----------
    socket : Path
        ``DATA/control.sock``.

    Raises
    ------
    DeviceUnavailableError
        If the socket does not exist, or belongs to another user (the daemon
        would refuse this caller).
    """

    def __init__(self, socket: Path) -> None:
        self.socket = Path(socket)
        if self.socket.exists():
            owner = self.socket.stat().st_uid
            if owner != os.geteuid():
                name = _user(owner)
                raise DeviceUnavailableError(
                    f"the daemon at {self.socket} serves only its own user, {name}; run this "
                    f"command as that user (e.g. 'sudo -u {name} keystay device ...')"
                )
        super().__init__(self.socket)
        self.stub = device_pb2_grpc.ControlStub(self._channel)

    def status(self) -> device_pb2.StatusReply:
        reply: device_pb2.StatusReply = self.stub.Status(device_pb2.StatusRequest(),
                                                         timeout=CALL_TIMEOUT_S)
        return reply
