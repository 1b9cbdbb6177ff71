"""The ClientApp's request and reply helpers, shared by the plain and SecAgg+ paths.

Design
------
Both training paths (:mod:`keystay.client.app` and
:mod:`keystay.client.secagg`) turn a round's run config into one
``Device.Train`` request, send it to the daemon's federation socket named in
the SuperNode's ``--node-config``, and turn a failure into a Flower ``Error``
reply whose code says what happened (:mod:`keystay.common.wire`): the
daemon's policy declining (``FAILED_PRECONDITION``/``PERMISSION_DENIED``) is
:data:`~keystay.common.wire.ERROR_REFUSED`, a daemon that is down is
:data:`~keystay.common.wire.ERROR_UNAVAILABLE`, anything else
:data:`~keystay.common.wire.ERROR_FAILED`. They live here, below both paths,
so neither imports the other's private helpers.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message

from keystay.client.federation_client import DeviceUnavailableError
from keystay.client.serde import weights_to_proto
from keystay.common.wire import (
    CONFIG_BLOCKS,
    CONFIG_DAY_SAMPLE_RATE,
    CONFIG_DP,
    CONFIG_LEARNING_RATE,
    CONFIG_LOCAL_STEPS,
    CONFIG_MAX_GRAD_NORM,
    CONFIG_NOISE_MULTIPLIER,
    CONFIG_PRIVACY_UNIT,
    CONFIG_RUN_NAME,
    CONFIG_SAMPLE_RATE,
    CONFIG_SERVER_ROUND,
    CONFIG_UPDATE_CLIP,
    ERROR_FAILED,
    ERROR_REFUSED,
    ERROR_UNAVAILABLE,
)
from keystay.v1 import device_pb2


def device_socket(context: Context) -> Path:
    """The daemon's federation socket, from the SuperNode's ``--node-config``."""
    socket = context.node_config.get("socket")
    if not isinstance(socket, str) or not socket:
        raise DeviceUnavailableError(
            "this SuperNode has no 'socket' in its --node-config; start it through "
            "'keystay device run --superlink ...' so it knows its daemon"
        )
    return Path(socket)


def _number(config: ConfigRecord, key: str) -> float:
    if key not in config:
        # e.g. a server from before CONFIG_SAMPLE_RATE replaced "batch-size".
        raise ValueError(f"run config has no '{key}'; this device needs it")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"run config '{key}' = {value!r} is not a number")
    return float(value)


def _optional(config: ConfigRecord, key: str) -> float:
    return _number(config, key) if key in config else 0.0


def _spec(config: ConfigRecord) -> device_pb2.TrainSpec:
    blocks = str(config.get(CONFIG_BLOCKS, "") or "")
    return device_pb2.TrainSpec(
        noise_multiplier=_number(config, CONFIG_NOISE_MULTIPLIER),
        max_grad_norm=_number(config, CONFIG_MAX_GRAD_NORM),
        local_steps=int(_number(config, CONFIG_LOCAL_STEPS)),
        sample_rate=_number(config, CONFIG_SAMPLE_RATE),
        learning_rate=_number(config, CONFIG_LEARNING_RATE),
        dp=bool(config[CONFIG_DP]),
        blocks=[b.strip() for b in blocks.split(",") if b.strip()],
        # A server from before issue 10 sends none of these: a record-level round.
        privacy_unit=str(config.get(CONFIG_PRIVACY_UNIT, "record") or "record"),
        update_clip=_optional(config, CONFIG_UPDATE_CLIP),
        day_sample_rate=_optional(config, CONFIG_DAY_SAMPLE_RATE),
    )


def train_request(
    config: ConfigRecord, weights: list[np.ndarray], context: Context
) -> device_pb2.TrainRequest:
    """The Device.Train request for one round (shared with the SecAgg+ path)."""
    return device_pb2.TrainRequest(
        run_id=str(config.get(CONFIG_RUN_NAME, context.run_id)),
        server_round=_round(config),
        weights=weights_to_proto(weights),
        spec=_spec(config),
    )


def round_spec(config: ConfigRecord) -> tuple[str, int, device_pb2.TrainSpec]:
    """``(run id, round, spec)`` of a round's fit config (the SecAgg+ masking stage)."""
    return str(config[CONFIG_RUN_NAME]), _round(config), _spec(config)


def _round(config: ConfigRecord) -> int:
    value = _number(config, CONFIG_SERVER_ROUND)
    # The proto field is uint64: a negative or huge round would raise inside
    # protobuf; the daemon checks the range it accepts.
    if not value.is_integer() or not 0 <= value < 2**64:
        raise ValueError(f"run config 'server-round' = {value!r} is not a round number")
    return int(value)


def error_reply(msg: Message, error: Exception) -> Message:
    """The Flower error reply for ``error``: refused, unavailable or failed (see module)."""
    if isinstance(error, grpc.RpcError):
        code = error.code()
        refused = code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)
        unavailable = code == grpc.StatusCode.UNAVAILABLE
        reason = error.details() or str(code)
        error_code = (
            ERROR_REFUSED if refused else ERROR_UNAVAILABLE if unavailable else ERROR_FAILED
        )
        return Message(error=Error(code=error_code, reason=reason), reply_to=msg)
    if isinstance(error, DeviceUnavailableError):
        return Message(error=Error(code=ERROR_UNAVAILABLE, reason=str(error)), reply_to=msg)
    return Message(error=Error(code=ERROR_FAILED, reason=str(error)), reply_to=msg)
