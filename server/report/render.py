"""Renderers of the privacy-budget report: the text table, the JSON document, the plot.

Design
------
:mod:`keystay.server.report.budget` builds a :class:`BudgetReport` from the
server ledger; this module only renders one, so a renderer never reads the
ledger and the model never formats text. The JSON schema
(``keystay.budget-report/v1``) is stated in the model's module docstring;
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

from keystay.server.ledger.records import FLAG_UNVERIFIABLE
from keystay.server.report.budget import SCHEMA, BudgetReport


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
