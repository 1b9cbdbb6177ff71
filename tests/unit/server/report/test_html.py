"""The security report as one HTML file: same figures as --json, escaped, self-contained."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from keystay.server.ledger.ledger import ServerLedger
from keystay.server.report.budget import build_report
from keystay.server.report.cli import budget
from keystay.server.report.html import (
    STATUS_CLEAN,
    STATUS_UNVERIFIABLE,
    STATUS_VIOLATIONS,
    render_html,
    report_status,
)
from keystay.server.report.render import report_to_dict

D1, D2 = "2025-03-03", "2025-03-04"
HOSTILE = '"><script>alert(1)</script>'


class Collect(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> Collect:
    parser = Collect()
    parser.feed(html)
    return parser


def ledger_with(server_dir: Path, make_device: Callable[[], Any], *, stranger: bool = False,
                over: bool = False) -> ServerLedger:
    led = ServerLedger.open(server_dir)
    device = make_device()
    led.enroll_device(device.device_id, device.pem, "laptop")
    led.record_report("run-a", 1, *device.report("run-a", 1, [(D1, 1.0, 8.0, False)]))
    led.record_report("run-a", 2, *device.report(
        "run-a", 2, [(D1, 2.5, 8.0, False), (D2, 1.5, 8.0, False)]))
    led.record_refusal("run-a", 2, "node-9", f"refused: noise too low {HOSTILE}")
    led.record_central_dp(run_id="run-a", server_round=2, noise_multiplier=2.0, clip=1.0,
                          sample_rate=1.0, sampling="all", epsilon=1.9, delta=1e-5)
    if stranger:
        other = make_device()
        led.record_report("run-b", 1, *other.report("run-b", 1, [(D1, 0.1, 8.0, False)]))
    if over:
        led.record_report("run-b", 1, *device.report("run-b", 1, [(D2, 9.5, 8.0, True)],
                                                      total=9.5))
    return led


def test_figures_equal_json_and_everything_is_escaped(
    tmp_path: Path, make_device: Callable[[], Any],
) -> None:
    with ledger_with(tmp_path, make_device) as led:
        report = build_report(led)
    data = report_to_dict(report)
    html = render_html(report, ledger_sha256="ab" * 32)
    page = parse(html)
    blocks = {(a["data-device"], a["data-block"]): a for t, a in page.tags
              if t == "tr" and a.get("class") == "block"}
    expected = {(d["device_id"], b["block"]): b for d in data["devices"] for b in d["blocks"]}
    assert set(blocks) == set(expected) and len(expected) == 2
    for key, block in expected.items():
        assert float(blocks[key]["data-epsilon"] or "nan") == block["epsilon"]
        assert float(blocks[key]["data-remaining"] or "nan") == block["remaining"]
    assert HOSTILE not in html
    assert HOSTILE in "".join(page.text)  # shown as text, intact
    assert [t for t, _ in page.tags if t in ("script", "link", "iframe", "img")] == []
    assert not re.search(r"(src|href)=", html)
    assert "ab" * 32 in html and data["generated_at"] in html
    status = next(a for t, a in page.tags if a.get("id") == "status")
    assert status["data-status"] == STATUS_CLEAN


def test_status_orders_violations_before_unverifiable(
    tmp_path: Path, make_device: Callable[[], Any],
) -> None:
    with ledger_with(tmp_path / "a", make_device, stranger=True) as led:
        assert report_status(report_to_dict(build_report(led))) == STATUS_UNVERIFIABLE
    with ledger_with(tmp_path / "b", make_device, stranger=True, over=True) as led:
        report = build_report(led)
    assert report_status(report_to_dict(report)) == STATUS_VIOLATIONS
    html = render_html(report, ledger_sha256=None)
    # The status comes first, then violations, then unverifiable reports, then devices.
    order = [html.index(f'id="{s}"') for s in ("status", "violations", "unverifiable",
                                                 "devices", "over-time", "refusals", "central",
                                                 "source")]
    assert order == sorted(order)
    assert "OVER BUDGET" in html and "unavailable" in html


def test_cli_writes_html_with_the_ledgers_sha256(
    tmp_path: Path, make_device: Callable[[], Any],
) -> None:
    ledger_with(tmp_path, make_device).close()
    out = tmp_path / "report.html"
    result = CliRunner().invoke(budget, ["report", "--server-dir", str(tmp_path), "--json",
                                         "--html", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    html = out.read_text()
    digest = hashlib.sha256((tmp_path / "ledger.v1.sqlite").read_bytes()).hexdigest()
    assert f'id="ledger-sha256">{digest}<' in html
    assert data["devices"][0]["device_id"] in html
    bad = CliRunner().invoke(budget, ["report", "--server-dir", str(tmp_path), "--html",
                                      str(tmp_path / "missing" / "r.html")])
    assert bad.exit_code == 2 and "cannot write" in bad.output


def test_employee_day_blocks_show_both_series_beside_their_budgets(
    tmp_path: Path, employee_days: Any
) -> None:
    led, _ = employee_days.server_ledger(tmp_path / "srv", tmp_path / "keys", [[D1, D2], [D2]])
    report = build_report(led)
    data = report_to_dict(report)
    page = parse(render_html(report, ledger_sha256="0" * 64))
    rows = {a["data-block"]: a for tag, a in page.tags
            if tag == "tr" and "block" in (a.get("class") or "")}
    expected = {b["block"]: b for b in data["devices"][0]["blocks"]}
    assert set(rows) == set(expected) == {D1, D2}
    for day, block in expected.items():
        attrs = rows[day]
        assert attrs["data-unit"] == "employee-day"
        assert float(attrs["data-epsilon"] or "nan") == block["epsilon"]
        assert float(attrs["data-budget"] or "nan") == block["budget"]
        assert float(attrs["data-epsilon-broken"] or "nan") == \
            block["epsilon_broken_aggregation"]
        assert float(attrs["data-budget-broken"] or "nan") == block["budget_broken_aggregation"]
    text = " ".join(page.text)
    assert "ε against an honest-but-curious server, of budget" in text
    assert "ε against a server that breaks secure aggregation, of budget" in text
    assert "sees this device's update alone" in text  # the assumption, in words
    charts = [a.get("id") for tag, a in page.tags if tag == "svg" and a.get("id")]
    assert charts == ["chart", "chart-broken"]
    led.close()
