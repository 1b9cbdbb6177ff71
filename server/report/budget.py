"""The privacy-budget report for security reviewers, built from the server ledger.

What it answers, per pseudonymous device and per data block (employee-day):
how much ε has been spent, against which budget, what remains, whether the
block is retired, and which runs touched it; per run, the central-DP ε (if
central DP was on); and, listed first, everything that needs a person:

* ``over-budget``: a device reported a block past its budget;
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

JSON schema (``keystay budget report --json``), ``keystay.budget-report/v1``::

    {
      "schema": "keystay.budget-report/v1",
      "generated_at": "ISO 8601 UTC",
      "privacy_unit": str,               # what one device ε protects, in words
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
         "runs": [str],
         "blocks": [
           {"block": str, "epsilon": number, "budget": number, "remaining": number,
            "retired": bool, "over_budget": bool, "charges": int, "runs": [str]}
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

Unit of privacy (``privacy_unit``): a device's ε is per *record*, one
non-overlapping run of 33 input events of one employee-day; each event is in
exactly one record. Every signed report states its unit; ``units_reported``
lists the units the verified reports name, so a device on an older release
(whose records overlapped) shows up rather than being read at the new unit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from keystay.server.ledger.ledger import (
    FLAG_CONTRADICTION,
    FLAG_OVER_BUDGET,
    FLAG_UNVERIFIABLE,
    CentralDPRecord,
    ServerLedger,
    StoredReport,
)

SCHEMA = "keystay.budget-report/v1"
#: The unit devices sign into their reports (``keystay.common.windows.PRIVACY_UNIT``;
#: restated here because the server does not import device code, and a unit
#: test holds the two equal).
PRIVACY_UNIT = (
    "one training record = 33 consecutive input events of one employee-day; "
    "records do not overlap, so each event is in exactly one record"
)

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
    """One block of one device: what verified reports say it has spent."""

    block: str
    epsilon: float
    budget: float
    retired: bool
    charges: int
    runs: tuple[str, ...]

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.epsilon)

    @property
    def over_budget(self) -> bool:
        return self.epsilon > self.budget


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
    """Per device: (report id, most-spent block ε so far, report flagged) in report order."""
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
    for device_id in device_ids:
        mine = [r for r in reports if r.device_id == device_id]
        verified = [r for r in mine if r.verified]
        blocks: dict[str, dict[str, Any]] = {}
        running = 0.0
        points = []
        for report in verified:
            for row in charges.get(report.id, []):
                entry = blocks.setdefault(
                    row.block,
                    {"epsilon": 0.0, "budget": row.budget, "retired": False, "charges": 0,
                     "runs": set()},
                )
                entry["epsilon"] = max(entry["epsilon"], row.epsilon)
                entry["budget"] = row.budget  # the budget in force at the latest charge
                entry["retired"] = entry["retired"] or row.retired
                entry["charges"] += 1
                entry["runs"].add(row.run_id)
                running = max(running, row.epsilon)
            points.append((report.id, running, bool(report.flags)))
        series[device_id] = points
        totals = [r.payload() or {} for r in verified]
        total_values = [float(p["epsilon_total"]) for p in totals if "epsilon_total" in p]
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
                runs=tuple(sorted({r.run_id for r in verified})),
                blocks=tuple(
                    BlockLine(
                        block=name,
                        epsilon=e["epsilon"],
                        budget=e["budget"],
                        retired=e["retired"],
                        charges=e["charges"],
                        runs=tuple(sorted(e["runs"])),
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


# --- renderers --------------------------------------------------------------------


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-aligned text columns, two spaces apart; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True)]
        return (indent + "  ".join([*padded, cells[-1]])).rstrip()

    # The last column (often a sentence) is ruled only as wide as its header.
    rule = ["-" * w for w in widths[:-1]] + ["-" * len(headers[-1])]
    return [line(headers), line(rule), *(line(r) for r in rows)]


def render_table(report: BudgetReport) -> str:
    """The report as plain, aligned text (UTF-8; details quote devices' own sentences)."""
    out = [
        "keystay privacy budget report",
        f"ledger:    {report.ledger}",
        f"generated: {report.generated_at}",
        f"status:    {'CLEAN' if report.clean else f'{len(report.violations)} VIOLATION(S)'}"
        f" -- {len(report.devices)} device(s), {report.reports} report(s), "
        f"{report.verified_reports} verified, {report.flagged_reports} flagged",
        f"unit:      eps is per record: {report.privacy_unit}",
        *(
            f"           (a verified report states another unit: {unit})"
            for unit in report.units_reported
            if unit != report.privacy_unit
        ),
        "",
        f"VIOLATIONS ({len(report.violations)})",
    ]
    if report.violations:
        out += _table(
            ["kind", "device", "run", "round", "block", "report", "detail"],
            [
                [
                    v.kind,
                    v.device_id or "-",
                    v.run_id or "-",
                    "-" if v.server_round is None else str(v.server_round),
                    v.block or "-",
                    "-" if v.report_id is None else f"#{v.report_id}",
                    v.detail,
                ]
                for v in report.violations
            ],
        )
    else:
        out.append("  none")

    out += ["", f"UNVERIFIABLE REPORTS ({len(report.unverifiable)})"]
    if report.unverifiable:
        out += _table(
            ["report", "received", "device", "run", "round", "signature", "reason"],
            [
                [
                    f"#{r.id}",
                    r.received_at[:19],
                    r.device_id or "?",
                    r.run_id,
                    str(r.server_round),
                    "valid" if r.signature_valid else "invalid",
                    "; ".join(f.detail for f in r.findings if f.flag == FLAG_UNVERIFIABLE),
                ]
                for r in report.unverifiable
            ],
        )
    else:
        out.append("  none")

    out += ["", "DEVICES AND BLOCKS (eps from verified reports only, per record; see unit above)"]
    rows = []
    for d in report.devices:
        status = "revoked" if d.revoked_at else ("enrolled" if d.enrolled_at else "unknown")
        if not d.blocks:
            rows.append([d.device_id, "-", "-", "-", "-", "-", "-", status])
        for b in d.blocks:
            rows.append(
                [
                    d.device_id,
                    b.block,
                    _num(b.epsilon),
                    _num(b.budget),
                    _num(b.remaining),
                    "yes" if b.retired else "no",
                    ",".join(b.runs),
                    status + (" OVER BUDGET" if b.over_budget else ""),
                ]
            )
    if rows:
        out += _table(
            ["device", "block", "eps spent", "budget", "remaining", "retired", "runs", "status"],
            rows,
        )
        out += ["", "  device totals (largest verified total; reports verified/received):"]
        out += _table(
            ["device", "eps total", "reports", "runs"],
            [
                [
                    d.device_id,
                    _num(d.epsilon_total),
                    f"{d.verified_reports}/{d.reports}",
                    ",".join(d.runs) or "-",
                ]
                for d in report.devices
            ],
            indent="    ",
        )
    else:
        out.append("  no devices enrolled or reporting")

    out += ["", f"CENTRAL DP PER RUN ({len(report.central)})"]
    if report.central:
        out += _table(
            ["run", "rounds", "noise", "clip", "q", "eps", "delta", "sampling"],
            [
                [
                    c.run_id,
                    str(c.rounds),
                    f"{c.noise_multiplier:g}",
                    f"{c.clip:g}",
                    f"{c.sample_rate:g}",
                    _num(c.epsilon),
                    f"{c.delta:g}",
                    c.sampling,
                ]
                for c in report.central
            ],
        )
    else:
        out.append("  none recorded (central DP off in every run)")

    out += ["", f"REFUSALS ({len(report.refusals)}; a device declining is its policy working)"]
    if report.refusals:
        out += _table(
            ["run", "round", "device", "reason"],
            [[r["run_id"], str(r["server_round"]), r["device"], r["reason"]]
             for r in report.refusals],
        )
    else:
        out.append("  none")
    return "\n".join(out) + "\n"


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def report_to_dict(report: BudgetReport) -> dict[str, Any]:
    """The report in the documented ``keystay.budget-report/v1`` shape (module docstring)."""
    return {
        "schema": SCHEMA,
        "generated_at": report.generated_at,
        "privacy_unit": report.privacy_unit,
        "units_reported": list(report.units_reported),
        "ledger": report.ledger,
        "clean": report.clean,
        "summary": {
            "devices": len(report.devices),
            "reports": report.reports,
            "verified_reports": report.verified_reports,
            "flagged_reports": report.flagged_reports,
            "violations": len(report.violations),
            "refusals": len(report.refusals),
        },
        "violations": [v.as_dict() for v in report.violations],
        "unverifiable_reports": [
            {
                "report_id": r.id,
                "received_at": r.received_at,
                "run_id": r.run_id,
                "server_round": r.server_round,
                "device_id": r.device_id,
                "signature_valid": r.signature_valid,
                "reasons": [f.detail for f in r.findings if f.flag == FLAG_UNVERIFIABLE],
            }
            for r in report.unverifiable
        ],
        "devices": [
            {
                "device_id": d.device_id,
                "enrolled_at": d.enrolled_at,
                "revoked_at": d.revoked_at,
                "reports": d.reports,
                "verified_reports": d.verified_reports,
                "flagged_reports": d.flagged_reports,
                "epsilon_total": _finite_or_none(d.epsilon_total),
                "runs": list(d.runs),
                "blocks": [
                    {
                        "block": b.block,
                        "epsilon": b.epsilon,
                        "budget": b.budget,
                        "remaining": b.remaining,
                        "retired": b.retired,
                        "over_budget": b.over_budget,
                        "charges": b.charges,
                        "runs": list(b.runs),
                    }
                    for b in d.blocks
                ],
            }
            for d in report.devices
        ],
        "central_dp": [
            {
                "run_id": c.run_id,
                "rounds": c.rounds,
                "last_round": c.last_round,
                "noise_multiplier": c.noise_multiplier,
                "clip": c.clip,
                "sample_rate": c.sample_rate,
                "sampling": c.sampling,
                "epsilon": _finite_or_none(c.epsilon),
                "delta": c.delta,
            }
            for c in report.central
        ],
        "refusals": [dict(r) for r in report.refusals],
    }


def render_json(report: BudgetReport) -> str:
    """:func:`report_to_dict` as indented, strict JSON (no NaN/Infinity)."""
    return json.dumps(report_to_dict(report), indent=2, sort_keys=True, allow_nan=False) + "\n"


def render_plot(report: BudgetReport, path: Path) -> Path:
    """Plot each device's most-spent block ε in report order against its budget.

    x: report order (ledger report id); y: the largest block ε a device's
    verified reports have shown so far; dashed lines: the block budgets in
    force; red crosses: verified reports that carry a flag. Written with
    matplotlib's Agg canvas (no display needed, no global backend change).

    Returns
    -------
    Path
        ``path``, written as PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    budgets = sorted({b.budget for d in report.devices for b in d.blocks})
    plotted = flagged_labelled = False
    for device_id, points in sorted(report.series.items()):
        if not points:
            continue
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        ax.step(xs, ys, where="post", marker="o", markersize=3, label=device_id)
        flagged = [(x, y) for x, y, f in points if f]
        if flagged:
            ax.plot([x for x, _ in flagged], [y for _, y in flagged], "x", color="red",
                    markersize=8, label=None if flagged_labelled else "flagged report")
            flagged_labelled = True
        plotted = True
    for budget in budgets:
        ax.axhline(budget, linestyle="--", color="black", linewidth=1)
        ax.annotate(f"budget {budget:g}", xy=(0, budget), xycoords=("axes fraction", "data"),
                    xytext=(2, 2), textcoords="offset points", fontsize=8)
    if not plotted:
        ax.text(0.5, 0.5, "no verified reports yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("report order (server ledger report id)")
    ax.set_ylabel("epsilon of most-spent block")
    ax.set_title("Per-device privacy spend against block budget")
    ax.set_ylim(bottom=0)
    if plotted:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
