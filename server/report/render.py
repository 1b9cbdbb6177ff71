"""Renderers of the privacy-budget report: the text table, the JSON document, the plot.

Design
------
:mod:`keystay.server.report.budget` builds a :class:`BudgetReport` from the
server ledger; this module only renders one, so a renderer never reads the
ledger and the model never formats text. The JSON schema
(``keystay.budget-report/v2``) is stated in the model's module docstring;
:func:`report_to_dict` is its one writer (the HTML page reads it too). The
plot uses matplotlib's Agg canvas, imported only when a plot is asked for
(a server extra: ``keystay[server]``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keystay.server.ledger.figures import ASSUMPTION_BROKEN, ASSUMPTION_HONEST, UNIT_DAY
from keystay.server.ledger.records import FLAG_UNVERIFIABLE
from keystay.server.report.budget import (
    ASSUMPTION_SENTENCES,
    EMPLOYEE_DAY_UNIT,
    SCHEMA,
    UNITS,
    BlockLine,
    BudgetReport,
    DeviceLine,
)


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
            [f"           employee-day eps is per employee-day: {EMPLOYEE_DAY_UNIT}"]
            if _has_days(report) else []
        ),
        *(
            f"           (a verified report states another unit: {unit})"
            for unit in report.units_reported
            if unit not in (report.privacy_unit, UNIT_DAY)
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

    days = _has_days(report)
    out += ["", "DEVICES AND BLOCKS (eps from verified reports only, per record; see unit above)"]
    rows = []
    for d in report.devices:
        status = _device_status(d)
        record_blocks = [b for b in d.blocks if not b.employee_day]
        if not d.blocks:
            rows.append([d.device_id, "-", "-", "-", "-", "-", "-", status])
        for b in record_blocks:
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
    elif days:
        out.append("  none at record level (every block below is an employee-day)")
    if days:
        out += ["", *_day_section(report)]
    if report.devices:
        out += ["", "  device totals (largest verified total; reports verified/received):"]
        out += _table(
            ["device", "eps total", *(["eps total broken aggr."] if days else []),
             "reports", "runs"],
            [
                [
                    d.device_id,
                    _num(d.epsilon_total),
                    *([_num(d.epsilon_total_broken)] if days else []),
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


def _has_days(report: BudgetReport) -> bool:
    return any(b.employee_day for d in report.devices for b in d.blocks)


def _device_status(d: DeviceLine) -> str:
    return "revoked" if d.revoked_at else ("enrolled" if d.enrolled_at else "unknown")


def _day_section(report: BudgetReport) -> list[str]:
    """Employee-day blocks: both ε, each beside its budget, and the assumptions in words."""
    rows = []
    for d in report.devices:
        for b in d.blocks:
            if not b.employee_day:
                continue
            over = (" OVER BUDGET (honest server)" if b.epsilon > b.budget else "") + (
                " OVER BUDGET (broken aggregation)" if b.over_budget_broken else "")
            rows.append(
                [
                    d.device_id,
                    b.block,
                    f"{_num(b.epsilon)} / {b.budget:g}",
                    f"{_num(b.epsilon_broken)} / "
                    + ("-" if b.budget_broken is None else f"{b.budget_broken:g}"),
                    "yes" if b.retired else "no",
                    ",".join(b.runs),
                    _device_status(d) + over,
                ]
            )
    return [
        "DEVICES AND DAYS, EMPLOYEE-DAY (eps per employee-day from verified reports; "
        "spent / budget)",
        *_table(
            ["device", "day", "eps honest-but-curious server",
             "eps server breaking secure aggregation", "retired", "runs", "status"],
            rows,
        ),
        "",
        *(f"  {name}: {sentence}." for name, sentence in ASSUMPTION_SENTENCES.items()),
        "  A day retires when either budget could not afford the same round again.",
    ]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _block_dict(b: BlockLine) -> dict[str, Any]:
    day = b.employee_day
    return {
        "block": b.block,
        "unit": b.unit,
        "assumption": ASSUMPTION_HONEST if day else None,
        "epsilon": b.epsilon,
        "budget": b.budget,
        "remaining": b.remaining,
        "assumption_broken_aggregation": ASSUMPTION_BROKEN if day else None,
        "epsilon_broken_aggregation": b.epsilon_broken,
        "budget_broken_aggregation": b.budget_broken,
        "remaining_broken_aggregation": b.remaining_broken,
        "retired": b.retired,
        "over_budget": b.over_budget,
        "over_budget_broken_aggregation": b.over_budget_broken,
        "charges": b.charges,
        "runs": list(b.runs),
    }


def report_to_dict(report: BudgetReport) -> dict[str, Any]:
    """The report in the documented ``keystay.budget-report/v2`` shape (module docstring)."""
    return {
        "schema": SCHEMA,
        "generated_at": report.generated_at,
        "privacy_unit": report.privacy_unit,
        "units": dict(UNITS),
        "assumptions": {
            "epsilon": ASSUMPTION_HONEST,
            "epsilon_broken_aggregation": ASSUMPTION_BROKEN,
        },
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
                "epsilon_total_broken_aggregation": _finite_or_none(d.epsilon_total_broken),
                "runs": list(d.runs),
                "blocks": [_block_dict(b) for b in d.blocks],
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
    force; red crosses: verified reports that carry a flag. When any device
    sent employee-day reports, a second panel below draws the same against a
    server that breaks secure aggregation, with that series' budgets; the
    first panel is then titled for the honest-but-curious server (and
    record-level blocks). Written with matplotlib's Agg canvas (no display
    needed, no global backend change).

    Returns
    -------
    Path
        ``path``, written as PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    two = bool(report.series_broken)
    fig = Figure(figsize=(8, 8 if two else 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if two else 1, 1, 1)
    budgets = sorted({b.budget for d in report.devices for b in d.blocks})
    if not two:
        _plot_panel(ax, report.series, budgets, "epsilon of most-spent block",
                    "Per-device privacy spend against block budget")
    else:
        _plot_panel(ax, report.series, budgets, "epsilon of most-spent day / block",
                    f"Against an {ASSUMPTION_HONEST} (employee-day; record-level blocks "
                    "per record)")
        broken_budgets = sorted({b.budget_broken for d in report.devices for b in d.blocks
                                 if b.budget_broken is not None})
        below = fig.add_subplot(2, 1, 2, sharex=ax)
        _plot_panel(below, report.series_broken, broken_budgets,
                    "epsilon of most-spent day",
                    f"Against a {ASSUMPTION_BROKEN} (per employee-day)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _plot_panel(
    ax: Any,
    series: dict[str, list[tuple[int, float, bool]]],
    budgets: Sequence[float],
    ylabel: str,
    title: str,
) -> None:
    """One panel: a step line per device, its flagged reports, and the budgets in force."""
    plotted = flagged_labelled = False
    for device_id, points in sorted(series.items()):
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
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    if plotted:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
