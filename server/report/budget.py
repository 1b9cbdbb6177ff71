"""The privacy-budget report for security reviewers, built from the server ledger.

What it answers, per pseudonymous device and per data block (employee-day):
how much ε has been spent, against which budget, what remains, whether the
block is retired, and which runs touched it; per run, the central-DP ε (if
central DP was on); and, listed first, everything that needs a person:

* ``over-budget``: a device reported a block past its budget (either budget);
* ``contradiction``: a device's figures went down, a retired block was
  charged again, two reports for one round, or a report from the wrong device;
* ``unverifiable``: a report that does not verify under the enrolled key
  (unknown or revoked device, bad signature, replayed or malformed report);
* ``tampered``: a report accepted on receipt that no longer checks out as
  stored (the ledger file was edited at rest);
* ``central-over-policy`` / ``central-no-privacy`` / ``central-contradiction``:
  a run's central ε above the limit given, infinite (no noise), or decreasing.

Only verified reports are counted in the per-block figures. A block's
"spent" is the largest ε any verified report gave it (budgets only grow, so
the largest is the conservative figure even if a contradiction was flagged).

Two units, two kinds of block
-----------------------------
A block charged by employee-day rounds (signed report v2) has **two** ε,
each per employee-day and each with its own budget: against an
*honest-but-curious server* (which sees only the sum of several devices'
updates) and against a *server that breaks secure aggregation* (which sees
this device's share alone). A block charged by record-level rounds (report
v1) has one ε per record (:data:`PRIVACY_UNIT`), which holds against anyone
who sees the device's update. Each block says which (``unit``).

JSON schema (``keystay budget report --json``), ``keystay.budget-report/v2``
(v1 plus ``units``, ``assumptions`` and the per-block ``unit`` and
``*_broken_aggregation`` keys; every v1 key keeps its meaning for
record-level blocks)::

    {
      "schema": "keystay.budget-report/v2",
      "generated_at": "ISO 8601 UTC",
      "privacy_unit": str,               # what one record-level ε protects, in words
      "units": {"record": str, "employee-day": str},   # each unit in words
      "assumptions": {                   # what each ε of an employee-day block holds against
        "epsilon": "honest-but-curious server",
        "epsilon_broken_aggregation": "server that breaks secure aggregation"},
      "units_reported": [str],           # units named by verified reports (older devices differ)
      "ledger": "path of ledger.v1.sqlite",
      "clean": true | false,             # no violations
      "summary": {"devices": int, "reports": int, "verified_reports": int,
                  "flagged_reports": int, "violations": int, "refusals": int},
      "violations": [                    # sorted: kind order above, then report order
        {"kind": str, "device_id": str | null, "run_id": str | null,
         "server_round": int | null, "block": str | null, "report_id": int | null,
         "detail": str}
      ],
      "unverifiable_reports": [
        {"report_id": int, "received_at": str, "run_id": str, "server_round": int,
         "device_id": str, "signature_valid": bool, "reasons": [str]}
      ],
      "devices": [
        {"device_id": str, "enrolled_at": str | null, "revoked_at": str | null,
         "reports": int, "verified_reports": int, "flagged_reports": int,
         "epsilon_total": number | null,  # largest verified device total
         "epsilon_total_broken_aggregation": number | null,  # the same, broken aggregation
         "runs": [str],
         "blocks": [
           {"block": str,
            "unit": "employee-day" | "record",
            "assumption": "honest-but-curious server" | null,   # null: record level
            "epsilon": number, "budget": number, "remaining": number,
            "assumption_broken_aggregation": "server that breaks secure aggregation" | null,
            "epsilon_broken_aggregation": number | null,        # null: record level
            "budget_broken_aggregation": number | null,
            "remaining_broken_aggregation": number | null,
            "retired": bool,
            "over_budget": bool,            # past either budget
            "over_budget_broken_aggregation": bool,
            "charges": int, "runs": [str]}
         ]}
      ],
      "central_dp": [
        {"run_id": str, "rounds": int, "last_round": int, "noise_multiplier": number,
         "clip": number, "sample_rate": number, "sampling": str,
         "epsilon": number | null,        # null: unbounded (no noise); see violations
         "delta": number}
      ],
      "refusals": [
        {"run_id": str, "server_round": int, "device": str, "reason": str,
         "received_at": str}
      ]
    }

Every ε is at the δ its device (or the central accountant) reported; the
devices state δ and the accountant in each signed report.

The model lives here; :mod:`keystay.server.report.render` renders it as the
text table, the JSON above and the plot, and :mod:`keystay.server.report.html`
as a page.

Unit of privacy (``privacy_unit``): a record-level ε is per *record*, one
non-overlapping run of 33 input events of one employee-day; each event is in
exactly one record. An employee-day ε is per *employee-day*
(:data:`EMPLOYEE_DAY_UNIT`). Every signed report states its unit;
``units_reported`` lists the units the verified reports name, so a device on
an older release (whose records overlapped) shows up rather than being read
at the new unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from keystay.server.ledger.figures import (
    ASSUMPTION_BROKEN,
    ASSUMPTION_HONEST,
    UNIT_DAY,
    UNIT_RECORD,
    day_figures,
    report_unit,
)
from keystay.server.ledger.ledger import (
    FLAG_CONTRADICTION,
    FLAG_OVER_BUDGET,
    FLAG_UNVERIFIABLE,
    CentralDPRecord,
    ServerLedger,
    StoredReport,
)

SCHEMA = "keystay.budget-report/v2"
#: The unit devices sign into their reports (``keystay.common.windows.PRIVACY_UNIT``;
#: restated here because the server does not import device code, and a unit
#: test holds the two equal).
PRIVACY_UNIT = (
    "one training record = 33 consecutive input events of one employee-day; "
    "records do not overlap, so each event is in exactly one record"
)

#: The employee-day unit, in words (what a v2 report's two ε protect).
EMPLOYEE_DAY_UNIT = (
    "one employee-day = everything one employee did on one day; removing or changing "
    "any one day changes what the device sends by at most one clipped update"
)
#: The units a block can be in, by their short name, in words.
UNITS: dict[str, str] = {UNIT_RECORD: PRIVACY_UNIT, UNIT_DAY: EMPLOYEE_DAY_UNIT}
#: The two trust assumptions of an employee-day block, each in one sentence.
ASSUMPTION_SENTENCES: dict[str, str] = {
    ASSUMPTION_HONEST: (
        "an honest-but-curious server follows the protocol and sees only the sum of at "
        "least t devices' updates, whose noise adds up"
    ),
    ASSUMPTION_BROKEN: (
        "a server that breaks secure aggregation sees this device's update alone, with "
        "only the device's own share of the noise"
    ),
}

KIND_OVER_BUDGET = FLAG_OVER_BUDGET
KIND_CONTRADICTION = FLAG_CONTRADICTION
KIND_UNVERIFIABLE = FLAG_UNVERIFIABLE
KIND_TAMPERED = "tampered"
KIND_CENTRAL_OVER_POLICY = "central-over-policy"
KIND_CENTRAL_NO_PRIVACY = "central-no-privacy"
KIND_CENTRAL_CONTRADICTION = "central-contradiction"

#: Order violations are listed in: what most urgently needs a person first.
KIND_ORDER: tuple[str, ...] = (
    KIND_OVER_BUDGET,
    KIND_TAMPERED,
    KIND_CONTRADICTION,
    KIND_UNVERIFIABLE,
    KIND_CENTRAL_OVER_POLICY,
    KIND_CENTRAL_NO_PRIVACY,
    KIND_CENTRAL_CONTRADICTION,
)


@dataclass(frozen=True, slots=True)
class Violation:
    """Something a security reviewer must look at.

    Attributes
    ----------
    kind : str
        One of :data:`KIND_ORDER`.
    detail : str
        What is wrong, in a sentence.
    device_id, run_id, server_round, block, report_id
        Where, when known.
    """

    kind: str
    detail: str
    device_id: str | None = None
    run_id: str | None = None
    server_round: int | None = None
    block: str | None = None
    report_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device_id": self.device_id,
            "run_id": self.run_id,
            "server_round": self.server_round,
            "block": self.block,
            "report_id": self.report_id,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class BlockLine:
    """One block of one device: what verified reports say it has spent.

    ``epsilon``/``budget`` are against an honest-but-curious server for an
    employee-day block, the record-level figures otherwise;
    ``epsilon_broken``/``budget_broken`` are against a server that breaks
    secure aggregation (None for a record-level block). ``unit`` is the unit
    of the block's latest verified charge.
    """

    block: str
    epsilon: float
    budget: float
    retired: bool
    charges: int
    runs: tuple[str, ...]
    unit: str = UNIT_RECORD
    epsilon_broken: float | None = None
    budget_broken: float | None = None

    @property
    def employee_day(self) -> bool:
        return self.unit == UNIT_DAY

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.epsilon)

    @property
    def remaining_broken(self) -> float | None:
        if self.epsilon_broken is None or self.budget_broken is None:
            return None
        return max(0.0, self.budget_broken - self.epsilon_broken)

    @property
    def over_budget(self) -> bool:
        """Past either budget."""
        return self.epsilon > self.budget or self.over_budget_broken

    @property
    def over_budget_broken(self) -> bool:
        return (self.epsilon_broken is not None and self.budget_broken is not None
                and self.epsilon_broken > self.budget_broken)


@dataclass(frozen=True, slots=True)
class DeviceLine:
    """One device (enrolled, or seen in reports) and its blocks."""

    device_id: str
    enrolled_at: str | None
    revoked_at: str | None
    reports: int
    verified_reports: int
    flagged_reports: int
    epsilon_total: float | None
    runs: tuple[str, ...]
    blocks: tuple[BlockLine, ...]
    epsilon_total_broken: float | None = None
    """Largest verified device total against a server that breaks secure aggregation."""


@dataclass(frozen=True, slots=True)
class CentralLine:
    """Central DP of one run, as of its last recorded round."""

    run_id: str
    rounds: int
    last_round: int
    noise_multiplier: float
    clip: float
    sample_rate: float
    sampling: str
    epsilon: float
    delta: float


@dataclass(frozen=True)
class BudgetReport:
    """Everything the renderers show. Build with :func:`build_report`."""

    generated_at: str
    ledger: str
    violations: tuple[Violation, ...]
    unverifiable: tuple[StoredReport, ...]
    devices: tuple[DeviceLine, ...]
    central: tuple[CentralLine, ...]
    refusals: tuple[dict[str, Any], ...]
    reports: int
    verified_reports: int
    flagged_reports: int
    series: dict[str, list[tuple[int, float, bool]]] = field(default_factory=dict)
    """Per device: (report id, most-spent block ε so far, report flagged) in report order
    (against an honest-but-curious server for employee-day reports)."""
    series_broken: dict[str, list[tuple[int, float, bool]]] = field(default_factory=dict)
    """The same against a server that breaks secure aggregation, for devices that sent
    employee-day reports (from their first one)."""
    received: dict[int, str] = field(default_factory=dict)
    """Report id -> when the server received it (ISO 8601), to put ``series`` on a time axis."""
    units_reported: tuple[str, ...] = ()
    """The units of privacy the verified reports state, sorted."""
    privacy_unit: str = PRIVACY_UNIT

    @property
    def clean(self) -> bool:
        return not self.violations


def _violations_from_reports(reports: Sequence[StoredReport]) -> list[Violation]:
    out = []
    for report in reports:
        for finding in report.findings:
            out.append(
                Violation(
                    kind=finding.flag,
                    detail=finding.detail,
                    device_id=report.device_id or None,
                    run_id=report.run_id,
                    server_round=report.server_round,
                    block=finding.block,
                    report_id=report.id,
                )
            )
    return out


def _central_lines(
    rows: Sequence[CentralDPRecord], max_central_epsilon: float | None
) -> tuple[list[CentralLine], list[Violation]]:
    by_run: dict[str, list[CentralDPRecord]] = {}
    for row in rows:
        by_run.setdefault(row.run_id, []).append(row)
    lines, violations = [], []
    for run_id, run_rows in sorted(by_run.items()):
        run_rows.sort(key=lambda r: r.server_round)
        last = run_rows[-1]
        # The accountant's ε is cumulative: report the largest, which is the
        # last unless something went wrong (flagged below).
        worst = max(r.epsilon for r in run_rows)
        lines.append(
            CentralLine(
                run_id=run_id,
                rounds=len(run_rows),
                last_round=last.server_round,
                noise_multiplier=last.noise_multiplier,
                clip=last.clip,
                sample_rate=last.sample_rate,
                sampling=last.sampling,
                epsilon=worst,
                delta=last.delta,
            )
        )
        for before, after in pairwise(run_rows):
            if after.epsilon < before.epsilon:
                violations.append(
                    Violation(
                        KIND_CENTRAL_CONTRADICTION,
                        f"central ε of run {run_id} fell from {before.epsilon:.6g} (round "
                        f"{before.server_round}) to {after.epsilon:.6g} (round "
                        f"{after.server_round}); an accountant never refunds",
                        run_id=run_id,
                        server_round=after.server_round,
                    )
                )
        if not math.isfinite(worst):
            violations.append(
                Violation(
                    KIND_CENTRAL_NO_PRIVACY,
                    f"run {run_id} recorded central DP with an unbounded ε (noise multiplier "
                    f"{last.noise_multiplier:g}): its aggregates carry no central guarantee",
                    run_id=run_id,
                    server_round=last.server_round,
                )
            )
        elif max_central_epsilon is not None and worst > max_central_epsilon:
            violations.append(
                Violation(
                    KIND_CENTRAL_OVER_POLICY,
                    f"run {run_id} spent central ε {worst:.6g} (δ = {last.delta:g}) over "
                    f"{len(run_rows)} round(s), above the limit {max_central_epsilon:g}",
                    run_id=run_id,
                    server_round=last.server_round,
                )
            )
    return lines, violations


def build_report(
    ledger: ServerLedger,
    *,
    max_central_epsilon: float | None = None,
    now: datetime | None = None,
) -> BudgetReport:
    """Read the ledger and assemble the security report.

    Parameters
    ----------
    ledger : ServerLedger
        An open server ledger.
    max_central_epsilon : float, optional
        Limit on each run's central-DP ε; a run above it is a violation.
    now : datetime, optional
        Timestamp of the report (tests pin it).

    Returns
    -------
    BudgetReport
    """
    reports = ledger.reports()
    violations = _violations_from_reports(reports)
    by_id = {r.id: r for r in reports}
    for finding in ledger.audit():
        report = by_id.get(finding.report_id)
        violations.append(
            Violation(
                KIND_TAMPERED,
                f"report #{finding.report_id}: {finding.detail}",
                device_id=finding.device_id or None,
                run_id=report.run_id if report else None,
                server_round=report.server_round if report else None,
                report_id=finding.report_id,
            )
        )
    central, central_violations = _central_lines(ledger.central_dp(), max_central_epsilon)
    violations.extend(central_violations)
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    violations.sort(key=lambda v: (rank.get(v.kind, len(rank)), v.report_id or 0, v.run_id or ""))

    enrolled = {d.device_id: d for d in ledger.devices()}
    charges: dict[int, list[Any]] = {}
    for row in ledger.block_epsilons():
        charges.setdefault(row.report_id, []).append(row)
    device_ids = sorted(
        set(enrolled) | {r.device_id for r in reports if r.verified and r.device_id}
    )
    devices = []
    series: dict[str, list[tuple[int, float, bool]]] = {}
    series_broken: dict[str, list[tuple[int, float, bool]]] = {}
    for device_id in device_ids:
        mine = [r for r in reports if r.device_id == device_id]
        verified = [r for r in mine if r.verified]
        blocks: dict[str, dict[str, Any]] = {}
        running = 0.0
        running_broken: float | None = None
        points = []
        points_broken = []
        for report in verified:
            # The honest (or record) figure from the rows the audit checks; the
            # broken-aggregation figure from the same verified signed payload.
            figures = {f.block: f for f in day_figures(report.payload() or {})}
            for row in charges.get(report.id, []):
                entry = blocks.setdefault(
                    row.block,
                    {"epsilon": 0.0, "budget": row.budget, "retired": False, "charges": 0,
                     "runs": set(), "unit": UNIT_RECORD, "epsilon_broken": None,
                     "budget_broken": None},
                )
                entry["epsilon"] = max(entry["epsilon"], row.epsilon)
                entry["budget"] = row.budget  # the budget in force at the latest charge
                entry["retired"] = entry["retired"] or row.retired
                entry["charges"] += 1
                entry["runs"].add(row.run_id)
                running = max(running, row.epsilon)
                day = figures.get(row.block)
                if day is None:
                    continue
                entry["unit"] = day.unit
                if day.epsilon_broken is not None:
                    entry["epsilon_broken"] = max(entry["epsilon_broken"] or 0.0,
                                                  day.epsilon_broken)
                    entry["budget_broken"] = day.budget_broken
                    running_broken = max(running_broken or 0.0, day.epsilon_broken)
            points.append((report.id, running, bool(report.flags)))
            if running_broken is not None:
                points_broken.append((report.id, running_broken, bool(report.flags)))
        series[device_id] = points
        if points_broken:
            series_broken[device_id] = points_broken
        totals = [r.payload() or {} for r in verified]
        total_values = [float(p["epsilon_total"]) for p in totals if "epsilon_total" in p]
        broken_totals = [float(p["epsilon_total_broken"]) for p in totals
                         if report_unit(p) == UNIT_DAY and "epsilon_total_broken" in p]
        device = enrolled.get(device_id)
        devices.append(
            DeviceLine(
                device_id=device_id,
                enrolled_at=device.enrolled_at if device else None,
                revoked_at=device.revoked_at if device else None,
                reports=len(mine),
                verified_reports=len(verified),
                flagged_reports=sum(1 for r in mine if r.flags),
                epsilon_total=max(total_values) if total_values else None,
                epsilon_total_broken=max(broken_totals) if broken_totals else None,
                runs=tuple(sorted({r.run_id for r in verified})),
                blocks=tuple(
                    BlockLine(
                        block=name,
                        epsilon=e["epsilon"],
                        budget=e["budget"],
                        retired=e["retired"],
                        charges=e["charges"],
                        runs=tuple(sorted(e["runs"])),
                        unit=e["unit"],
                        epsilon_broken=e["epsilon_broken"],
                        budget_broken=e["budget_broken"],
                    )
                    for name, e in sorted(blocks.items())
                ),
            )
        )

    refusals = tuple(
        {
            "run_id": r.run_id,
            "server_round": r.server_round,
            "device": r.device,
            "reason": r.reason,
            "received_at": r.received_at,
        }
        for r in ledger.refusals()
    )
    return BudgetReport(
        generated_at=(now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds"),
        ledger=str(ledger.path),
        violations=tuple(violations),
        unverifiable=tuple(r for r in reports if FLAG_UNVERIFIABLE in r.flags),
        devices=tuple(devices),
        central=tuple(central),
        refusals=refusals,
        reports=len(reports),
        verified_reports=sum(1 for r in reports if r.verified),
        flagged_reports=sum(1 for r in reports if r.flags),
        series=series,
        series_broken=series_broken,
        received={r.id: r.received_at for r in reports},
        units_reported=_units(reports),
    )


def _units(reports: Sequence[StoredReport]) -> tuple[str, ...]:
    units = set()
    for r in reports:
        payload = r.payload() if r.verified else None
        if payload is not None and isinstance(payload.get("unit"), str):
            units.add(payload["unit"])
    return tuple(sorted(units))


def check(ledger: ServerLedger, *, max_central_epsilon: float | None = None) -> list[Violation]:
    """Every violation in the ledger, most urgent first (empty: clean).

    What ``keystay budget check`` exits non-zero on: any report flagged
    over-budget, contradiction or unverifiable; any verified report that no
    longer checks out as stored; any run whose central ε is unbounded,
    decreasing, or above ``max_central_epsilon``.
    """
    return list(build_report(ledger, max_central_epsilon=max_central_epsilon).violations)
