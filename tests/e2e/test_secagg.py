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
  passed;
* the fault matrix during SecAgg+ (issue 13, docs/faults.md): the ServerApp
  killed while the devices mask, a ClientApp killed in the unmask stage, a
  daemon killed while it masks, and the SuperLink killed while they mask;
  after each, what a supervisor would restart is restarted and the
  invariants of tests/e2e/faults.py are checked.
  They run before the drop test; a cell that needs all three devices waits
  for the one a previous cell killed to be online again.

What the tests can see from outside is what the ServerApp and the ledgers
wrote; that the ServerApp never held an individual update is checked
in-process, with the masked bytes themselves, in tests/unit/server/test_secagg.py.
"""

from __future__ import annotations

import json
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
from tests.e2e.faults import (
    Background,
    Snapshot,
    block_epsilons,
    broken_charges,
    charges,
    check_invariants,
    descendants,
    kill_daemon,
    mentioning,
    not_refunded,
    one,
    proc_table,
    supernodes,
    wait_for,
    when_charged,
)

pytestmark = pytest.mark.e2e

DEVICES = 3
#: The default employee-day policy, except that two devices may be summed, and
#: the largest daily budget a policy may set: the fault cells add rounds, and a
#: device whose days retire would refuse, which is another test's subject.
POLICY = "[policy]\nmin_summed_devices = 2\nepsilon_per_day = 64.0\n"


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
    # No process of the federation outlived it (the fault cells restart parts of it).
    wait_for("every process of the federation to end",
             lambda: not mentioning(str(fed.root)), 20, every=0.2)


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


def _shown(federation: LocalFederation, row: dict[str, object]) -> str:
    """A failed round assertion's message: the whole row and each device's last log lines.

    The row is given whole (pytest's repr would cut it), and the daemons'
    and SuperNodes' last lines say where a device's reply went: CI keeps
    nothing else of a federation once the test is over.
    """
    lines = [json.dumps(row, sort_keys=True)]
    for device in federation.device_list:
        for name in ("daemon.log", "supernode.log"):
            path = device.data_dir / "logs" / name
            tail = path.read_text(errors="replace").splitlines()[-12:] if path.exists() else []
            lines += [f"--- {device.name} {name}", *tail]
    return "\n".join(lines)


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


# ----------------------------------------------------------------- the fault matrix during SecAgg+
#
# Issue 13's cells "during SecAgg" (docs/faults.md), on this federation:
# SIGKILL one process at a stage of a SecAgg+ round, restart what a
# supervisor would, and check the invariants (tests/e2e/faults.py): no ε
# refunded in either series, every report the server holds matches a device
# charge, nothing orphaned, and the federation runs the next round. The
# stage is observed, never guessed with a sleep: the first charge of the run
# in a device's ledger means the masking stage (collect-masked-vectors) has
# reached it, after setup and share-keys, and its masked vector is not made
# yet; the daemon's log line "SecAgg+ run R round N: unmask" means the
# server collected the masked vectors and asked it for its key shares.


def _all_charged(federation: LocalFederation, name: str) -> tuple[RunSettings, Background]:
    """A one-round run started in the background, once every device has charged it."""
    settings = _settings(federation, name, num_server_rounds=1, local_steps=20,
                         day_sample_rate=1.0)
    run = Background(federation, settings)
    for device in federation.device_list:
        when_charged(device, settings.run_name)
    return settings, run


def _charged_and_unreported(federation: LocalFederation, run_name: str) -> None:
    """Every device keeps both ε series of its charge; the server holds no report of the run."""
    for device in federation.device_list:
        assert charges(device, run_name), device.name
        assert broken_charges(device, run_name), device.name
    with ServerLedger.open(federation.server_dir, create=False) as ledger:
        assert not ledger.reports(run_id=run_name)


def _serverapp(federation: LocalFederation) -> int:
    link = next(p for p in federation.parts if p.name == "SuperLink")
    return one(descendants(link.process.pid), "flwr-serverapp")


def _clientapps(federation: LocalFederation) -> dict[int, str]:
    apps: dict[int, str] = {}
    for device in federation.device_list:
        if device.part is not None and device.part.alive:
            apps.update({pid: cmd for pid, cmd in descendants(device.part.process.pid).items()
                         if "flwr-clientapp" in cmd})
    return apps


def test_serverapp_killed_during_secagg(federation: LocalFederation) -> None:
    """ServerApp x collect-masked-vectors: the run fails, the charges stay, the next run works.

    Killed once every device has charged the run (each is masking, or has
    sent its vector): the SecAgg+ ServerApp records reports when a stage's
    replies are in, so the server holds none from this run; the devices'
    charges, both series, stay (never refunded). Restarted, not resumed: the
    operator starts a new run; the next cell's run is that run (it sums all
    three devices), not repeated here: Flower takes a minute to notice the
    dead ServerApp and end its run, which is this cell's cost.
    """
    before = Snapshot.take(federation)
    settings, run = _all_charged(federation, "fault-secagg-serverapp")
    os.kill(_serverapp(federation), signal.SIGKILL)
    outcome = run.wait(240)
    assert not outcome.ok and not outcome.rounds
    assert not (settings.run_dir / "final.pt").exists()
    _charged_and_unreported(federation, settings.run_name)
    # The run's ClientApps end with it (Flower stops them once the run is over).
    wait_for("the killed run's ClientApps to end", lambda: not _clientapps(federation),
             60, every=0.5)
    check_invariants(federation, before)


def test_clientapp_killed_during_unmask(federation: LocalFederation) -> None:
    """ClientApp x unmask: the victim's vector is in the sum all the same.

    Killed when the daemon logs the unmask stage: the server already holds
    the victim's masked vector and its verified report, and the victim's key
    shares die with the ClientApp that relays them. The other two devices'
    shares (t = 2) unmask it: the round sums all three, the victim's report
    matches its charge (answered), and the next run gets a new ClientApp
    (the daemon cell's run sums this device). This run, after the ServerApp
    cell's, is also the new run that cell's operator starts: all three are
    summed. (The SuperNode killed during SecAgg is the drop test below; a
    ClientApp costs no re-activation wait.)
    """
    federation.wait_online(DEVICES, timeout=240)
    victim = federation.device_list[0]
    assert victim.part is not None
    before = Snapshot.take(federation)
    victim_id = before.ids[victim.name]
    daemon_log = victim.data_dir / "logs" / "daemon.log"
    unmasks = lambda: daemon_log.read_text(errors="replace").count(": unmask")  # noqa: E731
    seen = unmasks()
    settings = _settings(federation, "fault-secagg-unmask", num_server_rounds=1,
                         round_timeout=30.0)
    run = Background(federation, settings)
    wait_for("the victim's unmask stage", lambda: unmasks() > seen, 240, every=0.02)
    os.kill(one(descendants(victim.part.process.pid), "flwr-clientapp"), signal.SIGKILL)
    outcome = run.wait()
    tail = outcome.log_file.read_text(errors="replace")[-3000:]
    assert outcome.returncode == 0 and len(outcome.rounds) == 1, tail
    (first,) = outcome.rounds
    assert len(first["secagg"]["summed_nodes"]) == DEVICES, _shown(federation, first)
    assert first["devices"][victim_id]["verified"], _shown(federation, first)
    rows = charges(victim, settings.run_name)
    assert rows and [row[4] for row in rows] == [1] * len(rows), rows
    with ServerLedger.open(federation.server_dir, create=False) as ledger:
        assert [r.server_round for r in
                ledger.reports(device_id=victim_id, run_id=settings.run_name)] == [1]
    assert victim.part.alive and len(supernodes(victim)) == 1
    check_invariants(federation, before)
    # The next run (the daemon cell's, below) sums this victim again: a new
    # ClientApp serves it. Not repeated here, to keep the module short.


def test_daemon_killed_during_secagg_masking(federation: LocalFederation) -> None:
    """Daemon x collect-masked-vectors: the round sums the other two; restarted, it lost nothing.

    The daemon holds the SecAgg+ keys in memory only, so a daemon killed
    after share-keys, while it masks, is a dropout: the other two devices are
    summed (t = 2). Its SuperNode, ClientApp and trainer die with it; its
    charge stays in both series, unanswered; restarted (systemd), it has one
    SuperNode and enforces what was charged.
    """
    victim = federation.device_list[1]
    assert victim.part is not None
    before = Snapshot.take(federation)
    victim_id = before.ids[victim.name]
    settings = _settings(federation, "fault-secagg-daemon", num_server_rounds=1,
                         local_steps=20, day_sample_rate=1.0, round_timeout=90.0)
    run = Background(federation, settings)
    when_charged(victim, settings.run_name)
    charged = block_epsilons(victim)
    kill_daemon(victim)
    try:
        outcome = run.wait()
    finally:
        # Restarted (systemd) once the round is over, whatever it did: the
        # cells after this one need all three devices.
        federation.restart_device(victim)
    tail = outcome.log_file.read_text(errors="replace")[-3000:]
    assert outcome.returncode == 0 and len(outcome.rounds) == 1, tail
    (first,) = outcome.rounds
    assert len(first["secagg"]["summed_nodes"]) == DEVICES - 1, _shown(federation, first)
    assert len(first["secagg"]["dropped_nodes"]) == 1, _shown(federation, first)
    survivors = {before.ids[d.name] for d in federation.device_list if d is not victim}
    assert {d for d, e in first["devices"].items() if e["verified"]} == survivors, \
        _shown(federation, first)
    # Charged before it masked, in both series; never answered, never refunded.
    rows = charges(victim, settings.run_name)
    assert rows and all(row[4] == 0 for row in rows), rows
    assert broken_charges(victim, settings.run_name)
    with ServerLedger.open(federation.server_dir, create=False) as ledger:
        assert not ledger.reports(device_id=victim_id, run_id=settings.run_name)
    assert not not_refunded(charged, block_epsilons(victim))
    wait_for("the restarted daemon's SuperNode", lambda: supernodes(victim), 60, every=0.2)
    time.sleep(1)
    assert len(supernodes(victim)) == 1
    check_invariants(federation, before)


def test_superlink_killed_during_secagg_masking(federation: LocalFederation) -> None:
    """SuperLink x collect-masked-vectors: the run fails, charges stay, restarted it serves.

    Killed once every device has charged the run (it masks, or its vector is
    on its way). ``keystay server start`` exits non-zero (systemd restarts
    it) and leaves no SuperExec or ServerApp; the SuperLink keeps no SecAgg+
    state beyond Flower's messages, and the daemons' stage keys expire in
    memory, so the restarted server has all three devices back and the next
    run (the drop test's) starts from nothing the dead one held. The record
    unit's SuperLink cell is tests/e2e/test_fault_matrix.py's.
    """
    federation.wait_online(DEVICES, timeout=240)  # the daemon cell's victim is back
    before = Snapshot.take(federation)
    settings, run = _all_charged(federation, "fault-secagg-superlink")
    link = next(p for p in federation.parts if p.name == "SuperLink")
    tree = descendants(link.process.pid)
    os.kill(one(tree, "flower-superlink"), signal.SIGKILL)
    link.process.wait(30)
    assert link.process.returncode != 0  # systemd sees the failure and restarts
    wait_for("the dead SuperLink's SuperExec and ServerApp to go",
             lambda: not set(tree) & set(proc_table()), 30, every=0.2)
    outcome = run.wait(240)
    assert not outcome.ok and not outcome.rounds
    _charged_and_unreported(federation, settings.run_name)
    federation.stop_server()  # forget the dead part
    federation.start_server()
    federation.wait_online(DEVICES, timeout=180)
    check_invariants(federation, before)


def test_round_completes_with_the_survivors_when_a_device_drops(
    federation: LocalFederation,
) -> None:
    from keystay.common.model import initial_weights

    federation.wait_online(DEVICES, timeout=240)  # the fault cells' victims are back
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
