"""The spine, end to end: a real SuperLink, two real SuperNodes + daemons, two rounds.

Everything runs as separate processes on free loopback ports, started through
the ``keystay`` command. The test asserts on what came back: the global model
changed, each device's ε grew round over round, the ε the server received
equals what the device's own ledger holds, the server scored every round on
its own held-out set, and no device was sent an evaluate message (each
SuperNode's log names every message it received).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from keystay.server.deploy.local import LocalFederation
from keystay.server.deploy.superlink import executable, flower_env
from keystay.server.heldout import HELDOUT_SET
from keystay.server.rounds import format_round, start_run
from keystay.server.settings import RECORD_NOISE_MULTIPLIER, RunSettings

pytestmark = pytest.mark.e2e


def _device_status(data_dir: Path) -> dict:
    out = subprocess.run(
        [executable("keystay"), "device", "status", "--data", str(data_dir), "--json"],
        capture_output=True, text=True, env=flower_env(), check=True,
    )
    return json.loads(out.stdout)


def test_two_rounds_two_devices(tmp_path: Path) -> None:
    from keystay.common.model import initial_weights, read_checkpoint

    # The record unit's plain rounds, with and without central DP (the
    # employee-day default runs through SecAgg in the daemon: test_secagg.py).
    federation = LocalFederation(tmp_path / "fed", devices=2, simulate_days=2,
                                 events_per_day=2500,
                                 policy_toml='[policy]\nprivacy_unit = "record"\n')
    try:
        federation.start()
        settings = RunSettings(
            server_dir=federation.server_dir, run_name="e2e", num_server_rounds=2,
            min_devices=2, local_steps=10, sample_rate=0.1, round_timeout=600.0,
            privacy_unit="record", noise_multiplier=RECORD_NOISE_MULTIPLIER,
        )
        outcome = start_run(federation.server_dir, settings)
        assert outcome.returncode == 0, outcome.log_file.read_text()[-3000:]
        assert [r["round"] for r in outcome.rounds] == [1, 2]

        # Every device reported in every round, with a verified report; the
        # server scored the new model itself, on its own simulated employees.
        for row in outcome.rounds:
            assert row["devices_reported"] == row["devices_answered"] == 2, row
            assert not (row["refusals"] or row["unavailable"] or row["failed"]), row
            for device in row["devices"].values():
                assert device["verified"], device
                assert "heldout_accuracy" not in device and "train_loss" not in device
            assert row["heldout_set"] == HELDOUT_SET
            assert 0.0 <= row["heldout_accuracy"] <= 1.0 and row["heldout_loss"] > 0, row
            assert row["heldout_windows"] > 0
            assert format_round(row)  # `keystay round start` prints this row

        # Devices were sent training rounds and nothing else.
        for device in federation.device_list:
            supernode_log = (device.data_dir / "logs" / "supernode.log").read_text(
                errors="replace")
            assert "Receiving: train message" in supernode_log
            assert "Receiving: evaluate message" not in supernode_log

        # The model changed.
        final = read_checkpoint(outcome.final_checkpoint)
        start = initial_weights(seed=settings.seed)
        assert any(not np.allclose(a, b) for a, b in zip(final.weights, start, strict=True))

        # ε grew monotonically and equals what each device's ledger holds.
        device_ids = set(outcome.rounds[0]["devices"])
        by_device = {d: [r["devices"][d]["epsilon_total"] for r in outcome.rounds]
                     for d in device_ids}
        for series in by_device.values():
            assert series[0] > 0 and series[1] > series[0], series
        for device in federation.device_list:
            status = _device_status(device.data_dir)
            ledger_total = max(b.get("epsilon", 0.0) for b in status["blocks"])
            assert status["deviceId"] in by_device
            assert by_device[status["deviceId"]][-1] == pytest.approx(ledger_total, rel=1e-9)

        # The same federation, one more run with central DP on top.
        central = RunSettings(
            server_dir=federation.server_dir, run_name="e2e-central", num_server_rounds=1,
            min_devices=2, local_steps=10, sample_rate=0.1, round_timeout=600.0,
            central_dp=True, central_noise_multiplier=0.5, central_clip=0.5,
            privacy_unit="record", noise_multiplier=RECORD_NOISE_MULTIPLIER,
        )
        central_outcome = start_run(federation.server_dir, central)
        assert central_outcome.returncode == 0, central_outcome.log_file.read_text()[-3000:]
        row = central_outcome.rounds[0]
        assert row["devices_reported"] == 2 and row["central_epsilon"] > 0, row
        report = subprocess.run(
            [executable("keystay"), "budget", "report", "--server-dir",
             str(federation.server_dir), "--json"],
            capture_output=True, text=True, env=flower_env(), check=True,
        )
        assert "e2e-central" in report.stdout
    finally:
        started = [part.process for part in federation.parts]
        federation.stop()
    assert started and all(process.poll() is not None for process in started)
