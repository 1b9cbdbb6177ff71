"""The budget report as one self-contained HTML file, for security reviewers.

Design note
-----------
``keystay budget report --html FILE`` writes a single file that opens in any
browser, offline, without the CLI: inline CSS, inline SVG charts, no script,
no external asset of any kind (not even a font). It is built from
:func:`keystay.server.report.render.report_to_dict`, the same dictionary
``--json`` prints, so every figure on the page *is* a ``--json`` figure; each
is also written exactly (``repr``) in a ``data-`` attribute, so a test (or a
reviewer's script) can compare the two without parsing prose.

Order follows what a reviewer must see first: the status (clean, violations,
or only unverifiable reports), then violations and unverifiable reports,
then per device and day the ε spent against budget as bars (employee-day
blocks: both ε, against an honest-but-curious server and against a server
that breaks secure aggregation, each beside its budget, with the unit and
the assumptions in words), ε over time per device (one chart per
assumption when there are employee-day blocks), refusals with their reasons,
central DP per run, and last the ledger the report was made from with its
SHA-256 and the time.

Device ids, run ids, reasons and details are attacker-influenced (a device
chooses its report's text; a hostile ledger row can hold anything), so every
value goes through :func:`html.escape`, in text and in attributes alike, and
the file declares a Content-Security-Policy that forbids scripts outright.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from keystay.server.ledger.figures import ASSUMPTION_BROKEN, ASSUMPTION_HONEST, UNIT_DAY
from keystay.server.report.budget import ASSUMPTION_SENTENCES, KIND_UNVERIFIABLE, BudgetReport
from keystay.server.report.render import report_to_dict

STATUS_CLEAN = "clean"
STATUS_VIOLATIONS = "violations"
STATUS_UNVERIFIABLE = "unverifiable"

_PALETTE = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d",
            "#dc2626")

_CSS = """
:root{--ink:#1d2330;--muted:#5b6474;--line:#d9dde5;--ok:#1f7a4d;--warn:#a35a00;--bad:#b42318}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,sans-serif;color:var(--ink);background:#f7f8fa}
main{max-width:1100px;margin:0 auto;padding:1.5rem}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:1rem 1.25rem;
margin:1rem 0}
h1{font-size:1.5rem;margin:0}h2{font-size:1.15rem;margin:0 0 .5rem}
h3{font-size:1rem;margin:.75rem 0 .25rem}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;vertical-align:top;padding:.35rem .5rem;border-bottom:1px solid var(--line)}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.9em;word-break:break-all}
.status{font-size:1.25rem;font-weight:700;padding:.75rem 1rem;border-radius:8px;border:2px solid}
.status.clean{color:var(--ok);background:#eef6f1}
.status.violations{color:var(--bad);background:#fdf0ef}
.status.unverifiable{color:var(--warn);background:#fff6e8}
.muted{color:var(--muted)}
.over{color:var(--bad);font-weight:700}
svg text{font:11px system-ui,sans-serif;fill:var(--ink)}
dl{display:grid;grid-template-columns:max-content auto;gap:.25rem 1rem}dd{margin:0}
"""


def report_status(data: Mapping[str, Any]) -> str:
    """``clean``, ``violations`` (anything but unverifiable reports), or ``unverifiable``."""
    kinds = {v["kind"] for v in data["violations"]}
    if kinds - {KIND_UNVERIFIABLE}:
        return STATUS_VIOLATIONS
    if kinds or data["unverifiable_reports"]:
        return STATUS_UNVERIFIABLE
    return STATUS_CLEAN


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or ``None`` if it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "unbounded"
    return f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _status_section(data: Mapping[str, Any], status: str) -> str:
    summary = data["summary"]
    words = {
        STATUS_CLEAN: "Clean: every report verifies and every device stayed within budget.",
        STATUS_VIOLATIONS: f"{summary['violations']} violation(s): read the list below first.",
        STATUS_UNVERIFIABLE: "Reports that do not verify: their figures are not counted "
                             "(listed below).",
    }[status]
    return (
        f'<section id="status" data-status="{status}" data-clean="{str(data["clean"]).lower()}">'
        f'<p class="status {status}">{_e(words)}</p>'
        f"<p>{summary['devices']} device(s), {summary['reports']} report(s): "
        f"{summary['verified_reports']} verified, {summary['flagged_reports']} flagged; "
        f"{summary['refusals']} refusal(s).</p></section>"
    )


def _violations_section(data: Mapping[str, Any]) -> str:
    rows = [
        f'<tr class="violation" data-kind="{_e(v["kind"])}"><td>{_e(v["kind"])}</td>'
        f"<td><code>{_e(v['device_id'] or '-')}</code></td><td>{_e(v['run_id'] or '-')}</td>"
        f"<td>{_e('-' if v['server_round'] is None else v['server_round'])}</td>"
        f"<td>{_e(v['block'] or '-')}</td>"
        f"<td>{_e('-' if v['report_id'] is None else '#' + str(v['report_id']))}</td>"
        f"<td>{_e(v['detail'])}</td></tr>"
        for v in data["violations"]
    ]
    unverifiable = [
        f'<tr class="unverifiable" data-report="{int(r["report_id"])}">'
        f"<td>#{int(r['report_id'])}</td><td>{_e(r['received_at'])}</td>"
        f"<td><code>{_e(r['device_id'] or '?')}</code></td><td>{_e(r['run_id'])}</td>"
        f"<td>{_e(r['server_round'])}</td>"
        f"<td>{'valid' if r['signature_valid'] else 'invalid'}</td>"
        f"<td>{_e('; '.join(r['reasons']))}</td></tr>"
        for r in data["unverifiable_reports"]
    ]
    return (
        f'<section id="violations"><h2>Violations ({len(rows)})</h2>'
        + _table(["kind", "device", "run", "round", "day", "report", "detail"], rows, "None.")
        + f'</section><section id="unverifiable"><h2>Unverifiable reports '
        f"({len(unverifiable)})</h2><p class=\"muted\">Unknown or revoked device, bad "
        "signature, replayed or malformed report: not counted in any figure below.</p>"
        + _table(["report", "received", "device", "run", "round", "signature", "reason"],
                 unverifiable, "None.")
        + "</section>"
    )


def _bar(epsilon: float, budget: float) -> str:
    """An inline SVG bar: ε spent as a share of the budget (past it drawn red)."""
    width, height = 160, 12
    share = 0.0 if budget <= 0 else min(epsilon / budget, 1.0)
    color = "#b42318" if epsilon > budget else "#2563eb"
    return (
        f'<svg width="{width}" height="{height}" role="img" '
        f'aria-label="ε {epsilon:.4f} of {budget:g}">'
        f'<rect width="{width}" height="{height}" rx="3" fill="#e5e8ee"/>'
        f'<rect width="{share * width:.1f}" height="{height}" rx="3" fill="{color}"/></svg>'
    )


def _record_row(d: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    over = ' <span class="over">OVER BUDGET</span>' if b["over_budget"] else ""
    return (
        f'<tr class="block" data-device="{_e(d["device_id"])}" '
        f'data-block="{_e(b["block"])}" data-unit="{_e(b["unit"])}" '
        f'data-epsilon="{float(b["epsilon"])!r}" '
        f'data-budget="{float(b["budget"])!r}" '
        f'data-remaining="{float(b["remaining"])!r}">'
        f"<td>{_e(b['block'])}</td><td>{_bar(b['epsilon'], b['budget'])}</td>"
        f'<td class="num">{_num(b["epsilon"])}</td><td class="num">{b["budget"]:g}</td>'
        f'<td class="num">{_num(b["remaining"])}</td>'
        f"<td>{'yes' if b['retired'] else 'no'}{over}</td>"
        f"<td>{b['charges']}</td><td>{_e(', '.join(b['runs']))}</td></tr>"
    )


def _spent_cell(epsilon: float | None, budget: float | None, over: bool) -> str:
    if epsilon is None or budget is None:
        return '<td class="muted">- (record level)</td>'
    flag = ' <span class="over">OVER BUDGET</span>' if over else ""
    return (f"<td>{_bar(epsilon, budget)} <span class=\"num\">{_num(epsilon)}</span> of "
            f"{budget:g}, {_num(max(0.0, budget - epsilon))} left{flag}</td>")


def _day_row(d: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """A block of a device with employee-day blocks: both ε, each beside its budget."""
    broken = b["epsilon_broken_aggregation"]
    broken_budget = b["budget_broken_aggregation"]
    attrs = "" if broken is None else (
        f' data-epsilon-broken="{float(broken)!r}" '
        f'data-budget-broken="{float(broken_budget)!r}"'
    )
    honest_over = float(b["epsilon"]) > float(b["budget"])
    return (
        f'<tr class="block" data-device="{_e(d["device_id"])}" '
        f'data-block="{_e(b["block"])}" data-unit="{_e(b["unit"])}" '
        f'data-epsilon="{float(b["epsilon"])!r}" data-budget="{float(b["budget"])!r}" '
        f'data-remaining="{float(b["remaining"])!r}"{attrs}>'
        f"<td>{_e(b['block'])}</td><td>{_e(b['unit'])}</td>"
        + _spent_cell(float(b["epsilon"]), float(b["budget"]), honest_over)
        + _spent_cell(broken, broken_budget, bool(b["over_budget_broken_aggregation"]))
        + f"<td>{'yes' if b['retired'] else 'no'}</td>"
        f"<td>{b['charges']}</td><td>{_e(', '.join(b['runs']))}</td></tr>"
    )


def _devices_section(data: Mapping[str, Any]) -> str:
    parts = []
    any_days = False
    for d in data["devices"]:
        state = ("revoked" if d["revoked_at"] else "enrolled" if d["enrolled_at"] else
                 "not enrolled")
        days = any(b["unit"] == UNIT_DAY for b in d["blocks"])
        any_days = any_days or days
        total = d["epsilon_total"]
        totals = f"largest verified total ε {_num(total)}"
        if days:
            totals = (f"largest verified total ε {_num(total)} against an "
                      f"{ASSUMPTION_HONEST}, {_num(d['epsilon_total_broken_aggregation'])} "
                      f"against a {ASSUMPTION_BROKEN}")
            table = _table(
                ["day", "unit", f"ε against an {ASSUMPTION_HONEST}, of budget",
                 f"ε against a {ASSUMPTION_BROKEN}, of budget", "retired", "rounds", "runs"],
                [_day_row(d, b) for b in d["blocks"]], "No verified charges.")
        else:
            table = _table(
                ["day", "ε spent of budget", "ε spent", "budget", "remaining", "retired",
                 "rounds", "runs"], [_record_row(d, b) for b in d["blocks"]],
                "No verified charges.")
        parts.append(
            f'<h3 class="device" data-device="{_e(d["device_id"])}">Device '
            f"<code>{_e(d['device_id'])}</code></h3>"
            f'<p class="muted">{state}; {d["verified_reports"]}/{d["reports"]} reports verified; '
            f"{totals}.</p>" + table
        )
    body = "".join(parts) or '<p class="muted">No devices enrolled or reporting.</p>'
    units = (
        '<p class="muted">A day is one block (employee-day); figures from verified reports '
        "only. A day's ε is the largest any verified report gave it.</p>"
    )
    if any_days:
        units += (
            '<ul id="assumptions" class="muted">'
            f'<li data-unit="{UNIT_DAY}"><b>employee-day</b>: '
            f"ε per {_e(data['units'][UNIT_DAY])}.</li>"
            '<li data-unit="record"><b>record</b>: ε per '
            f"{_e(data['units']['record'])}; it holds against anyone who sees the update.</li>"
            + "".join(f"<li><b>{_e(name)}</b>: {_e(sentence)}.</li>"
                      for name, sentence in ASSUMPTION_SENTENCES.items())
            + "<li>A day retires when either budget could not afford the same round "
            "again.</li></ul>"
        )
    return (
        '<section id="devices"><h2>Per device and day: ε spent against budget</h2>'
        f"{units}{body}</section>"
    )


def _time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def _chart(
    report: BudgetReport,
    points_by_device: Mapping[str, list[tuple[int, float, bool]]],
    budgets: Sequence[float],
    *,
    chart_id: str = "chart",
    label: str = "ε of each device's most-spent day over time",
) -> str:
    """ε of each device's most-spent day over time, as an inline SVG step chart."""
    series: dict[str, list[tuple[float, float, bool]]] = {}
    for device_id, points in sorted(points_by_device.items()):
        timed = []
        for report_id, eps, flagged in points:
            when = _time(report.received.get(report_id, ""))
            timed.append((float(report_id) if when is None else when, eps, flagged))
        if timed:
            series[device_id] = timed
    if not series:
        return '<p class="muted">No verified reports yet.</p>'
    xs = [p[0] for pts in series.values() for p in pts]
    y_max = max([p[1] for pts in series.values() for p in pts] + list(budgets) + [1e-9]) * 1.1
    x0, x1 = min(xs), max(xs)
    span = (x1 - x0) or 1.0
    width, height, left, right, top, bottom = 760, 280, 48, 170, 12, 36

    def px(x: float) -> float:
        return left + (x - x0) / span * (width - left - right)

    def py(y: float) -> float:
        return top + (1 - y / y_max) * (height - top - bottom)

    out = [f'<svg id="{_e(chart_id)}" width="{width}" height="{height}" role="img" '
           f'aria-label="{_e(label)}">',
           f'<line x1="{left}" y1="{py(0):.1f}" x2="{width - right}" y2="{py(0):.1f}" '
           'stroke="#5b6474"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{py(0):.1f}" stroke="#5b6474"/>']
    for tick in range(5):
        y = y_max * tick / 4
        out.append(f'<text x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for budget in budgets:
        out.append(f'<line x1="{left}" y1="{py(budget):.1f}" x2="{width - right}" '
                   f'y2="{py(budget):.1f}" stroke="#1d2330" stroke-dasharray="5,4"/>'
                   f'<text x="{width - right + 4}" y="{py(budget) + 4:.1f}">budget '
                   f"{budget:g}</text>")
    timed_axis = any(_time(v) is not None for v in report.received.values())
    for x, label in ((x0, "first"), (x1, "last")):
        # Seconds matter when a run's reports all came within the hour.
        stamp = "%Y-%m-%d %H:%M" + (":%S" if span < 3600 else "")
        text = (datetime.fromtimestamp(x).astimezone().strftime(stamp)
                if timed_axis else f"report #{int(x)}")
        anchor = "start" if label == "first" else "end"
        out.append(f'<text x="{px(x):.1f}" y="{height - 18}" text-anchor="{anchor}">'
                   f"{_e(text)}</text>")
    out.append(f'<text x="{left}" y="{height - 4}">time each report was received</text>'
               if timed_axis else f'<text x="{left}" y="{height - 4}">report order</text>')
    for i, (device_id, drawn) in enumerate(series.items()):
        color = _PALETTE[i % len(_PALETTE)]
        path = []
        for j, (x, y, _) in enumerate(drawn):
            # A step: the ε holds until the next report, then moves to its value.
            path.append(f"M{px(x):.1f},{py(y):.1f}" if j == 0
                        else f"H{px(x):.1f} V{py(y):.1f}")
        out.append(f'<path class="series" data-device="{_e(device_id)}" d="{" ".join(path)}" '
                   f'fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y, flagged in drawn:
            if flagged:
                out.append(f'<text x="{px(x):.1f}" y="{py(y) + 4:.1f}" text-anchor="middle" '
                           'fill="#b42318">✕</text>')
            else:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" '
                           f'fill="{color}"/>')
        out.append(f'<rect x="{width - right + 4}" y="{top + 40 + 16 * i}" width="10" '
                   f'height="10" fill="{color}"/><text x="{width - right + 18}" '
                   f'y="{top + 49 + 16 * i}">{_e(device_id[:22])}</text>')
    out.append("</svg>")
    return "".join(out)


def _over_time_section(report: BudgetReport, data: Mapping[str, Any]) -> str:
    """One chart, or two when devices sent employee-day reports (one per assumption)."""
    budgets = sorted({float(b["budget"]) for d in data["devices"] for b in d["blocks"]})
    intro = ('<section id="over-time"><h2>ε spent over time, per device</h2><p class="muted">'
             "The most-spent day of each device after each verified report; ✕ marks a "
             "flagged report; dashed lines are day budgets.</p>")
    if not report.series_broken:
        return intro + _chart(report, report.series, budgets) + "</section>"
    broken_budgets = sorted({float(b["budget_broken_aggregation"]) for d in data["devices"]
                             for b in d["blocks"]
                             if b["budget_broken_aggregation"] is not None})
    return (
        intro
        + f"<h3>Against an {_e(ASSUMPTION_HONEST)} (record-level blocks: per record)</h3>"
        + _chart(report, report.series, budgets,
                 label=f"ε against an {ASSUMPTION_HONEST}, over time")
        + f"<h3>Against a {_e(ASSUMPTION_BROKEN)}</h3>"
        + _chart(report, report.series_broken, broken_budgets, chart_id="chart-broken",
                 label=f"ε against a {ASSUMPTION_BROKEN}, over time")
        + "</section>"
    )


def _refusals_section(data: Mapping[str, Any]) -> str:
    rows = [
        f'<tr class="refusal"><td>{_e(r["run_id"])}</td><td>{_e(r["server_round"])}</td>'
        f"<td><code>{_e(r['device'])}</code></td><td>{_e(r['reason'])}</td>"
        f"<td>{_e(r['received_at'])}</td></tr>"
        for r in data["refusals"]
    ]
    return (
        f'<section id="refusals"><h2>Refusals ({len(rows)})</h2><p class="muted">A device '
        "declining a round is its policy working; the reason is the device's own.</p>"
        + _table(["run", "round", "device", "reason", "received"], rows, "None.")
        + "</section>"
    )


def _central_section(data: Mapping[str, Any]) -> str:
    rows = [
        f'<tr class="central" data-run="{_e(c["run_id"])}" '
        f'data-epsilon="{"null" if c["epsilon"] is None else repr(float(c["epsilon"]))}">'
        f"<td>{_e(c['run_id'])}</td><td>{c['rounds']}</td><td>{c['noise_multiplier']:g}</td>"
        f"<td>{c['clip']:g}</td><td>{c['sample_rate']:g}</td><td>{_e(c['sampling'])}</td>"
        f'<td class="num">{_num(c["epsilon"])}</td><td>{c["delta"]:g}</td></tr>'
        for c in data["central_dp"]
    ]
    return (
        f'<section id="central"><h2>Central DP per run ({len(rows)})</h2>'
        + _table(["run", "rounds", "noise σ", "clip", "q", "sampling", "ε", "δ"], rows,
                 "None recorded (central DP off in every run).")
        + "</section>"
    )


def render_html(report: BudgetReport, *, ledger_sha256: str | None) -> str:
    """The whole report as one HTML document (see the module note)."""
    data = report_to_dict(report)
    status = report_status(data)
    digest = ledger_sha256 or "unavailable (the ledger file could not be read)"
    body = (
        "<header><h1>keystay privacy budget report</h1>"
        f'<p class="muted">Generated {_e(data["generated_at"])}.</p></header>'
        + _status_section(data, status)
        + _violations_section(data)
        + _devices_section(data)
        + _over_time_section(report, data)
        + _refusals_section(data)
        + _central_section(data)
        + '<section id="source"><h2>Made from</h2><dl>'
        f'<dt>ledger</dt><dd><code id="ledger-path">{_e(data["ledger"])}</code></dd>'
        f'<dt>SHA-256 of the ledger file</dt><dd><code id="ledger-sha256">{_e(digest)}'
        "</code></dd>"
        f'<dt>report time (UTC)</dt><dd id="generated-at">{_e(data["generated_at"])}</dd></dl>'
        '<p class="muted">The same figures: <code>keystay budget report --json</code>.</p>'
        "</section>"
    )
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>keystay privacy budget report</title>"
        f"<style>{_CSS}</style></head><body><main>{body}</main></body></html>\n"
    )


def write_html(report: BudgetReport, path: Path) -> Path:
    """Write :func:`render_html` to ``path`` with the ledger's SHA-256 taken now."""
    text = render_html(report, ledger_sha256=file_sha256(Path(report.ledger)))
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path
