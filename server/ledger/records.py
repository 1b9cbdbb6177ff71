"""What the server ledger stores: its flags, the report fields it requires, its rows.

Design
------
The data model of :mod:`keystay.server.ledger.ledger`, apart from the SQL
that stores it and the rules that judge a report
(:mod:`keystay.server.ledger.rules`), so the budget report and the audit read
the same types without importing storage. Every class is a frozen dataclass
of one table row or one conclusion.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FLAG_UNVERIFIABLE = "unverifiable"
FLAG_CONTRADICTION = "contradiction"
FLAG_OVER_BUDGET = "over-budget"
FLAGS: tuple[str, ...] = (FLAG_UNVERIFIABLE, FLAG_CONTRADICTION, FLAG_OVER_BUDGET)

#: Fields every report payload must carry, with the JSON types allowed.
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "device_id": (str,),
    "run_id": (str,),
    "server_round": (int,),
    "noise_multiplier": (int, float),
    "sample_rate": (int, float),
    "steps": (int,),
    "delta": (int, float),
    "accountant": (str,),
    "epsilon_round": (int, float),
    "epsilon_total": (int, float),
    "max_grad_norm": (int, float),
    # No "num_examples": devices no longer report their window count (a fact
    # about their data no DP mechanism paid for); older reports that carry it
    # still read, the field is simply not required.
    "unit": (str,),
    "blocks": (list,),
}
REQUIRED_BLOCK_FIELDS: dict[str, tuple[type, ...]] = {
    "block": (str,),
    "epsilon": (int, float),
    # Comparison figures: null when that accountant could not compute (the
    # enforced ``epsilon`` is always a number).
    "epsilon_rdp": (int, float, type(None)),
    "epsilon_prv": (int, float, type(None)),
    "budget": (int, float),
    "retired": (bool,),
}


#: What an employee-day report (format v2) carries besides the v1 fields.
REQUIRED_DAY_FIELDS: dict[str, tuple[type, ...]] = {
    "assumptions": (list,),
    "noise_multiplier_broken": (int, float),
    "epsilon_round_broken": (int, float),
    "epsilon_round_broken_rdp": (int, float),
    "epsilon_total_broken": (int, float),
    "min_summed_devices": (int,),
    "update_clip": (int, float),
    "day_sample_rate": (int, float),
}
REQUIRED_DAY_BLOCK_FIELDS: dict[str, tuple[type, ...]] = {
    "epsilon_broken": (int, float),
    "epsilon_broken_rdp": (int, float, type(None)),
    "epsilon_broken_prv": (int, float, type(None)),
    "budget_broken": (int, float),
}
#: The two trust assumptions, as an employee-day report names them (in order).
DAY_ASSUMPTIONS = ["honest-but-curious server", "server that breaks secure aggregation"]
UNIT_DAY = "employee-day"


@dataclass(frozen=True, slots=True)
class Device:
    """An enrolled device.

    Attributes
    ----------
    device_id : str
        Pseudonymous id derived from the signing key.
    name : str
        Free label given at enrollment (may be empty).
    signing_public_key_pem : str
        Ed25519 public key, SubjectPublicKeyInfo PEM.
    enrolled_at : str
    revoked_at : str or None
        ISO 8601 UTC; None while the device is trusted.
    """

    device_id: str
    name: str
    signing_public_key_pem: str
    enrolled_at: str
    revoked_at: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class Finding:
    """One reason behind a flag: ``flag`` (one of :data:`FLAGS`), a sentence, a block."""

    flag: str
    detail: str
    block: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"flag": self.flag, "detail": self.detail, "block": self.block}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the ledger concluded about one report.

    Attributes
    ----------
    report_id : int
        Row id in ``reports`` (report order).
    device_id : str
        The device the payload names ('' if the payload is unreadable).
    verified : bool
        Authentic report of this device for this run and round (see module
        docstring). Only verified reports are counted.
    signature_valid : bool
        The signature alone verifies under the enrolled key.
    flags : tuple of str
        Sorted subset of :data:`FLAGS`; empty for a clean report.
    findings : tuple of Finding
        One sentence per problem found.
    """

    report_id: int
    device_id: str
    verified: bool
    signature_valid: bool
    flags: tuple[str, ...]
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """Verified and unflagged: the update may be aggregated."""
        return self.verified and not self.flags

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f.detail for f in self.findings)


@dataclass(frozen=True, slots=True)
class StoredReport:
    """A row of ``reports``."""

    id: int
    received_at: str
    run_id: str
    server_round: int
    device_id: str
    node_id: str | None
    payload_json: str
    signature: bytes
    signature_valid: bool
    verified: bool
    flags: tuple[str, ...]
    findings: tuple[Finding, ...]

    def payload(self) -> dict[str, Any] | None:
        """The payload parsed, or None if it is not a JSON object."""
        try:
            data = json.loads(self.payload_json)
        except json.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None


@dataclass(frozen=True, slots=True)
class BlockEpsilon:
    """A row of ``block_epsilons``: one block's ε after one verified report's charge."""

    report_id: int
    device_id: str
    block: str
    epsilon: float
    budget: float
    retired: bool
    run_id: str
    server_round: int


@dataclass(frozen=True, slots=True)
class RefusalRecord:
    """A row of ``refusals``: a device declined a round, in its own words."""

    id: int
    received_at: str
    run_id: str
    server_round: int
    device: str
    reason: str


@dataclass(frozen=True, slots=True)
class CentralDPRecord:
    """A row of ``central_dp``: the central accountant's ε after one round of a run."""

    run_id: str
    server_round: int
    noise_multiplier: float
    clip: float
    sample_rate: float
    sampling: str
    epsilon: float
    delta: float
    recorded_at: str


@dataclass(frozen=True, slots=True)
class AuditFinding:
    """A stored report that no longer checks out (see :meth:`ServerLedger.audit`)."""

    report_id: int
    device_id: str
    detail: str


def flags_of(findings: Iterable[Finding]) -> tuple[str, ...]:
    """The sorted distinct flags of ``findings``."""
    return tuple(sorted({f.flag for f in findings}))
