"""The security report: table order, JSON schema, plot, and `keystay budget` exit codes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from keystay.common.exitcodes import ExitCode
from keystay.server.ledger.ledger import LEDGER_FILE, ServerLedger
from keystay.server.report.budget import (
    KIND_CENTRAL_NO_PRIVACY,
    KIND_CENTRAL_OVER_POLICY,
    KIND_CONTRADICTION,
    KIND_OVER_BUDGET,
    KIND_TAMPERED,
    KIND_UNVERIFIABLE,
    PRIVACY_UNIT,
    SCHEMA,
    build_report,
    check,
)
from keystay.server.report.cli import (
    budget,
)
from keystay.server.report.render import render_json, render_plot, render_table

D1, D2 = "2025-03-03", "2025-03-04"
MakeDevice = Callable[[], Any]  # the conftest's FakeDevice factory


def clean_ledger(server_dir: Path, make_device: MakeDevice) -> tuple[ServerLedger, Any]:
    """Two rounds from one honest device, with central DP and a refusal."""
    led = ServerLedger.open(server_dir)
    device = make_device()
    led.enroll_device(device.device_id, device.pem, "laptop")
    led.record_report("run-a", 1, *device.report("run-a", 1, [(D1, 1.0, 8.0, False)]))
    led.record_report(
        "run-a", 2, *device.report("run-a", 2, [(D1, 2.0, 8.0, False), (D2, 1.0, 8.0, False)])
    )
    led.record_refusal("run-a", 2, "node-9", "refused: noise 0.5 is below this device's floor")
    for rnd, eps in ((1, 1.2), (2, 1.9)):
        led.record_central_dp(
            run_id="run-a", server_round=rnd, noise_multiplier=2.0, clip=1.0, sample_rate=1.0,
            sampling="all devices every round, no amplification", epsilon=eps, delta=1e-5,
        )
    return led, device


def add_violations(led: ServerLedger, device: Any, make_device: MakeDevice) -> None:
    """An unknown device (unverifiable) and then an over-budget block."""
    stranger = make_device()
    led.record_report("run-b", 1, *stranger.report("run-b", 1, [(D1, 0.1, 8.0, False)]))
    led.record_report("run-b", 1, *device.report("run-b", 1, [(D2, 9.5, 8.0, True)], total=9.5))


def test_clean_ledger_has_no_violations(tmp_path: Path, make_device: MakeDevice) -> None:
    led, device = clean_ledger(tmp_path, make_device)
    report = build_report(led)
    assert report.clean and check(led) == []
    [line] = report.devices
    blocks = {b.block: b for b in line.blocks}
    assert blocks[D1].epsilon == 2.0 and blocks[D1].remaining == 6.0
    assert blocks[D1].runs == ("run-a",) and blocks[D1].charges == 2
    assert line.epsilon_total == 2.0
    [central] = report.central
    assert (central.rounds, central.epsilon) == (2, 1.9)
    text = render_table(report)
    assert "VIOLATIONS (0)" in text and device.device_id in text
    led.close()


def test_table_lists_violations_first(tmp_path: Path, make_device: MakeDevice) -> None:
    led, device = clean_ledger(tmp_path, make_device)
    add_violations(led, device, make_device)
    report = build_report(led)
    kinds = [v.kind for v in report.violations]
    # Over-budget was recorded after the unverifiable report but is listed first.
    assert kinds == [KIND_OVER_BUDGET, KIND_UNVERIFIABLE]
    text = render_table(report)
    lines = text.splitlines()
    violations_at = lines.index("VIOLATIONS (2)")
    devices_at = next(i for i, line in enumerate(lines) if line.startswith("DEVICES AND BLOCKS"))
    assert violations_at < devices_at
    body = lines[violations_at + 1 : devices_at]
    over = next(i for i, line in enumerate(body) if line.strip().startswith("over-budget"))
    unverifiable = next(i for i, line in enumerate(body) if line.strip().startswith("unverif"))
    assert over < unverifiable
    assert "2 VIOLATION(S)" in lines[3]
    # Columns are aligned: every row of the device table starts its block column at the
    # same offset as the header.
    header = next(line for line in lines if line.strip().startswith("device") and "block" in line)
    col = header.index("block")
    rows = [line for line in lines if line.startswith(f"  {device.device_id}  ")]
    assert rows and all(line[col : col + 10] in (D1, D2) for line in rows[:2])
    led.close()


def test_json_follows_the_documented_schema(tmp_path: Path, make_device: MakeDevice) -> None:
    led, device = clean_ledger(tmp_path, make_device)
    add_violations(led, device, make_device)
    data = json.loads(render_json(build_report(led)))
    assert data["schema"] == SCHEMA
    assert set(data) == {
        "schema", "generated_at", "ledger", "clean", "summary", "violations",
        "unverifiable_reports", "devices", "central_dp", "refusals", "privacy_unit",
        "units_reported", "units", "assumptions",
    }
    assert data["privacy_unit"] == PRIVACY_UNIT
    assert data["units_reported"] == [PRIVACY_UNIT]  # what the verified reports state
    assert data["clean"] is False
    assert data["summary"] == {
        "devices": 1, "reports": 4, "verified_reports": 3, "flagged_reports": 2,
        "violations": 2, "refusals": 1,
    }
    violation_keys = {"kind", "device_id", "run_id", "server_round", "block", "report_id", "detail"}
    assert all(set(v) == violation_keys for v in data["violations"])
    assert data["violations"][0]["kind"] == KIND_OVER_BUDGET
    assert data["violations"][0]["block"] == D2
    [unverifiable] = data["unverifiable_reports"]
    assert unverifiable["signature_valid"] is False and unverifiable["reasons"]
    [dev] = data["devices"]
    assert dev["device_id"] == device.device_id and dev["epsilon_total"] == 9.5
    block = {b["block"]: b for b in dev["blocks"]}[D2]
    # A record-level block: one ε per record, no second series, no assumption.
    assert block == {
        "block": D2, "unit": "record", "epsilon": 9.5, "budget": 8.0, "remaining": 0.0,
        "retired": True, "over_budget": True, "charges": 2, "runs": ["run-a", "run-b"],
        "assumption": None, "assumption_broken_aggregation": None,
        "epsilon_broken_aggregation": None, "budget_broken_aggregation": None,
        "remaining_broken_aggregation": None, "over_budget_broken_aggregation": False,
    }
    assert dev["epsilon_total_broken_aggregation"] is None
    [central] = data["central_dp"]
    assert central["sampling"] == "all devices every round, no amplification"
    assert central["epsilon"] == 1.9 and central["rounds"] == 2
    led.close()


def test_unbounded_and_over_limit_central_epsilon_are_violations(
    tmp_path: Path, make_device: MakeDevice
) -> None:
    led, _ = clean_ledger(tmp_path, make_device)
    assert [v.kind for v in check(led, max_central_epsilon=1.5)] == [KIND_CENTRAL_OVER_POLICY]
    led.record_central_dp(
        run_id="run-z", server_round=1, noise_multiplier=0.0, clip=1.0, sample_rate=1.0,
        sampling="all", epsilon=float("inf"), delta=1e-5,
    )
    assert [v.kind for v in check(led)] == [KIND_CENTRAL_NO_PRIVACY]
    data = json.loads(render_json(build_report(led)))
    assert {c["run_id"]: c["epsilon"] for c in data["central_dp"]}["run-z"] is None
    led.close()


def test_plot_is_a_png(tmp_path: Path, make_device: MakeDevice) -> None:
    led, device = clean_ledger(tmp_path, make_device)
    add_violations(led, device, make_device)
    out = render_plot(build_report(led), tmp_path / "budget.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5_000
    led.close()


# --- CLI -----------------------------------------------------------------------------


def test_check_exits_zero_when_clean(tmp_path: Path, make_device: MakeDevice) -> None:
    clean_ledger(tmp_path, make_device)[0].close()
    result = CliRunner().invoke(budget, ["check", "--server-dir", str(tmp_path)])
    assert result.exit_code == ExitCode.OK, result.output
    assert "clean" in result.output


def test_check_exits_three_on_violations(tmp_path: Path, make_device: MakeDevice) -> None:
    led, device = clean_ledger(tmp_path, make_device)
    add_violations(led, device, make_device)
    led.close()
    result = CliRunner().invoke(budget, ["check", "--server-dir", str(tmp_path)])
    assert result.exit_code == ExitCode.BUDGET_VIOLATIONS == 3
    assert "2 violation(s)" in result.output and "over-budget" in result.output


def test_check_exits_three_on_ledger_edited_at_rest(
    tmp_path: Path, make_device: MakeDevice
) -> None:
    clean_ledger(tmp_path, make_device)[0].close()
    conn = sqlite3.connect(tmp_path / LEDGER_FILE)
    conn.execute("UPDATE block_epsilons SET epsilon = 0.5 WHERE block = ?", (D1,))
    conn.commit()
    conn.close()
    result = CliRunner().invoke(budget, ["check", "--server-dir", str(tmp_path)])
    assert result.exit_code == ExitCode.BUDGET_VIOLATIONS
    assert KIND_TAMPERED in result.output


def test_check_max_central_epsilon_option(tmp_path: Path, make_device: MakeDevice) -> None:
    clean_ledger(tmp_path, make_device)[0].close()
    runner = CliRunner()
    args = ["check", "--server-dir", str(tmp_path), "--max-central-epsilon"]
    assert runner.invoke(budget, [*args, "1.5"]).exit_code == ExitCode.BUDGET_VIOLATIONS
    assert runner.invoke(budget, [*args, "5"]).exit_code == ExitCode.OK


@pytest.mark.parametrize(
    "args",
    [
        ["check"],  # --server-dir missing
        ["check", "--server-dir", "{missing}"],  # no ledger there
        ["report", "--server-dir", "{tmp}", "--bogus"],
        ["check", "--server-dir", "{tmp}", "--max-central-epsilon", "-1"],
    ],
)
def test_usage_errors_exit_two(tmp_path: Path, make_device: MakeDevice, args: list[str]) -> None:
    clean_ledger(tmp_path, make_device)[0].close()
    filled = [a.format(tmp=tmp_path, missing=tmp_path / "nope") for a in args]
    result = CliRunner().invoke(budget, filled)
    assert result.exit_code == ExitCode.USAGE == 2, result.output


def test_unreadable_ledger_exits_one(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_bytes(b"this is not sqlite" * 100)
    result = CliRunner().invoke(budget, ["check", "--server-dir", str(tmp_path)])
    assert result.exit_code == ExitCode.BUDGET_LEDGER_UNREADABLE == 1
    assert LEDGER_FILE in result.output


def test_report_command_json_and_plot(tmp_path: Path, make_device: MakeDevice) -> None:
    led, device = clean_ledger(tmp_path, make_device)
    add_violations(led, device, make_device)
    led.close()
    plot = tmp_path / "out.png"
    result = CliRunner().invoke(
        budget, ["report", "--server-dir", str(tmp_path), "--json", "--plot", str(plot)]
    )
    # 'report' describes; only 'check' gates.
    assert result.exit_code == ExitCode.OK, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == SCHEMA and data["violations"][0]["kind"] == KIND_OVER_BUDGET
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = CliRunner().invoke(budget, ["report", "--server-dir", str(tmp_path)])
    assert table.output.index("VIOLATIONS") < table.output.index("DEVICES AND BLOCKS")


def test_help_documents_exit_codes(tmp_path: Path) -> None:
    text = CliRunner().invoke(budget, ["check", "--help"]).output
    for code in ("0", "2", "3"):
        assert f"  {code}  " in text
    assert "unverifiable" in text and "over-budget" in text
    assert KIND_CONTRADICTION in text


def test_server_side_imports_no_device_internals_and_no_torch() -> None:
    """The ledger, report and central-DP modules stay off the device's code (and torch)."""
    code = (
        "import sys\n"
        "import keystay.server.ledger.ledger, keystay.server.report.cli\n"
        "import keystay.server.central_dp\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m == 'opacus' or any(\n"
        "    m.startswith('keystay.client.' + p) for p in\n"
        "    ('store', 'capture', 'daemon', 'ledger', 'policy', 'identity')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == ""


def test_the_privacy_unit_is_stated_and_matches_the_devices(
    tmp_path: Path, make_device: MakeDevice
) -> None:
    from keystay.common.windows import PRIVACY_UNIT as DEVICE_UNIT

    # The server restates the device's unit (it does not import device code).
    assert PRIVACY_UNIT == DEVICE_UNIT
    led, device = clean_ledger(tmp_path, make_device)
    table = render_table(build_report(led))
    assert f"eps is per record: {PRIVACY_UNIT}" in table
    assert "another unit" not in table
    # A device on an older release (overlapping windows) is named, not hidden.
    old = "record = one token window within an employee-day block"
    led.record_report("run-old", 9, *device.report("run-old", 9, [(D1, 0.6, 8.0, False)],
                                                   unit=old))
    report = build_report(led)
    assert old in report.units_reported
    assert f"another unit: {old}" in render_table(report)
    led.close()


# --- employee-day blocks: both ε, each beside its budget ------------------------------


def _device_totals(keys_dir: Path) -> dict[str, Any]:
    """The device ledger's own view of each day: the figures the report must repeat."""
    from keystay.client.ledger.ledger import Ledger

    with Ledger.open(keys_dir / "day-ledger") as device_ledger:
        return {t.block: t for t in device_ledger.totals()}


def _png_height(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")  # IHDR: width, then height


def test_employee_day_blocks_carry_both_series_from_the_signed_reports(
    tmp_path: Path, employee_days: Any
) -> None:
    led, identity = employee_days.server_ledger(tmp_path / "srv", tmp_path / "keys",
                                                [[D1, D2], [D2]])
    truth = _device_totals(tmp_path / "keys")
    report = build_report(led)
    assert report.clean, report.violations
    [device] = report.devices
    blocks = {b.block: b for b in device.blocks}
    for day in (D1, D2):
        line, total = blocks[day], truth[day]
        assert line.unit == "employee-day" and line.employee_day
        assert (line.epsilon, line.budget) == (total.epsilon, total.budget)
        assert (line.epsilon_broken, line.budget_broken) == (total.epsilon_broken,
                                                             total.budget_broken)
        # The share alone carries less noise than the sum: the second figure is larger.
        assert line.epsilon_broken is not None and line.epsilon_broken > line.epsilon
    assert blocks[D2].epsilon > blocks[D1].epsilon  # two rounds against one
    assert device.epsilon_total_broken == max(t.epsilon_broken for t in truth.values())
    assert [p[1] for p in report.series_broken[identity.device_id]] == [
        truth[D1].epsilon_broken, truth[D2].epsilon_broken]
    led.close()


def test_table_shows_both_series_with_budgets_unit_and_assumptions(
    tmp_path: Path, employee_days: Any
) -> None:
    led, identity = employee_days.server_ledger(tmp_path / "srv", tmp_path / "keys",
                                                [[D1, D2], [D2]])
    report = build_report(led)
    text = render_table(report)
    line = {b.block: b for b in report.devices[0].blocks}[D2]
    assert "DEVICES AND DAYS, EMPLOYEE-DAY" in text
    row = next(r for r in text.splitlines() if r.startswith(f"  {identity.device_id}  {D2}"))
    assert f"{line.epsilon:.4f} / {line.budget:g}" in row
    assert f"{line.epsilon_broken:.4f} / {line.budget_broken:g}" in row
    assert "eps honest-but-curious server" in text
    assert "eps server breaking secure aggregation" in text
    assert "employee-day eps is per employee-day" in text
    for name in ("honest-but-curious server: ", "server that breaks secure aggregation: "):
        assert f"  {name}" in text
    # Nothing here is record-level, and the employee-day unit is not "another unit".
    assert "none at record level" in text and "another unit" not in text
    led.close()


def test_record_rows_keep_their_look_beside_employee_days(
    tmp_path: Path, make_device: MakeDevice, employee_days: Any
) -> None:
    led, device = clean_ledger(tmp_path, make_device)
    before = render_table(build_report(led)).splitlines()
    led.close()
    led, identity = employee_days.server_ledger(tmp_path, tmp_path / "keys", [[D1]])
    after = render_table(build_report(led)).splitlines()
    header = next(r for r in before if "eps spent" in r and "remaining" in r)
    rows = [r for r in before if r.startswith(f"  {device.device_id}  ")]
    assert rows and header in after and all(r in after for r in rows)
    assert "DEVICES AND DAYS, EMPLOYEE-DAY" in "\n".join(after)
    assert not any(r.startswith(f"  {identity.device_id}  ") and "eps" not in r
                   and "/" not in r for r in after)  # its days are in the day table only
    led.close()


def test_json_names_both_series_and_assumptions_explicitly(
    tmp_path: Path, employee_days: Any
) -> None:
    led, _ = employee_days.server_ledger(tmp_path / "srv", tmp_path / "keys", [[D1, D2], [D2]])
    report = build_report(led)
    data = json.loads(render_json(report))
    assert data["schema"] == SCHEMA == "keystay.budget-report/v2"
    assert data["assumptions"] == {
        "epsilon": "honest-but-curious server",
        "epsilon_broken_aggregation": "server that breaks secure aggregation",
    }
    assert set(data["units"]) == {"record", "employee-day"}
    assert data["units_reported"] == ["employee-day"]
    [dev] = data["devices"]
    lines = {b.block: b for b in report.devices[0].blocks}
    for block in dev["blocks"]:
        line = lines[block["block"]]
        assert block["unit"] == "employee-day"
        assert block["assumption"] == "honest-but-curious server"
        assert block["assumption_broken_aggregation"] == "server that breaks secure aggregation"
        assert (block["epsilon"], block["budget"]) == (line.epsilon, line.budget)
        assert block["epsilon_broken_aggregation"] == line.epsilon_broken
        assert block["budget_broken_aggregation"] == line.budget_broken
        assert block["remaining_broken_aggregation"] == line.remaining_broken
        assert block["over_budget"] is block["over_budget_broken_aggregation"] is False
    assert dev["epsilon_total_broken_aggregation"] == report.devices[0].epsilon_total_broken
    led.close()


def test_plot_draws_a_second_panel_for_broken_aggregation(
    tmp_path: Path, make_device: MakeDevice, employee_days: Any
) -> None:
    record = render_plot(build_report(clean_ledger(tmp_path / "a", make_device)[0]),
                         tmp_path / "record.png")
    led, _ = employee_days.server_ledger(tmp_path / "srv", tmp_path / "keys", [[D1], [D1]])
    days = render_plot(build_report(led), tmp_path / "days.png")
    assert days.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Two panels stacked: the figure is taller than the one-panel record plot.
    assert _png_height(days) > 1.5 * _png_height(record)
    led.close()


def test_report_command_every_format_on_an_employee_day_ledger(
    tmp_path: Path, employee_days: Any
) -> None:
    employee_days.server_ledger(tmp_path / "srv", tmp_path / "keys", [[D1, D2]])[0].close()
    args = ["report", "--server-dir", str(tmp_path / "srv")]
    plot, page = tmp_path / "p.png", tmp_path / "r.html"
    result = CliRunner().invoke(budget, [*args, "--json", "--plot", str(plot),
                                         "--html", str(page)])
    assert result.exit_code == ExitCode.OK, result.output
    data = json.loads(result.stdout)
    blocks = data["devices"][0]["blocks"]
    assert all(b["epsilon_broken_aggregation"] > b["epsilon"] for b in blocks)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert 'id="chart-broken"' in page.read_text()
    table = CliRunner().invoke(budget, args)
    assert table.exit_code == ExitCode.OK and "DEVICES AND DAYS" in table.output
    assert "server that breaks secure aggregation" in CliRunner().invoke(
        budget, ["--help"]).output
