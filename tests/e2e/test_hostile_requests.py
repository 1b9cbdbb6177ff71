"""Hostile run configs, sent through real ``flwr run`` submissions, are refused.

Two devices on the record unit: ``employee-1`` keeps the default limits; ``employee-2`` is
stricter (higher noise floor, smaller clip, fewer steps, a small budget).
Each run asks for something only the strict device's policy forbids, so the
round must continue with the device that accepted, while the strict device's
reason travels back to the server and its ledger does not move.
"""

from __future__ import annotations

import json
import subprocess
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest

from keystay.client.ledger.accounting import Mechanism, enforced, epsilons
from keystay.server.deploy.local import LocalFederation
from keystay.server.deploy.superlink import executable, flower_env
from keystay.server.rounds import RunOutcome, start_run
from keystay.server.settings import RunSettings

pytestmark = pytest.mark.e2e

# 75 non-overlapping records a day: above the default minimum of 64.
EVENTS_PER_DAY = 2500
SAMPLE_RATE = 0.1
DELTA = 1e-5
YESTERDAY = (date.today() - timedelta(days=1)).isoformat()


def _strict_budget() -> float:
    """A budget one (σ=2, 5 steps) round on one block fits, and a second does not."""
    # The sampling rate is the run's, whatever the window count: the device
    # charges exactly (σ, q, T) as asked.
    q = SAMPLE_RATE
    once = enforced(epsilons([Mechanism(2.0, q, 5)], delta=DELTA))
    twice = enforced(epsilons([Mechanism(2.0, q, 5)] * 2, delta=DELTA))
    return round((once + twice) / 2, 6)


def _status(data: Path) -> dict:
    out = subprocess.run([executable("keystay"), "device", "status", "--data", str(data),
                          "--json"], capture_output=True, text=True, env=flower_env(), check=True)
    return json.loads(out.stdout)


def _spent(data: Path) -> dict[str, float]:
    return {b["block"]: b.get("epsilon", 0.0) for b in _status(data)["blocks"]}


def _run(federation: LocalFederation, name: str, **asks: object) -> RunOutcome:
    values = {"local_steps": 5, "sample_rate": SAMPLE_RATE, "noise_multiplier": 2.0,
              "max_grad_norm": 0.5, **asks}
    settings = RunSettings(server_dir=federation.server_dir, run_name=name,
                           num_server_rounds=1, min_devices=2, round_timeout=300.0,
                           privacy_unit="record",
                           **values)  # type: ignore[arg-type]
    outcome = start_run(federation.server_dir, settings)
    assert outcome.returncode == 0, outcome.log_file.read_text()[-3000:]
    assert len(outcome.rounds) == 1
    return outcome


def _refusals(outcome: RunOutcome) -> list[str]:
    return [r["reason"] for r in outcome.rounds[0]["refusals"]]


def test_each_hostile_request_is_refused_and_the_round_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "fed"
    strict = root / "devices" / "employee-2"
    strict.mkdir(parents=True)
    (strict / "policy.toml").write_text(
        "[policy]\n"
        # The record unit's request rules; the employee-day ones are unit-tested
        # (tests/unit/client/test_policy.py) and refused through SecAgg in test_secagg.py.
        'privacy_unit = "record"\n'
        "noise_multiplier_min = 1.5\n"
        "max_grad_norm_max = 0.5\n"
        "max_local_steps = 5\n"
        f"epsilon_per_block = {_strict_budget()}\n"
    )
    lenient = root / "devices" / "employee-1"
    lenient.mkdir(parents=True)
    (lenient / "policy.toml").write_text('[policy]\nprivacy_unit = "record"\n')
    federation = LocalFederation(root, devices=2, simulate_days=2,
                                 events_per_day=EVENTS_PER_DAY)
    try:
        federation.start()
        before = _spent(strict)

        cases = {
            "noise": ({"noise_multiplier": 1.0}, "noise"),
            "clip": ({"max_grad_norm": 0.8}, "clip"),
            "steps": ({"local_steps": 10}, "steps"),
        }
        for name, (asks, word) in cases.items():
            outcome = _run(federation, f"hostile-{name}", **asks)
            row = outcome.rounds[0]
            assert row["devices_reported"] == 1, row  # the lenient device trained
            reasons = _refusals(outcome)
            assert len(reasons) == 1 and word in reasons[0].lower(), reasons
            assert row["heldout_accuracy"] is not None  # the server scored the round
            # The code only: the full sentence stays on the device.
            assert reasons[0].startswith("refused by device policy: "), reasons
            assert _spent(strict) == before, f"a refused '{name}' request changed the ledger"

        no_dp = _run(federation, "hostile-no-dp", dp=False)
        assert no_dp.rounds[0]["devices_reported"] == 0
        reasons = _refusals(no_dp)
        assert len(reasons) == 2 and all("dp" in r.lower() for r in reasons), reasons
        assert _spent(strict) == before
        # Nobody trained: the run's final model is the initial one, and loadable.
        from keystay.common.model import initial_weights, read_checkpoint

        final = read_checkpoint(no_dp.final_checkpoint).weights
        assert all(np.array_equal(a, b) for a, b in zip(final, initial_weights(), strict=True))

        # An honest run spends the strict device's one affordable round on
        # yesterday's block, which then retires...
        spend = _run(federation, "spend", blocks=YESTERDAY)
        assert spend.rounds[0]["devices_reported"] == 2, spend.rounds[0]
        block = next(b for b in _status(strict)["blocks"] if b["block"] == YESTERDAY)
        assert block.get("retired") is True, block
        # ...and a run that asks for it again is refused by that device only.
        again = _run(federation, "retired", blocks=YESTERDAY)
        assert again.rounds[0]["devices_reported"] == 1
        reasons = _refusals(again)
        assert len(reasons) == 1 and "retired" in reasons[0], reasons

        # The server ledger holds every refusal with the device's own words.
        report = subprocess.run(
            [executable("keystay"), "budget", "report", "--server-dir",
             str(federation.server_dir), "--json"],
            capture_output=True, text=True, env=flower_env(), check=True,
        )
        refusals = json.loads(report.stdout)["refusals"]
        assert len(refusals) == 3 + 2 + 1
    finally:
        federation.stop()
