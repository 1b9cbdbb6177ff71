"""The ClientApp side of SecAgg+: mask the device's update before it leaves.

A run started with ``secagg = true`` trains through Flower's SecAgg+ protocol
(``SecAggPlusWorkflow`` on the server, :func:`flwr.client.mod.secaggplus_mod`
here). Every SecAgg+ message is a ``train`` message; the ClientApp's
``train()`` hands it to :func:`secagg_train`, which runs ``secaggplus_mod``
around a legacy fit handler. Only one of the four stages trains: the third
("collect masked vectors"), whose handler asks the device daemon exactly as a
plain round does (``Federation.Train``, same ``TrainRequest``; the daemon checks
its policy, charges its ledger, trains with DP-SGD and signs the report).

What the handler gives the mod to mask, and why:

* the **update** ``new - global`` (not the new weights): it is small, so the
  mod's fixed-point quantisation to ``[-c, c]`` loses little precision;
* clipped to L2 norm ``S`` when the run asks for central DP
  (``secagg-update-clip`` in the fit config): the server can no longer see,
  let alone clip, an individual update, so the clip that bounds one device's
  influence (the sensitivity of user-level DP-FedAvg) has to happen here;
* weight 1 (``num_examples = 1`` in the legacy ``FitRes``): every device
  counts the same, as in central DP; Flower's mod multiplies the update by
  ``weight / max_weight`` *before* quantising, so example-count weights would
  either overflow or drown the update in quantisation noise.

No training loss rides in the vector any more (it once did, scaled, for a
mean loss): it is an exact statistic of the data that no DP mechanism paid
for, and a server that breaks the aggregation (see :func:`check_protocol`)
would read one device's loss in clear. The daemon no longer returns it.

What stays in clear beside the masked vector (the mod clears only the arrays
of the reply): the device id and the signed privacy report (nothing else: no
example count, no loss, no training time; classified in
:mod:`keystay.client.federation_fields`).
The server needs those per device to keep the privacy books, exactly as in a
plain round, and verifies each report before the masked vector it came with
enters the sum.

The device also refuses protocol parameters that would weaken the masking
(see :func:`check_protocol`): a server that lies about who dropped out can
otherwise ask for the secrets that unmask one device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import grpc
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat

from keystay.client.federation_client import DeviceUnavailableError, FederationClient
from keystay.client.requests import device_socket, error_reply, train_request
from keystay.client.serde import weights_from_proto
from keystay.common.flatclip import clip_update
from keystay.common.wire import CONFIG_UPDATE_CLIP, ERROR_REFUSED, SECAGG_WEIGHT

__all__ = ["CONFIG_UPDATE_CLIP", "SECAGG_WEIGHT", "is_secagg_message", "secagg_train"]

#: Fewest key shares the device accepts; Flower itself needs more than 2.
MIN_SHARES = 3


class _Declined(Exception):  # noqa: N818  (control flow, not an error type)
    """The daemon said no (or was unreachable): carries the error reply to send."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def is_secagg_message(msg: Message) -> bool:
    """True for a message of Flower's SecAgg+ protocol (its configs record present)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def check_protocol(configs: ConfigRecord, own_node_id: int) -> str | None:
    """The reason to refuse a SecAgg+ stage message, or None to take part.

    Flower's SecAgg+ (1.39) trusts the server to follow the protocol. Two
    checks the device can make on its own, against a server that does not:

    * **setup**: ``threshold`` must be more than half of ``share_num`` (and
      ``share_num >= 3``). A device's two secrets (its mask seed, revealed
      for devices reported alive, and its key, revealed for devices reported
      dropped) are each split into ``share_num`` shares; a holder answers once
      per round, so the server can collect ``threshold`` shares of both only
      if ``2 * threshold <= share_num``, and both unmask that device.
    * **unmask**: no device may be reported alive and dropped at once, and
      this device, which did send its masked vector, may not be reported
      dropped (its own key share would help unmask it).

    These do not make the protocol secure against a malicious server: one
    that tells different devices different dropout stories, or enrolls fake
    devices, can still unmask one update (Flower has no consistency round).
    Device-side DP-SGD is the guarantee that holds against such a server.
    """
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        shares = configs.get(Key.SHARE_NUMBER)
        threshold = configs.get(Key.THRESHOLD)
        if not isinstance(shares, int) or not isinstance(threshold, int):
            return "refused: SecAgg+ setup without integer share_num and threshold"
        if shares < MIN_SHARES or 2 * threshold <= shares:
            return (
                f"refused: SecAgg+ with {shares} shares and threshold {threshold} would let "
                f"the server rebuild both of a device's secrets; this device needs at least "
                f"{MIN_SHARES} shares and a threshold above half of them "
                "(set secagg-num-shares / secagg-reconstruction-threshold accordingly)"
            )
    elif stage == Stage.UNMASK:
        active = set(cast(list[int], configs.get(Key.ACTIVE_NODE_ID_LIST, [])))
        dead = set(cast(list[int], configs.get(Key.DEAD_NODE_ID_LIST, [])))
        if active & dead:
            return (
                "refused: SecAgg+ unmask names devices both alive and dropped "
                f"({sorted(active & dead)}); answering would reveal both of their secrets"
            )
        if own_node_id in dead:
            return (
                "refused: SecAgg+ unmask reports this device as dropped although it sent "
                "its masked update"
            )
    return None


def masked_vector(
    global_weights: Sequence[np.ndarray],
    new_weights: Sequence[np.ndarray],
    clip_norm: float | None,
) -> list[np.ndarray]:
    """What the device hands the SecAgg+ mod: its (clipped) update, nothing else.

    Raises
    ------
    ValueError
        The daemon answered with weights of another shape than it was sent,
        or with a non-finite update.
    """
    if len(global_weights) != len(new_weights):
        raise ValueError(
            f"the daemon returned {len(new_weights)} arrays for {len(global_weights)} sent"
        )
    update = []
    for g, n in zip(global_weights, new_weights, strict=True):
        if np.shape(g) != np.shape(n):
            raise ValueError(f"the daemon returned shape {np.shape(n)} for {np.shape(g)}")
        update.append(np.asarray(n, dtype=np.float64) - np.asarray(g, dtype=np.float64))
    # One NaN or inf would not stay in this device's share: the quantiser turns
    # it into an arbitrary integer that corrupts everyone's sum, unseen.
    if not all(np.all(np.isfinite(u)) for u in update):
        raise ValueError("the daemon's update is not finite; not sending it")
    if clip_norm is not None:
        update, _ = clip_update(update, clip_norm)
    return update


def _fit_handler(original: Message) -> ClientAppCallable:
    """The legacy fit handler ``secaggplus_mod`` calls in its masking stage."""

    def fit(msg: Message, context: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = ConfigRecord(dict(fitins.config))
        weights = parameters_to_ndarrays(fitins.parameters)
        try:
            request = train_request(config, weights, context)
            with FederationClient(device_socket(context)) as device:
                reply = device.train(request)
            clip = config.get(CONFIG_UPDATE_CLIP)
            vector = masked_vector(
                weights,
                weights_from_proto(reply.weights),
                None if clip is None else float(cast(float, clip)),
            )
        except (grpc.RpcError, DeviceUnavailableError, KeyError, ValueError) as error:
            # Answer the server's message, not the mod's: the mod has not
            # saved its state, so this device simply drops out of the round.
            raise _Declined(error_reply(original, error)) from error
        report = reply.report
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters(vector),
            num_examples=SECAGG_WEIGHT,
            metrics={
                "device-id": report.device_id,
                "payload-json": report.payload_json,
                "signature": bytes(report.signature),
            },
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return fit


def secagg_train(msg: Message, context: Context) -> Message:
    """Answer one SecAgg+ stage message (see the module docstring).

    Parameters
    ----------
    msg : Message
        A ``train`` message carrying Flower's SecAgg+ configs record.
    context : Context
        The ClientApp context; the mod keeps its per-round secrets in
        ``context.state`` between stages.

    Returns
    -------
    Message
        The stage's answer (public keys, encrypted shares, the masked vector
        with the signed privacy report, or key shares), or an error reply when
        the device refuses or cannot train.
    """
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    reason = check_protocol(configs, msg.metadata.dst_node_id)
    if reason is not None:
        return Message(error=Error(code=ERROR_REFUSED, reason=reason), reply_to=msg)
    try:
        return secaggplus_mod(msg, context, _fit_handler(msg))
    except _Declined as declined:
        return declined.reply
