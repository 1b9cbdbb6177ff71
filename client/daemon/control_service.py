"""The ``Control`` gRPC servicer: the employee's commands, protobuf in and out.

Served only on ``control.sock``, behind :class:`~keystay.client.daemon.
control_socket.ControlGate`, so every caller here is the daemon's own uid.
The decisions live in :class:`~keystay.client.daemon.controls.Controls` and
:class:`~keystay.client.daemon.core.DeviceCore`; this module converts messages
and ends a bad call with ``context.abort(code, reason)``.

``Evaluate`` is here, not on the federation surface: a held-out score is not
charged to the privacy ledger, so it is for the employee only (``keystay
device evaluate``).
"""

from __future__ import annotations

import json
import logging

import grpc

from keystay.client.daemon.controls import Controls
from keystay.client.policy import Refusal
from keystay.client.serde import weights_from_proto
from keystay.client.store import StoreError, is_block_id
from keystay.v1 import device_pb2, device_pb2_grpc

logger = logging.getLogger(__name__)


class ControlServicer(device_pb2_grpc.ControlServicer):
    def __init__(self, controls: Controls) -> None:
        self.controls = controls

    def Status(  # noqa: N802 - gRPC method name
        self, request: device_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> device_pb2.StatusReply:
        return self.controls.status()

    def Pause(  # noqa: N802
        self, request: device_pb2.PauseRequest, context: grpc.ServicerContext
    ) -> device_pb2.PauseReply:
        try:
            until = self.controls.pause(request.seconds)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return device_pb2.PauseReply(paused_until=until)

    def Resume(  # noqa: N802
        self, request: device_pb2.ResumeRequest, context: grpc.ServicerContext
    ) -> device_pb2.ResumeReply:
        self.controls.resume()
        return device_pb2.ResumeReply()

    def Show(  # noqa: N802
        self, request: device_pb2.ShowRequest, context: grpc.ServicerContext
    ) -> device_pb2.ShowReply:
        try:
            summary = self.controls.show(request.day or None)
        except KeyError as missing:
            context.abort(grpc.StatusCode.NOT_FOUND, str(missing.args[0]))
        return device_pb2.ShowReply(summary_json=json.dumps(summary, sort_keys=True))

    def Forget(  # noqa: N802
        self, request: device_pb2.ForgetRequest, context: grpc.ServicerContext
    ) -> device_pb2.ForgetReply:
        if not request.all and not request.days:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name days to forget, or all")
        # All names checked before any is forgotten: a refusal deletes nothing.
        bad = [day for day in request.days if not is_block_id(day)]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"not a day (YYYY-MM-DD): {', '.join(repr(d) for d in bad[:3])}; "
                          "nothing was forgotten")
        forgotten, destroyed = self.controls.forget(list(request.days), request.all)
        return device_pb2.ForgetReply(forgotten=forgotten, key_destroyed=destroyed)

    def Export(  # noqa: N802
        self, request: device_pb2.ExportRequest, context: grpc.ServicerContext
    ) -> device_pb2.ExportReply:
        try:
            document = self.controls.export(request.day)
        except KeyError as missing:
            context.abort(grpc.StatusCode.NOT_FOUND, str(missing.args[0]))
        return device_pb2.ExportReply(json=json.dumps(document, indent=1, sort_keys=True))

    def Policy(  # noqa: N802
        self, request: device_pb2.PolicyRequest, context: grpc.ServicerContext
    ) -> device_pb2.PolicyReply:
        text, source = self.controls.policy()
        return device_pb2.PolicyReply(text=text, source=source)

    def Evaluate(  # noqa: N802
        self, request: device_pb2.EvaluateRequest, context: grpc.ServicerContext
    ) -> device_pb2.EvaluateReply:
        core = self.controls.core
        try:
            result = core.evaluate(weights_from_proto(request.weights))
        except Refusal as refusal:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal.reason)
        except (StoreError, ValueError) as error:
            logger.exception("evaluation failed")
            context.abort(grpc.StatusCode.INTERNAL, f"device could not evaluate: {error}")
        return device_pb2.EvaluateReply(
            num_examples=result.num_examples,
            loss=result.loss,
            accuracy=result.accuracy,
            device_id=core.device_id,
        )
