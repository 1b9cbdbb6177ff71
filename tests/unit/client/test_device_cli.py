"""``keystay device status``: both ε per employee-day, each beside its budget, with the unit.

The reply is what the daemon's :class:`Controls` builds from a real device
ledger charged with both mechanisms of each employee-day round; only the
socket between the command and the daemon is left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from keystay.client import device_cli
from keystay.client.daemon.controls import Controls
from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy
from keystay.v1 import device_pb2

DAYS = ["2026-12-01", "2026-12-02", "2026-12-03"]


def _reply(data_dir: Path, policy: DevicePolicy) -> device_pb2.StatusReply:
    with Ledger.open(data_dir) as ledger:
        totals = {t.block: t for t in ledger.totals()}
    controls = Controls(SimpleNamespace(policy=policy), None, "none", "t")  # type: ignore[arg-type]
    return device_pb2.StatusReply(
        device_id="dev-1", source="none", delta=policy.delta, version="t",
        blocks=[controls._block_status(day, 7, totals.get(day)) for day in DAYS],
    )


@pytest.fixture
def charged(tmp_path: Path, employee_days: Any, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DAYS[0] charged once, DAYS[1] twice (retired by the broken budget), DAYS[2] never."""
    policy = employee_days.policy(10.0, 12.0)
    employee_days.charge(tmp_path, [DAYS[:2], DAYS[1:2]], policy=policy)
    reply = _reply(tmp_path, policy)
    monkeypatch.setattr(device_cli, "_call", lambda *_args, **_kw: reply)
    return tmp_path


def test_status_shows_both_epsilons_beside_their_budgets(charged: Path) -> None:
    result = CliRunner().invoke(device_cli.device, ["status", "--data", str(charged)])
    assert result.exit_code == 0, result.output
    with Ledger.open(charged) as ledger:
        totals = {t.block: t for t in ledger.totals()}
    lines = {line.split()[0]: line for line in result.output.splitlines()
             if line[:4] == "2026"}
    for day, total in totals.items():
        line = lines[day]
        assert f"{total.epsilon:.3f} / {total.budget:g}" in line
        assert f"{total.epsilon_broken:.3f} / {total.budget_broken:g}" in line
        assert "employee-day" in line
    assert lines[DAYS[1]].rstrip().endswith("retired")
    assert lines[DAYS[0]].rstrip().endswith("open")
    # Never charged: nothing spent of either budget, in the policy's unit.
    assert "0.000 / 10" in lines[DAYS[2]] and "0.000 / 12" in lines[DAYS[2]]
    words = " ".join(result.output.split())
    assert "honest-but-curious server" in words
    assert "breaks secure aggregation" in words and "either budget" in words


def test_status_json_carries_both_series_and_the_unit(charged: Path) -> None:
    result = CliRunner().invoke(device_cli.device,
                                ["status", "--data", str(charged), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    with Ledger.open(charged) as ledger:
        totals = {t.block: t for t in ledger.totals()}
    blocks = {b["block"]: b for b in data["blocks"]}
    for day, total in totals.items():
        assert blocks[day]["unit"] == "employee-day" and blocks[day]["hasBroken"]
        assert blocks[day]["epsilon"] == total.epsilon
        assert blocks[day]["epsilonBroken"] == total.epsilon_broken
        assert blocks[day]["budgetBroken"] == total.budget_broken
    assert data["privacy_unit"] == device_cli.EMPLOYEE_DAY_UNIT
