"""The ``Federation`` gRPC servicer: protobuf in, a decision of :class:`DeviceCore` out.

This is everything the federation (the SuperNode, and the ClientApp code the
server ships to it) can ask of the device: ``Train`` (record-level policies)
and ``SecAggStage`` (one stage of SecAgg+, run inside the daemon; see
:mod:`keystay.client.daemon.secagg_stages`). The employee's controls
are another service on another socket
(:mod:`keystay.client.daemon.control_service`), so nothing here can pause,
show, export or forget anything.

Thin on purpose. Every decision lives in :mod:`keystay.client.daemon.core`;
this module converts messages and ends a refused call with
``context.abort(code, sentence)``.

What ``Train`` may say to the federation, and why:

* a reply holds only the DP-noised weights and the signed privacy report
  (every field classified in :mod:`keystay.client.federation_fields`);
* a malformed request ends with INVALID_ARGUMENT and a sentence about the
  request itself (data-independent, so it is told in full);
* a policy or state refusal ends with PERMISSION_DENIED or
  FAILED_PRECONDITION and only ``"refused by device policy: CODE"``: its
  full sentence can name window counts, days held or their budgets, so it
  goes to the device log and the refusal log the employee reads instead;
* anything else ends with INTERNAL and a fixed sentence (details in the
  device log): never UNKNOWN, never an exception's text.
"""

from __future__ import annotations

import logging

import grpc
import numpy as np
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord

from keystay.client.daemon.core import DeviceCore
from keystay.client.daemon.secagg_stages import SessionKey
from keystay.client.ledger.ledger import DeviceLedgerError
from keystay.client.ledger.report import PrivacyReport
from keystay.client.policy import Refusal, TrainingRequest
from keystay.client.serde import weights_from_proto, weights_to_proto
from keystay.client.trainer.process import TrainerError
from keystay.common.memory import MemoryReturner
from keystay.v1 import device_pb2, device_pb2_grpc

logger = logging.getLogger(__name__)

#: Most weight arrays a request may carry (the model has a few dozen).
MAX_TENSORS = 1024
#: Largest stage ConfigRecord accepted (a stage carries keys and shares for a
#: few dozen neighbours; the masked vector travels the other way).
MAX_CONFIGS_BYTES = 4 * 1024 * 1024


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
        unit=report.unit,
        signature=signature,
        payload_json=payload.decode("utf-8"),
    )


def request_from_proto(
    request: device_pb2.TrainRequest | device_pb2.SecAggStageRequest,
) -> TrainingRequest:
    """The request in keystay's own type; field checks happen in the policy."""
    spec = request.spec
    run_id = request.run_name if isinstance(request, device_pb2.SecAggStageRequest) else (
        request.run_id)
    return TrainingRequest(
        run_id=run_id,
        server_round=int(request.server_round),
        privacy_unit=spec.privacy_unit or "record",
        update_clip=float(spec.update_clip),
        day_sample_rate=float(spec.day_sample_rate),
        noise_multiplier=spec.noise_multiplier,
        max_grad_norm=spec.max_grad_norm,
        local_steps=int(spec.local_steps),
        sample_rate=float(spec.sample_rate),
        learning_rate=spec.learning_rate,
        dp=spec.dp,
        blocks=tuple(spec.blocks),
    )


def configs_from_bytes(data: bytes) -> ConfigRecord:
    """A stage's Flower ConfigRecord; malformed bytes are a ``bad-request`` refusal."""
    if len(data) > MAX_CONFIGS_BYTES:
        raise Refusal("bad-request", f"invalid request: SecAgg+ configs of {len(data)} bytes; "
                      f"at most {MAX_CONFIGS_BYTES}")
    proto = ProtoConfigRecord()
    try:
        proto.ParseFromString(data)
        return config_record_from_proto(proto)
    except Exception:
        raise Refusal("bad-request", "invalid request: SecAgg+ configs do not parse as a "
                      "Flower ConfigRecord") from None


def configs_to_bytes(content: dict[str, object]) -> bytes:
    """A stage's result, serialised as Flower serialises a ConfigRecord."""
    return bytes(config_record_to_proto(ConfigRecord(content)).SerializeToString())  # type: ignore[arg-type]


def _weights(
    request: device_pb2.TrainRequest | device_pb2.SecAggStageRequest,
) -> list[np.ndarray]:
    """Decode the request's weights; a malformed tensor is a ``bad-request`` refusal."""
    if len(request.weights) > MAX_TENSORS:
        raise Refusal(
            "bad-request",
            f"invalid request: {len(request.weights)} weight arrays; at most {MAX_TENSORS}",
        )
    try:
        return weights_from_proto(request.weights)
    except ValueError as error:
        raise Refusal("bad-request", f"invalid request: {error}") from None


class FederationServicer(device_pb2_grpc.FederationServicer):
    """The federation's calls; after each, free memory goes back to the system.

    Parameters
    ----------
    core : DeviceCore
        What decides.
    memory : MemoryReturner | None
        Returns the allocator's free memory once a round's calls are over
        (:mod:`keystay.common.memory`): the long-running daemon passes one;
        None (in-process uses: ``keystay sim``, tests) leaves memory as is.
    """

    def __init__(self, core: DeviceCore, memory: MemoryReturner | None = None) -> None:
        self.core = core
        self.memory = memory

    def Train(  # noqa: N802 - gRPC method name
        self, request: device_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> device_pb2.TrainReply:
        try:
            return self._train(request, context)
        finally:
            if self.memory is not None:
                self.memory.soon()

    def SecAggStage(  # noqa: N802 - gRPC method name
        self, request: device_pb2.SecAggStageRequest, context: grpc.ServicerContext
    ) -> device_pb2.SecAggStageReply:
        try:
            return self._secagg_stage(request, context)
        finally:
            if self.memory is not None:
                self.memory.soon()

    def _train(
        self, request: device_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> device_pb2.TrainReply:
        try:
            try:
                weights = _weights(request)
            except Refusal as refusal:
                # The core logs its own refusals; this one happened before it.
                self.core.refusals.record(
                    refusal, run_id=request.run_id, server_round=request.server_round
                )
                raise
            result = self.core.train(request_from_proto(request), weights)
            return device_pb2.TrainReply(
                weights=weights_to_proto(result.weights),
                report=report_to_proto(result.report, result.payload, result.signature),
            )
        except Exception as error:
            code, message = _outcome(request, error)
        context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover

    def _secagg_stage(
        self, request: device_pb2.SecAggStageRequest, context: grpc.ServicerContext
    ) -> device_pb2.SecAggStageReply:
        try:
            key = SessionKey(request.run_id, int(request.server_round), int(request.node_id))
            try:
                configs = configs_from_bytes(request.configs)
                weights = _weights(request) if request.weights else None
            except Refusal as refusal:
                self.core.refusals.record(
                    refusal, run_id=request.run_id, server_round=request.server_round
                )
                raise
            train = request_from_proto(request) if request.HasField("spec") else None
            result = self.core.secagg_stage(key, configs, train, weights)
            reply = device_pb2.SecAggStageReply(configs=configs_to_bytes(dict(result.configs)))
            if result.report is not None:
                reply.report.CopyFrom(
                    report_to_proto(result.report, result.payload, result.signature)
                )
            return reply
        except Exception as error:
            code, message = _outcome(request, error)
        context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover


def _outcome(
    request: device_pb2.TrainRequest | device_pb2.SecAggStageRequest, error: Exception
) -> tuple[grpc.StatusCode, str]:
    """The status and the sentence the federation gets for ``error`` (module docstring)."""
    if isinstance(error, Refusal):
        logger.warning("refused run %.128r round %s: %s", request.run_id,
                       request.server_round, error.reason)
        return getattr(grpc.StatusCode, error.grpc_status), error.public_reason
    if isinstance(error, DeviceLedgerError):
        # Never train past a ledger that cannot be written: that would be
        # spending budget nobody recorded.
        logger.error("ledger failure", exc_info=error)
        return grpc.StatusCode.INTERNAL, "device ledger unavailable; see the device log"
    if isinstance(error, TrainerError):
        # The trainer died (OOM killer, memory limit) or timed out. Its
        # text holds only a pid and an op, but the server gets a fixed
        # sentence all the same: that the round is lost, not why in detail.
        logger.error("training failed: %s", error)
        return grpc.StatusCode.INTERNAL, (
            "device trainer stopped during this round (out of memory, killed or timed out); "
            "the round's charge stands; the next round starts a new trainer")
    # Store, trainer or a bug: the exception text may quote data or paths, so
    # the caller gets a fixed sentence and INTERNAL (never UNKNOWN); the
    # device log has the traceback.
    logger.error("training failed", exc_info=error)
    return grpc.StatusCode.INTERNAL, "device could not train; see the device log"
