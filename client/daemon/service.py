"""The ``Federation`` gRPC servicer: protobuf in, a decision of :class:`DeviceCore` out.

This is everything the federation (the SuperNode, and the ClientApp code the
server ships to it) can ask of the device: ``Train``. The employee's controls
are another service on another socket
(:mod:`keystay.client.daemon.control_service`), so nothing here can pause,
show, export or forget anything.

Thin on purpose. Every decision lives in :mod:`keystay.client.daemon.core`;
this module converts messages and ends a refused call with
``context.abort(code, reason)`` so the reason reaches whoever asked.
"""

from __future__ import annotations

import logging

import grpc

from keystay.client.daemon.core import DeviceCore
from keystay.client.ledger.ledger import LedgerError
from keystay.client.ledger.report import PrivacyReport
from keystay.client.policy import Refusal, TrainingRequest
from keystay.client.serde import weights_from_proto, weights_to_proto
from keystay.client.store import StoreError
from keystay.v1 import device_pb2, device_pb2_grpc

logger = logging.getLogger(__name__)


def report_to_proto(
    report: PrivacyReport, payload: bytes, signature: bytes
) -> device_pb2.PrivacyReport:
    """The signed report as it travels; ``payload_json`` is what was signed."""
    return device_pb2.PrivacyReport(
        device_id=report.device_id,
        run_id=report.run_id,
        server_round=report.server_round,
        noise_multiplier=report.noise_multiplier,
        sample_rate=report.sample_rate,
        steps=report.steps,
        delta=report.delta,
        accountant=report.accountant,
        epsilon_round_rdp=report.epsilon_round_rdp,
        epsilon_total=report.epsilon_total,
        blocks=[
            device_pb2.BlockCharge(
                block=b.block,
                epsilon_rdp=b.epsilon_rdp,
                epsilon_prv=b.epsilon_prv,
                epsilon=b.epsilon,
                budget=b.budget,
                retired=b.retired,
            )
            for b in report.blocks
        ],
        max_grad_norm=report.max_grad_norm,
        num_examples=report.num_examples,
        unit=report.unit,
        signature=signature,
        payload_json=payload.decode("utf-8"),
    )


def request_from_proto(request: device_pb2.TrainRequest) -> TrainingRequest:
    spec = request.spec
    return TrainingRequest(
        run_id=request.run_id,
        server_round=int(request.server_round),
        noise_multiplier=spec.noise_multiplier,
        max_grad_norm=spec.max_grad_norm,
        local_steps=int(spec.local_steps),
        batch_size=int(spec.batch_size),
        learning_rate=spec.learning_rate,
        dp=spec.dp,
        blocks=tuple(spec.blocks),
    )


class FederationServicer(device_pb2_grpc.FederationServicer):
    def __init__(self, core: DeviceCore) -> None:
        self.core = core

    def Train(  # noqa: N802 - gRPC method name
        self, request: device_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> device_pb2.TrainReply:
        try:
            result = self.core.train(
                request_from_proto(request), weights_from_proto(request.weights)
            )
        except Refusal as refusal:
            logger.warning("refused run %s round %s: %s", request.run_id,
                           request.server_round, refusal.reason)
            context.abort(getattr(grpc.StatusCode, refusal.grpc_status), refusal.reason)
        except LedgerError as error:
            # Never train past a ledger that cannot be written: that would be
            # spending budget nobody recorded.
            logger.exception("ledger failure")
            context.abort(grpc.StatusCode.INTERNAL, f"device ledger unavailable: {error}")
        except (StoreError, ValueError) as error:
            logger.exception("training failed")
            context.abort(grpc.StatusCode.INTERNAL, f"device could not train: {error}")
        report = result.report
        return device_pb2.TrainReply(
            weights=weights_to_proto(result.weights),
            num_examples=result.num_examples,
            train_loss=result.train_loss,
            seconds=result.seconds,
            report=report_to_proto(report, result.payload, result.signature),
        )
