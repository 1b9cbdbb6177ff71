"""Both ε series read from verified reports: per block, and the round table's means."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.report import report_from_charge, sign_report
from keystay.server.ledger.figures import day_figures, mean_epsilons, report_unit
from keystay.server.ledger.ledger import ServerLedger

D1, D2 = "2025-03-03", "2025-03-04"


def _verified_payloads(ledger: ServerLedger) -> list[dict[str, Any]]:
    payloads = [r.payload() for r in ledger.reports() if r.verified]
    return [p for p in payloads if p is not None]


def test_mean_epsilons_over_two_devices_of_one_round(tmp_path: Path, employee_days: Any) -> None:
    """Two devices, one with a longer history: both means are the devices' own totals, averaged."""
    ledger = ServerLedger.open(tmp_path / "srv")
    last = []
    for name, rounds in (("a", [[D1]]), ("b", [[D1, D2], [D2]])):
        identity = DeviceIdentity.open(tmp_path / name)
        ledger.enroll_device(identity.device_id, identity.public_key_pem(), name)
        charges = employee_days.charge(tmp_path / f"ledger-{name}", rounds, run_id=f"run-{name}")
        for charge in charges:
            report = report_from_charge(charge, device_id=identity.device_id, max_grad_norm=0.0)
            verdict = ledger.record_report(charge.run_id, charge.server_round,
                                           *sign_report(report, identity))
            assert verdict.ok, verdict.reasons
        last.append(charges[-1])
    # The round table's round: each device's latest verified report.
    latest = {p["device_id"]: p for p in _verified_payloads(ledger)}
    honest, broken = mean_epsilons(latest.values())
    assert math.isclose(honest, (last[0].epsilon_total + last[1].epsilon_total) / 2)
    assert broken is not None and math.isclose(
        broken, ((last[0].epsilon_total_broken or 0) + (last[1].epsilon_total_broken or 0)) / 2)
    assert broken > honest  # a share alone carries less noise than the sum: larger ε
    for payload in latest.values():
        for day in day_figures(payload):
            assert day.unit == "employee-day" and day.epsilon_broken is not None
            assert day.budget_broken == payload["blocks"][0]["budget_broken"]
    ledger.close()


def test_record_level_reports_have_no_second_mean(make_device: Any) -> None:
    device = make_device()
    payloads = [device.payload("run", 1, [(D1, 1.0, 8.0, False)], total=1.0),
                device.payload("run", 1, [(D1, 3.0, 8.0, False)], total=3.0)]
    assert [report_unit(p) for p in payloads] == ["record", "record"]
    assert mean_epsilons(payloads) == (2.0, None)
    assert day_figures(payloads[0])[0].epsilon_broken is None


def test_mean_of_nothing_is_not_a_number() -> None:
    honest, broken = mean_epsilons([])
    assert math.isnan(honest) and broken is None
