"""The Flower ClientApp's way to the daemon: the Federation service only.

The ClientApp is code the server ships, run as the SuperNode's user. It knows
the federation socket (its ``--node-config socket="..."``) and nothing else;
the only calls this client can make are ``Train`` (record-level policies) and
``SecAggStage`` (one SecAgg+ stage, run by the daemon), and what it gets back is
what the daemon chose to answer under the employee's policy.
"""

from __future__ import annotations

from pathlib import Path

from keystay.client.device_client import DeviceUnavailableError, SocketClient
from keystay.v1 import device_pb2, device_pb2_grpc

__all__ = ["TRAIN_TIMEOUT_S", "DeviceUnavailableError", "FederationClient"]

# Training a round can take minutes on a slow laptop.
TRAIN_TIMEOUT_S = 1800.0


class FederationClient(SocketClient):
    """A connection to one daemon's federation socket.

    Parameters
    ----------
    socket : Path
        The daemon's federation socket (``DATA/federation.sock`` or, in the
        two-user set-up, ``/run/keystay/federation.sock``).

    Raises
    ------
    DeviceUnavailableError
        If the socket does not exist.
    """

    def __init__(self, socket: Path) -> None:
        super().__init__(socket)
        self.stub = device_pb2_grpc.FederationStub(self._channel)

    def train(self, request: device_pb2.TrainRequest) -> device_pb2.TrainReply:
        reply: device_pb2.TrainReply = self.stub.Train(request, timeout=TRAIN_TIMEOUT_S)
        return reply

    def secagg_stage(
        self, request: device_pb2.SecAggStageRequest
    ) -> device_pb2.SecAggStageReply:
        """One SecAgg+ stage; the masking stage trains, so it gets the training timeout."""
        reply: device_pb2.SecAggStageReply = self.stub.SecAggStage(
            request, timeout=TRAIN_TIMEOUT_S
        )
        return reply
