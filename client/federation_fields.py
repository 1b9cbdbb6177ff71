"""Every value the device returns to the federation, and why it may leave.

The rule (SECURITY.md, "What leaves the device"): every value the device
sends towards the server is one of

``"a"``
    the DP-noised model update (clipped per record, Gaussian noise added by
    DP-SGD on the device);
``"b"``
    a DP-noised statistic the ledger charged before computing it (none today:
    the device answers no statistic queries; the class is kept so one can be
    added honestly, with its charge);
``"c"``
    a public constant of the protocol: the format version, the device id, an
    echo of what the request asked, or the signed report of charges (whose
    figures follow from the request's mechanism and the ledger's history,
    never from the data's content or size).

:data:`FIELDS` classifies every such value with a one-line reason. Tests walk
(1) every field of every reply message of the daemon's federation RPCs
(:data:`FEDERATION_RPCS`), recursively through the protobuf descriptors,
(2) every key of the signed report's payload, and (3) every record key the
shipped ClientApp puts into a Flower reply; any value not in the table fails
them, so a new field cannot leave unexamined.

Keys: ``"Message.field"`` for protobuf fields, ``"payload.key"`` for the
signed JSON payload (``"payload.blocks[].key"`` inside its block list), and
``"clientapp.train.record.key"`` for the ClientApp's train reply
(``"*"`` for every entry of a record, e.g. the positional arrays). The SecAgg+
reply's clear-text metrics are ``"clientapp.secagg.metrics.key"``.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["a", "b", "c"]

#: The daemon's RPCs that answer the federation (the ClientApp on the
#: SuperNode). Their reply messages are walked field by field.
FEDERATION_RPCS: tuple[str, ...] = ("Train", "SecAggStage")

_REPORT = "part of the signed report of charges"

#: Every value that may leave, with its class and the reason it may.
FIELDS: dict[str, tuple[Kind, str]] = {
    # --- Device.Train reply (protobuf) ------------------------------------------------
    "TrainReply.weights": ("a", "the DP-SGD-updated weights: clipped and noised on the device"),
    "TrainReply.report": ("c", "the signed report of what the round cost"),
    "Tensor.shape": ("c", "the shared model's shape, fixed by the protocol"),
    "Tensor.dtype": ("c", "the shared model's dtype, fixed by the protocol"),
    "Tensor.data": ("a", "the values of the DP-noised weights"),
    "PrivacyReport.device_id": ("c", "the device's pseudonymous key id"),
    "PrivacyReport.run_id": ("c", "echo of the request's run id"),
    "PrivacyReport.server_round": ("c", "echo of the request's round"),
    "PrivacyReport.noise_multiplier": ("c", "echo of the request's σ (bounded by the policy)"),
    "PrivacyReport.sample_rate": ("c", "echo of the request's q, never derived from the data"),
    "PrivacyReport.steps": ("c", "echo of the request's step count"),
    "PrivacyReport.delta": ("c", "the device policy's δ, a published constant"),
    "PrivacyReport.accountant": ("c", "name of the enforced ε bound"),
    "PrivacyReport.epsilon_round_rdp": ("c", "ε of the requested mechanism alone: (σ, q, T, δ)"),
    "PrivacyReport.epsilon_total": ("c", f"{_REPORT}: the device's ε after this round"),
    "PrivacyReport.blocks": ("c", f"{_REPORT}: the days charged"),
    "PrivacyReport.max_grad_norm": ("c", "echo of the request's clip norm"),
    "PrivacyReport.unit": ("c", "the unit of privacy, a constant sentence"),
    "PrivacyReport.signature": ("c", "Ed25519 signature over payload_json"),
    "PrivacyReport.payload_json": ("c", "the signed report's canonical bytes (keys below)"),
    "BlockCharge.block": ("c", f"{_REPORT}: which day paid"),
    "BlockCharge.epsilon_rdp": ("c", f"{_REPORT}: the day's ε under RDP"),
    "BlockCharge.epsilon_prv": ("c", f"{_REPORT}: the day's ε under PRV"),
    "BlockCharge.epsilon": ("c", f"{_REPORT}: the day's enforced ε"),
    "BlockCharge.budget": ("c", f"{_REPORT}: the day's budget (policy constant)"),
    "BlockCharge.retired": ("c", f"{_REPORT}: whether the day's budget is spent"),
    # --- Device.SecAggStage reply (protobuf) ------------------------------------------
    "SecAggStageReply.configs": (
        "a",
        "the SecAgg+ stage's record: public keys, key shares encrypted to neighbours, the "
        "masked vector (the clipped day sum with the device's discrete Gaussian noise, "
        "masked), or the shares that unmask only the sum",
    ),
    "SecAggStageReply.report": ("c", "the signed report of what the round cost"),
    # --- the signed payload (PrivacyReport.to_dict) ------------------------------------
    "payload.format": ("c", "the report format version"),
    "payload.device_id": ("c", "the device's pseudonymous key id"),
    "payload.run_id": ("c", "echo of the request's run id"),
    "payload.server_round": ("c", "echo of the request's round"),
    "payload.blocks": ("c", f"{_REPORT}: the days charged"),
    "payload.blocks[].block": ("c", f"{_REPORT}: which day paid"),
    "payload.blocks[].epsilon_rdp": ("c", f"{_REPORT}: the day's ε under RDP"),
    "payload.blocks[].epsilon_prv": ("c", f"{_REPORT}: the day's ε under PRV"),
    "payload.blocks[].epsilon": ("c", f"{_REPORT}: the day's enforced ε"),
    "payload.blocks[].budget": ("c", f"{_REPORT}: the day's budget (policy constant)"),
    "payload.blocks[].retired": ("c", f"{_REPORT}: whether the day's budget is spent"),
    "payload.noise_multiplier": ("c", "echo of the request's σ"),
    "payload.sample_rate": ("c", "echo of the request's q, never derived from the data"),
    "payload.steps": ("c", "echo of the request's step count"),
    "payload.delta": ("c", "the device policy's δ"),
    "payload.accountant": ("c", "name of the enforced ε bound"),
    "payload.epsilon_round": ("c", "enforced ε of the requested mechanism alone"),
    "payload.epsilon_round_rdp": ("c", "RDP ε of the requested mechanism alone"),
    "payload.epsilon_total": ("c", f"{_REPORT}: the device's ε after this round"),
    "payload.max_grad_norm": ("c", "echo of the request's clip norm"),
    "payload.unit": ("c", "the unit of privacy, a constant sentence"),
    "payload.created": ("c", "when the charge was written (the round's own time)"),
    "payload.update_sha256": ("c", "digest binding the report to the DP-noised update"),
    # --- employee-day reports (format v2): the second series and its mechanism -------
    "payload.assumptions": ("c", "the two trust assumptions' names, constants"),
    "payload.noise_multiplier_broken": ("c", "σ_eff/√t: from the request's σ and the policy"),
    "payload.epsilon_round_broken": ("c", "enforced ε of the device's own share alone"),
    "payload.epsilon_round_broken_rdp": ("c", "RDP ε of the device's own share alone"),
    "payload.epsilon_total_broken": ("c", f"{_REPORT}: broken-aggregation ε after the round"),
    "payload.min_summed_devices": ("c", "the device policy's t, a published constant"),
    "payload.update_clip": ("c", "echo of the request's per-day clip C"),
    "payload.day_sample_rate": ("c", "echo of the request's day rate q, never the sample"),
    "payload.blocks[].epsilon_broken": ("c", f"{_REPORT}: the day's broken-aggregation ε"),
    "payload.blocks[].epsilon_broken_rdp": ("c", f"{_REPORT}: that ε under RDP"),
    "payload.blocks[].epsilon_broken_prv": ("c", f"{_REPORT}: that ε under PLD"),
    "payload.blocks[].budget_broken": ("c", f"{_REPORT}: its budget (policy constant)"),
    # --- what the shipped ClientApp puts in a train reply ------------------------------
    "clientapp.train.arrays.*": ("a", "the DP-noised weights, as the daemon returned them"),
    "clientapp.train.metrics.num-examples": (
        "c",
        "FedAvg weight: the constant 1 for every device, never a count of data",
    ),
    "clientapp.train.metrics.epsilon-total": ("c", "copy of the signed report's epsilon_total"),
    "clientapp.train.report.device-id": ("c", "the device's pseudonymous key id"),
    "clientapp.train.report.payload-json": ("c", "the signed report's canonical bytes"),
    "clientapp.train.report.signature": ("c", "Ed25519 signature over the payload"),
    # --- SecAgg+: the relayed stage record and clear-text metrics beside it -----------
    "clientapp.secagg.configs.*": ("a", "the daemon's SecAggStageReply.configs, relayed"),
    "clientapp.secagg.metrics.num-examples": ("c", "the weight: the constant 1"),
    "clientapp.secagg.metrics.device-id": ("c", "the device's pseudonymous key id"),
    "clientapp.secagg.metrics.payload-json": ("c", "the signed report's canonical bytes"),
    "clientapp.secagg.metrics.signature": ("c", "Ed25519 signature over the payload"),
}


def classify(key: str) -> Kind | None:
    """The class of ``key`` (see the module docstring), or None if unclassified."""
    entry = FIELDS.get(key)
    return entry[0] if entry is not None else None
