"""Employee-day rounds through SecAgg+ in the daemons, with real processes.

A SuperLink, three device daemons and their SuperNodes (TLS, enrolled
devices); every daemon's policy is the default employee-day one with
``min_summed_devices = 2``, so a round may finish with two of three. One
federation serves every test (starting one costs more than a round):

* rounds run with the employee-day mechanism, the ClientApp relaying each
  SecAgg+ stage to its daemon; both ε series per day in each device's
  ledger equal what the server ledger verified from its signed reports;
* a device's SuperNode killed after the setup (while it trains) leaves the
  round to finish with the other two (t = 2). The t = 3 case, where the
  survivors refuse to unmask and nothing is aggregated, is checked in
  process (tests/unit/server/test_secagg.py) to keep this module to one
  federation. It runs last: a SuperNode killed without saying goodbye cannot
  re-activate until the SuperLink's heartbeat patience (about a minute) has
  passed.

What the tests can see from outside is what the ServerApp and the ledgers
wrote; that the ServerApp never held an individual update is checked
in-process, with the masked bytes themselves, in tests/unit/server/test_secagg.py.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from keystay.client.control_client import ControlClient
from keystay.server.deploy.local import LocalDevice, LocalFederation
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.rounds import format_round, start_run
from keystay.server.settings import RunSettings

pytestmark = pytest.mark.e2e

DEVICES = 3
#: The default employee-day policy, except that two devices may be summed.
POLICY = "[policy]\nmin_summed_devices = 2\n"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    fed = LocalFederation(tmp_path_factory.mktemp("secagg") / "fed", devices=DEVICES,
                          simulate_days=2, events_per_day=2500, policy_toml=POLICY)
    try:
        fed.start()
        yield fed
    finally:
        started = [part.process for part in fed.parts]
        fed.stop()
    assert started and all(process.poll() is not None for process in started)


def _settings(federation: LocalFederation, run_name: str, **overrides: object) -> RunSettings:
    # min-devices = all of them: a round waits until every SuperNode is
    # connected, so every round samples all three.
    values: dict[str, object] = dict(
        server_dir=federation.server_dir, run_name=run_name, num_server_rounds=2,
        min_devices=DEVICES, local_steps=3, sample_rate=0.1, round_timeout=45.0,
        privacy_unit="employee-day", day_sample_rate=0.5, update_clip=0.5,
        secagg_num_shares=3, secagg_reconstruction_threshold=2,
    )
    values.update(overrides)
    return RunSettings(**values)  # type: ignore[arg-type]


def _spent(device: LocalDevice) -> tuple[str, float]:
    with ControlClient(device.control_socket) as client:
        status = client.status()
    return status.device_id, sum(block.epsilon for block in status.blocks)


def _supernode_pid(daemon_pid: int) -> int | None:
    """The daemon's flower-supernode child (the daemon starts it in its own session)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"flower-supernode" in cmdline:
            return int(entry.name)
    return None


def _weights(path: Path) -> list[np.ndarray]:
    from keystay.common.model import read_checkpoint

    return [np.asarray(w, dtype=np.float64) for w in read_checkpoint(path).weights]


def _norm(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True)))


def _device_days(device: LocalDevice) -> dict[str, tuple[float, float | None]]:
    """Each day's (ε honest, ε broken aggregation) in the device's own ledger."""
    from keystay.client.ledger.ledger import Ledger

    ledger = Ledger.open(device.data_dir)
    try:
        return {t.block: (t.epsilon, t.epsilon_broken) for t in ledger.totals()}
    finally:
        ledger.close()


def test_employee_day_rounds_through_the_daemons_secagg(federation: LocalFederation) -> None:
    from keystay.common.model import initial_weights

    settings = _settings(federation, "employee-day")
    outcome = start_run(federation.server_dir, settings)
    log_tail = outcome.log_file.read_text(errors="replace")[-4000:]
    assert outcome.returncode == 0, log_tail
    assert [row["round"] for row in outcome.rounds] == [1, 2], log_tail

    previous = [np.asarray(w, np.float64) for w in initial_weights(seed=settings.seed)]
    for row in outcome.rounds:
        assert row["devices_reported"] == DEVICES, row
        assert row["secagg"]["aggregate_only"] is True
        assert sorted(row["secagg"]["summed_nodes"]) == sorted(row["secagg"]["sampled_nodes"])
        assert all(entry["verified"] and not entry["flags"] for entry in row["devices"].values())
        # Both means per day, and the broken-aggregation one is the larger.
        assert 0 < row["epsilon_day_mean"] < row["epsilon_day_mean_broken_aggregation"], row
        current = _weights(Path(row["checkpoint"]))
        assert _norm(current, previous) > 0  # the decoded mean moved the model
        previous = current
    assert outcome.rounds[0]["epsilon_day_mean"] < outcome.rounds[1]["epsilon_day_mean"]

    # Each device's ledger holds exactly what its last signed report says,
    # under both assumptions, and the server verified that report.
    with ServerLedger.open(federation.server_dir, create=False) as ledger:
        for device in federation.device_list:
            device_id, _ = _spent(device)
            reports = [r for r in ledger.reports(device_id=device_id, run_id=settings.run_name)]
            assert [r.server_round for r in reports] == [1, 2]
            assert all(r.verified for r in reports)
            payload = reports[-1].payload()
            assert payload is not None
            reported = {b["block"]: (b["epsilon"], b.get("epsilon_broken"))
                        for b in payload["blocks"]}
            held = _device_days(device)
            assert reported and set(reported) <= set(held)
            for day, (honest, broken) in reported.items():
                assert held[day][0] == pytest.approx(honest)
                assert broken is not None and held[day][1] == pytest.approx(broken)
    for device in federation.device_list:
        supernode_log = (device.data_dir / "logs" / "supernode.log").read_text(errors="replace")
        assert "Receiving: train message" in supernode_log
        assert "Receiving: evaluate message" not in supernode_log


def test_round_completes_with_the_survivors_when_a_device_drops(
    federation: LocalFederation,
) -> None:
    from keystay.common.model import initial_weights

    victim = federation.device_list[-1]
    assert victim.part is not None
    victim_id, before = _spent(victim)
    killed: dict[str, object] = {}

    def kill_when_training() -> None:
        # The daemon charges its ledger before it trains (write-ahead): the
        # first charge of this run means the masking stage has reached it and
        # its update is not computed yet.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if _spent(victim)[1] > before:
                killed["charged"] = True
                pid = _supernode_pid(victim.part.process.pid)  # type: ignore[union-attr]
                if pid is not None:
                    os.killpg(pid, signal.SIGKILL)
                    killed["pid"] = pid
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    # One round: the point is that it completes without the victim. More local
    # steps than needed, to leave time to kill the victim while it trains.
    settings = _settings(federation, "secagg-drop", num_server_rounds=1, local_steps=40,
                         day_sample_rate=1.0)
    outcome = start_run(federation.server_dir, settings)
    killer.join(5)
    log_tail = outcome.log_file.read_text(errors="replace")[-4000:]
    assert killed.get("charged"), "the victim never started training; nothing was killed"
    assert killed.get("pid"), "the victim's daemon had no flower-supernode child to kill"
    assert outcome.returncode == 0, log_tail
    assert [row["round"] for row in outcome.rounds] == [1], log_tail

    first = outcome.rounds[0]
    # Round 1: three devices sampled, the victim's masked vector never came,
    # and the other two were summed.
    assert first["devices_sampled"] == DEVICES
    assert len(first["secagg"]["summed_nodes"]) == DEVICES - 1, first
    assert len(first["secagg"]["dropped_nodes"]) == 1, first
    assert first["secagg"]["aggregate_only"] is True
    assert first["devices_reported"] == DEVICES - 1
    reported = {d for d, entry in first["devices"].items() if entry.get("verified")}
    others = {_spent(device)[0] for device in federation.device_list[:-1]}
    assert reported == others and victim_id not in reported, first
    for device_id in others:
        assert first["devices"][device_id]["epsilon_total"] > 0
    assert "train_loss_mean" not in first
    assert 0.0 <= first["heldout_accuracy"] <= 1.0 and first["heldout_windows"] > 0

    # The survivors' sum moved the model.
    start = [np.asarray(w, np.float64) for w in initial_weights(seed=settings.seed)]
    assert _norm(_weights(Path(first["checkpoint"])), start) > 0
    assert _norm(_weights(outcome.final_checkpoint), start) > 0
    assert format_round(first)  # `keystay round start` prints this row
