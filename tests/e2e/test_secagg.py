"""SecAgg+ runs with real processes: a SuperLink, three device daemons and their SuperNodes.

One federation serves both tests (starting one costs more than a round). The
first runs SecAgg+ with central DP: the central ε lands in the server ledger,
and the global model moves by no more than the device-side clip plus the
server's noise allows. The second kills a device's SuperNode (its whole
process group: SuperNode, SuperExec, the ClientApp waiting on the daemon)
while that device trains, and checks the round still completes with the
other two devices' sum. It runs last: a SuperNode killed without saying
goodbye cannot re-activate until the SuperLink's heartbeat patience (about a
minute) has passed.

What the tests can see from outside is what the ServerApp wrote; that the
ServerApp never held an individual update is checked in-process, with the
masked bytes themselves, in tests/unit/server/test_secagg.py.
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


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    fed = LocalFederation(tmp_path_factory.mktemp("secagg") / "fed", devices=DEVICES,
                          simulate_days=2, events_per_day=2500)
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
        min_devices=DEVICES, local_steps=5, sample_rate=0.1, round_timeout=45.0,
        secagg=True, secagg_num_shares=3, secagg_reconstruction_threshold=2,
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


def test_secagg_with_central_dp(federation: LocalFederation) -> None:
    from keystay.common.model import initial_weights

    clip, z = 0.002, 0.05
    settings = _settings(federation, "secagg-cdp", central_dp=True, central_clip=clip,
                         central_noise_multiplier=z)
    outcome = start_run(federation.server_dir, settings)
    log_tail = outcome.log_file.read_text(errors="replace")[-4000:]
    assert outcome.returncode == 0, log_tail
    assert [row["round"] for row in outcome.rounds] == [1, 2], log_tail

    # The central ε of each round is in the server ledger, and grows.
    with ServerLedger.open(federation.server_dir, create=False) as ledger:
        records = ledger.central_dp(settings.run_name)
    assert [r.server_round for r in records] == [1, 2]
    assert 0 < records[0].epsilon < records[1].epsilon < math.inf
    assert [row["central_epsilon"] for row in outcome.rounds] == pytest.approx(
        [r.epsilon for r in records])
    assert all(r.clip == clip and r.noise_multiplier == z for r in records)

    # Clipped on the devices: a round moves the model by at most the mean of
    # clipped updates (norm <= clip) plus the server's noise N(0, (z*clip/n)^2)
    # per weight (4 standard deviations of its norm is far out in the tail).
    # Unclipped, the devices' DP-SGD noise alone would move it by about 0.5 a
    # round here (lr 0.05 * sigma 1 / batch 32 * sqrt(5 steps * 35k weights) per
    # device, averaged over 3), and gradients add more.
    previous = [np.asarray(w, np.float64) for w in initial_weights(seed=settings.seed)]
    for row in outcome.rounds:
        assert row["devices_reported"] == DEVICES, row
        n = row["devices_sampled"]
        current = _weights(Path(row["checkpoint"]))
        size = sum(w.size for w in current)
        bound = clip + 4 * (z * clip / n) * math.sqrt(size)
        moved = _norm(current, previous)
        assert 0 < moved <= bound, (row["round"], moved, bound)
        previous = current
        # Scored on the server's own held-out set, not by asking devices.
        assert 0.0 <= row["heldout_accuracy"] <= 1.0 and row["heldout_loss"] > 0, row
    assert bound < 0.05  # the bound is far below what an unclipped update would move
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
    settings = _settings(federation, "secagg-drop", num_server_rounds=1, local_steps=20)
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
