"""The privacy report a device sends with every update, and its signature.

The report states what one round spent and under which mechanism, and what
each block it read has spent in total. The device signs the report's
canonical bytes with its Ed25519 key (:mod:`keystay.client.identity`); the
server stores payload and signature and checks them with
:func:`keystay.server.ledger.verify.verify_report`, which restates the
canonical form without importing this module.

Canonical bytes: UTF-8 JSON of :meth:`PrivacyReport.to_dict`, keys sorted,
separators ``","`` and ``":"``, ASCII escapes, floats written as Python's
``repr`` (the shortest string that reads back the same double), NaN and
infinities refused. The payload carries ``"format":
"keystay.privacy-report.v1"`` so a later format cannot be mistaken for it.

No event data is ever in a report, and no count of it: mechanisms, ε
figures, ids and public constants. The report once carried ``num_examples``
(the device's training window count); that is a fact about the data no DP
mechanism paid for, so it is gone, and the sampling rate it names is the
run's chosen ``q``, never ``B / n`` (which would reveal ``n`` again). Every
field of the report is classified in :mod:`keystay.client.federation_fields`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.accounting import Mechanism
from keystay.client.ledger.ledger import Charge, Ledger
from keystay.client.policy import ASSUMPTION_BROKEN, ASSUMPTION_HONEST, TrainingRequest
from keystay.common.canonical import canonical_json
from keystay.common.windows import PRIVACY_UNIT

REPORT_FORMAT = "keystay.privacy-report.v1"
#: Reports of employee-day rounds: every v1 key plus the second series and the
#: mechanism's parameters. Record-level reports keep v1 byte for byte.
REPORT_FORMAT_DAY = "keystay.privacy-report.v2"
UNIT = PRIVACY_UNIT
UNIT_DAY = "employee-day"
#: The trust assumptions of the two series, as the report names them.
ASSUMPTIONS: tuple[str, str] = (ASSUMPTION_HONEST, ASSUMPTION_BROKEN)


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """A block's ε after the round's charge (proto ``BlockCharge``).

    ``epsilon`` is the enforced bound; ``epsilon_prv`` is the tight
    numerical accountant's figure (the wire name is kept: since the ledger
    became incremental it is the certified PLD bound, before that the PRV
    estimate). ``epsilon_rdp`` / ``epsilon_prv`` are inf (``null`` in the
    payload) when that accountant gave no finite bound for the history.
    """

    block: str
    epsilon_rdp: float
    epsilon_prv: float
    epsilon: float
    budget: float
    retired: bool
    epsilon_broken: float | None = None
    epsilon_broken_rdp: float | None = None
    epsilon_broken_prv: float | None = None
    budget_broken: float | None = None


@dataclass(frozen=True, slots=True)
class PrivacyReport:
    """What one round cost, as the device reports and signs it.

    Attributes
    ----------
    device_id : str
        Pseudonymous id of the signing key.
    run_id : str
    server_round : int
    blocks : tuple of ReportBlock
        Every block the round read, with its ε after this round.
    noise_multiplier, sample_rate : float
    steps : int
        The mechanism ``(σ, q, T)`` of this round.
    delta : float
    accountant : str
        Name of the enforced bound (e.g. ``"min(rdp, pld)"``).
    epsilon_round : float
        Enforced ε of this round's mechanism alone.
    epsilon_round_rdp : float
        RDP ε of this round alone (proto ``epsilon_round_rdp``).
    epsilon_total : float
        The device's ε after the round: the largest enforced ε over all its
        blocks (ledger totals).
    max_grad_norm : float
    unit : str
        The unit of privacy, stated honestly.
    created : float
        Unix seconds when the charge was written.
    update_sha256 : str
        :func:`keystay.common.digest.weights_sha256` of the update this report
        accounts for, binding the two (empty if the report was built without
        an update).
    noise_multiplier_broken : float or None
        Employee-day reports (format v2): σ of the device's own share, the
        mechanism a server that breaks secure aggregation faces; the other
        ``*_broken`` figures are that series' ε. ``noise_multiplier`` is then
        the honest-but-curious server's σ_eff and ``steps`` is 1.
    min_summed_devices : int
        t of the device policy (0 in record-level reports).
    update_clip, day_sample_rate : float
        The round's per-day clip C and day sampling rate q.
    """

    device_id: str
    run_id: str
    server_round: int
    blocks: tuple[ReportBlock, ...]
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    epsilon_round: float
    epsilon_round_rdp: float
    epsilon_total: float
    max_grad_norm: float
    unit: str = UNIT
    created: float = 0.0
    update_sha256: str = ""
    noise_multiplier_broken: float | None = None
    epsilon_round_broken: float | None = None
    epsilon_round_broken_rdp: float | None = None
    epsilon_total_broken: float | None = None
    min_summed_devices: int = 0
    update_clip: float = 0.0
    day_sample_rate: float = 0.0

    @property
    def employee_day(self) -> bool:
        return self.unit == UNIT_DAY

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (the signed content), with the format tag."""
        data = self._v1_dict()
        if not self.employee_day:
            return data
        data["format"] = REPORT_FORMAT_DAY
        for entry, b in zip(data["blocks"], self.blocks, strict=True):
            entry["epsilon_broken"] = float(_required(b.epsilon_broken, "epsilon_broken"))
            entry["epsilon_broken_rdp"] = _figure(
                _required(b.epsilon_broken_rdp, "epsilon_broken_rdp"))
            entry["epsilon_broken_prv"] = _figure(
                _required(b.epsilon_broken_prv, "epsilon_broken_prv"))
            entry["budget_broken"] = float(_required(b.budget_broken, "budget_broken"))
        data.update(
            assumptions=list(ASSUMPTIONS),
            noise_multiplier_broken=float(
                _required(self.noise_multiplier_broken, "noise_multiplier_broken")),
            epsilon_round_broken=float(
                _required(self.epsilon_round_broken, "epsilon_round_broken")),
            epsilon_round_broken_rdp=float(
                _required(self.epsilon_round_broken_rdp, "epsilon_round_broken_rdp")),
            epsilon_total_broken=float(
                _required(self.epsilon_total_broken, "epsilon_total_broken")),
            min_summed_devices=int(self.min_summed_devices),
            update_clip=float(self.update_clip),
            day_sample_rate=float(self.day_sample_rate),
        )
        return data

    def _v1_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "device_id": self.device_id,
            "run_id": self.run_id,
            "server_round": int(self.server_round),
            "blocks": [
                {
                    "block": b.block,
                    "epsilon_rdp": _figure(b.epsilon_rdp),
                    "epsilon_prv": _figure(b.epsilon_prv),
                    "epsilon": float(b.epsilon),
                    "budget": float(b.budget),
                    "retired": bool(b.retired),
                }
                for b in self.blocks
            ],
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            "delta": float(self.delta),
            "accountant": self.accountant,
            "epsilon_round": float(self.epsilon_round),
            "epsilon_round_rdp": float(self.epsilon_round_rdp),
            "epsilon_total": float(self.epsilon_total),
            "max_grad_norm": float(self.max_grad_norm),
            "unit": self.unit,
            "created": float(self.created),
            "update_sha256": self.update_sha256,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyReport:
        """Read back :meth:`to_dict` (e.g. a parsed payload)."""
        if data.get("format") not in (REPORT_FORMAT, REPORT_FORMAT_DAY):
            raise ValueError(
                f"report format {data.get('format')!r} is not {REPORT_FORMAT!r} or "
                f"{REPORT_FORMAT_DAY!r}"
            )
        values = {
            k: v for k, v in data.items() if k not in ("format", "blocks", "assumptions")
        }
        inf_if_null = ("epsilon_rdp", "epsilon_prv", "epsilon_broken_rdp", "epsilon_broken_prv")
        blocks = tuple(
            ReportBlock(
                **{
                    **b,
                    **{k: math.inf for k in inf_if_null if k in b and b[k] is None},
                }
            )
            for b in data["blocks"]
        )
        return cls(blocks=blocks, **values)


def report_from_charge(
    charge: Charge,
    *,
    device_id: str,
    max_grad_norm: float,
) -> PrivacyReport:
    """The report for an admitted charge (what the daemon returns with the update)."""
    return PrivacyReport(
        device_id=device_id,
        run_id=charge.run_id,
        server_round=charge.server_round,
        blocks=tuple(
            ReportBlock(
                block=b.block,
                epsilon_rdp=b.epsilon_rdp,
                epsilon_prv=b.epsilon_prv,
                epsilon=b.epsilon,
                budget=b.budget,
                retired=b.retired,
                epsilon_broken=b.epsilon_broken,
                epsilon_broken_rdp=b.epsilon_broken_rdp,
                epsilon_broken_prv=b.epsilon_broken_prv,
                budget_broken=b.budget_broken,
            )
            for b in charge.blocks
        ),
        noise_multiplier=float(charge.mechanism.noise_multiplier),
        sample_rate=float(charge.mechanism.sample_rate),
        steps=int(charge.mechanism.steps),
        delta=charge.delta,
        accountant=charge.accountant,
        epsilon_round=charge.epsilon_round_enforced,
        epsilon_round_rdp=float(charge.epsilon_round.rdp),
        epsilon_total=charge.epsilon_total,
        max_grad_norm=float(max_grad_norm),
        created=charge.created,
        **_day_fields(charge),
    )


def _day_fields(charge: Charge) -> dict[str, Any]:
    """The v2 fields of an employee-day charge (none for a record-level one)."""
    if charge.unit != UNIT_DAY or charge.broken_mechanism is None:
        return {}
    alone = charge.epsilon_round_broken
    return {
        "unit": UNIT_DAY,
        "noise_multiplier_broken": float(charge.broken_mechanism.noise_multiplier),
        "epsilon_round_broken": charge.epsilon_round_broken_enforced,
        "epsilon_round_broken_rdp": None if alone is None else float(alone.rdp),
        "epsilon_total_broken": charge.epsilon_total_broken,
        "min_summed_devices": charge.min_summed_devices,
        "update_clip": charge.update_clip,
        "day_sample_rate": charge.day_sample_rate,
    }


def _required(value: float | None, name: str) -> float:
    if value is None:
        raise ValueError(f"an employee-day report needs {name}")
    return value


def build_report(
    *,
    device_id: str,
    request: TrainingRequest,
    mechanism: Mechanism,
    delta: float,
    charge: Charge,
    ledger: Ledger | None = None,
    update_sha256: str = "",
) -> PrivacyReport:
    """The report for ``charge``, cross-checked against what the round ran.

    The daemon's call: the report must state exactly what was charged, so a
    mechanism, δ or run that differs from the charge is a bug and raises
    rather than signing a report that disagrees with the ledger.

    Parameters
    ----------
    device_id : str
    request : TrainingRequest
        The round as asked (gives ``max_grad_norm``).
    mechanism : Mechanism
        The mechanism the trainer ran; must equal ``charge.mechanism``.
    delta : float
        The policy δ; must equal ``charge.delta``.
    charge : Charge
        From :meth:`Ledger.admit`.
    ledger : Ledger, optional
        If given, ``epsilon_total`` is read from it now
        (:meth:`Ledger.device_epsilon`); otherwise the total at charge time.

    Raises
    ------
    ValueError
        If the mechanism, δ, run or round differ from the charge's.
    """
    ran = (float(mechanism.noise_multiplier), float(mechanism.sample_rate), int(mechanism.steps))
    charged = charge.mechanism
    if ran != (float(charged.noise_multiplier), float(charged.sample_rate), int(charged.steps)):
        raise ValueError(f"mechanism {mechanism} is not the one charged ({charge.mechanism})")
    if delta != charge.delta:
        raise ValueError(f"delta {delta} is not the one charged ({charge.delta})")
    if (request.run_id, int(request.server_round)) != (charge.run_id, charge.server_round):
        raise ValueError(
            f"request is run {request.run_id!r} round {request.server_round}, the charge is "
            f"run {charge.run_id!r} round {charge.server_round}"
        )
    report = report_from_charge(
        charge,
        device_id=device_id,
        max_grad_norm=request.max_grad_norm,
    )
    if ledger is not None:
        report = dataclasses.replace(report, epsilon_total=ledger.device_epsilon())
        if report.employee_day:
            report = dataclasses.replace(
                report, epsilon_total_broken=ledger.device_epsilon_broken()
            )
    return dataclasses.replace(report, update_sha256=update_sha256)


def _figure(x: float) -> float | None:
    # A per-block RDP/PRV figure is inf when that accountant failed for the
    # history (the enforced bound then comes from the other); JSON has no
    # inf, so the report says null: "no bound from this accountant".
    return float(x) if math.isfinite(x) else None


def canonical_bytes(report: PrivacyReport) -> bytes:
    """The bytes a device signs: sorted-key compact ASCII JSON, floats by ``repr``.

    Raises
    ------
    ValueError
        If an enforced figure is NaN or infinite (never: the ledger refuses
        a round whose enforced ε is not below the budget).
    """
    return canonical_json(report.to_dict())


def sign_report(report: PrivacyReport, identity: DeviceIdentity) -> tuple[bytes, bytes]:
    """Sign ``report`` with the device key: returns ``(payload, signature)``.

    Raises
    ------
    ValueError
        If the report names another device than the signing identity.
    """
    if report.device_id != identity.device_id:
        raise ValueError(
            f"report names device {report.device_id!r} but the signing key is "
            f"{identity.device_id!r}"
        )
    payload = canonical_bytes(report)
    return payload, identity.sign(payload)
