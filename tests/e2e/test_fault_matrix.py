"""The fault matrix: SIGKILL a process at a phase of a round, restart it, check nothing is lost.

docs/faults.md holds the whole matrix (process x phase) with, per cell, the
test that covers it or why the cell cannot exist. This module runs the cells
that need a federation, on ONE federation (a SuperLink and two device
daemons) shared by every test: starting one costs more than a round.

Phases are observed from outside, with no test-only hook in the code:

- *after the ledger charge / mid-training*: a row of the device ledger's
  ``charges`` table for the run appears (the daemon charges before it trains,
  write-ahead), read through a read-only SQLite connection;
- *after the reply is sent*: that row's ``answered`` flag is set;
- *after a round*: the round's row lands in the run's ``rounds.jsonl``.

After each kill the test restarts what a supervisor would (the daemon
restarts its trainer and SuperNode; systemd restarts the daemon) and checks
the invariants of issue 13 with :func:`tests.e2e.faults.check_invariants`: the store lost no
batch, no block's ε went down, every report the server holds matches a
device charge, every checkpoint on disk loads, and nothing outlived its
parent. The tests run in file order: the ones that leave a device's node
unable to re-activate for a minute (its daemon killed) run last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keystay.common.exitcodes import ExitCode
from keystay.server.deploy.local import LocalFederation
from keystay.server.deploy.superlink import executable, flower_env
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.rounds import complete_rows, start_run
from keystay.server.settings import RECORD_NOISE_MULTIPLIER, RunSettings
from tests.e2e.faults import (
    Background,
    Snapshot,
    block_epsilons,
    charges,
    check_invariants,
    descendants,
    kill_daemon,
    mentioning,
    not_refunded,
    one,
    proc_table,
    wait_for,
    when_charged,
)
from tests.e2e.full_disk import fill, mount_tmpfs, unmount

pytestmark = pytest.mark.e2e


# ----------------------------------------------------------------- runs


@dataclass
class ServerDisk:
    """The server folder's own file system: a small tmpfs a cell can fill."""

    path: Path
    unavailable: str | None  # why no tmpfs could be mounted (then that cell skips)


@pytest.fixture(scope="module")
def server_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerDisk]:
    path = tmp_path_factory.mktemp("faults") / "fed" / "server"
    # Room for the SuperLink's state, the ledger, logs and a dozen runs'
    # checkpoints; the disk-full cell fills what is left.
    disk = ServerDisk(path, mount_tmpfs(path, "256m"))
    yield disk
    if disk.unavailable is None:
        unmount(path)


@pytest.fixture(scope="module")
def federation(server_disk: ServerDisk) -> Iterator[LocalFederation]:
    # The largest budget a policy may set: about ten rounds run here, and a
    # device whose days retire would refuse, which is another test's subject.
    fed = LocalFederation(server_disk.path.parent, devices=2,
                          simulate_days=2, events_per_day=2500,
                          policy_toml='[policy]\nprivacy_unit = "record"\n'
                                      "epsilon_per_block = 32.0\n")
    try:
        fed.start()
        fed.wait_online(2)
        yield fed
    finally:
        started = [part.process for part in fed.parts]
        fed.stop()
    assert started and all(process.poll() is not None for process in started)
    # No process of the federation outlived it (SuperNodes, SuperExecs, apps, trainers).
    wait_for("every process of the federation to end",
              lambda: not mentioning(str(fed.root)), 20, every=0.2)


#: The devices here train the record unit (their policy says so): plain rounds.
RECORD_UNIT = ("--privacy-unit", "record", "--noise-multiplier", str(RECORD_NOISE_MULTIPLIER))


def _settings(federation: LocalFederation, run_name: str, **overrides: object) -> RunSettings:
    values: dict[str, object] = dict(
        server_dir=federation.server_dir, run_name=run_name, num_server_rounds=2,
        min_devices=2, local_steps=40, sample_rate=0.05, round_timeout=120.0,
        privacy_unit="record", noise_multiplier=RECORD_NOISE_MULTIPLIER,
    )
    values.update(overrides)
    return RunSettings(**values)  # type: ignore[arg-type]


# ----------------------------------------------------------------- cells


def test_trainer_killed_mid_training(federation: LocalFederation) -> None:
    """Warm trainer x (after charge, mid-training): the round goes on; the daemon restarts it."""
    victim = federation.device_list[0]
    assert victim.part is not None
    before = Snapshot.take(federation)
    settings = _settings(federation, "fault-trainer")
    run = Background(federation, settings)
    when_charged(victim, settings.run_name)
    trainer = [pid for pid, cmd in descendants(victim.part.process.pid).items()
               if "spawn_main" in cmd]
    assert len(trainer) == 1, descendants(victim.part.process.pid)
    os.kill(trainer[0], signal.SIGKILL)
    outcome = run.wait()
    tail = outcome.log_file.read_text(errors="replace")[-3000:]
    assert outcome.returncode == 0 and len(outcome.rounds) == 2, tail
    first, second = outcome.rounds
    victim_id = before.ids[victim.name]
    assert victim_id not in first["devices"], first  # its round-1 update never came
    assert len(first["failed"]) == 1 and first["devices_reported"] == 1, first
    # The daemon started a new trainer, and the victim trained in round 2.
    assert second["devices_reported"] == 2 and victim_id in second["devices"], second
    assert victim.part.alive
    # The round-1 charge stays: unanswered, never refunded.
    rounds_charged = {row[2]: row[4] for row in charges(victim, settings.run_name)}
    assert rounds_charged == {1: 0, 2: 1}, rounds_charged
    check_invariants(federation, before)


def test_clientapp_killed_mid_training(federation: LocalFederation) -> None:
    """ClientApp x mid-training: the device is out for the rest of the run, back for the next.

    Flower's SuperNode starts one ClientApp per run and does not replace it:
    the run's later messages to that node go unanswered, and the server lists
    the device as unavailable (no reply within the round timeout).
    """
    victim = federation.device_list[0]
    assert victim.part is not None
    before = Snapshot.take(federation)
    # The round waits out its timeout for the victim: short, but long enough
    # for the other device on a loaded machine.
    settings = _settings(federation, "fault-clientapp", num_server_rounds=1,
                         round_timeout=45.0)
    run = Background(federation, settings)
    when_charged(victim, settings.run_name)
    apps = descendants(victim.part.process.pid)
    os.kill(one(apps, "flwr-clientapp"), signal.SIGKILL)
    outcome = run.wait()
    tail = outcome.log_file.read_text(errors="replace")[-3000:]
    assert outcome.returncode == 0 and len(outcome.rounds) == 1, tail
    (first,) = outcome.rounds
    victim_id = before.ids[victim.name]
    assert victim_id not in first["devices"] and first["devices_reported"] == 1, first
    assert len(first["unavailable"]) == 1, first
    assert "no reply" in first["unavailable"][0]["reason"]
    # The daemon charged first, so the round stays charged on the device.
    assert {row[2] for row in charges(victim, settings.run_name)} == {1}
    check_invariants(federation, before)
    # The next run gets a new ClientApp on the victim's node.
    again = start_run(federation.server_dir, _settings(federation, "fault-clientapp-next",
                                                       num_server_rounds=1))
    assert again.ok, again.log_file.read_text(errors="replace")[-3000:]
    assert victim_id in again.rounds[0]["devices"], again.rounds[0]


def test_round_start_killed_after_a_round(federation: LocalFederation) -> None:
    """``keystay round start`` x after round 1: the run goes on without its follower."""
    before = Snapshot.take(federation)
    name = "fault-round-start"
    run_dir = federation.server_dir / "runs" / name
    log = federation.root / "round-start.log"
    with log.open("wb") as out:
        cli = subprocess.Popen(
            [executable("keystay"), "round", "start", "--server-dir",
             str(federation.server_dir), "--name", name, "--rounds", "2",
             "--min-devices", "2", "--local-steps", "40", "--sample-rate", "0.05",
             *RECORD_UNIT],
            stdout=out, stderr=subprocess.STDOUT, env=flower_env(), start_new_session=True)
    try:
        rounds = run_dir / "rounds.jsonl"
        wait_for("round 1's row", lambda: rounds.exists() and complete_rows(
            rounds.read_text()), 240, every=0.2)
        os.killpg(cli.pid, signal.SIGKILL)  # the command and its `flwr run`
        cli.wait(10)
        # The ServerApp runs in the SuperLink: it finishes the run by itself.
        wait_for("the run's final model", (run_dir / "final.pt").exists, 240, every=0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)
    rows = complete_rows(rounds.read_text())
    assert [r["round"] for r in rows if r is not None] == [1, 2]
    assert not descendants(cli.pid)
    check_invariants(federation, before)


def test_serverapp_killed_after_replies(federation: LocalFederation) -> None:
    """ServerApp x after the replies are sent: the run fails; a new run starts over.

    Restarted, not resumed: the ServerApp keeps no round state outside its
    process, so the operator starts a new run (from the last checkpoint's
    weights if wanted); the killed run's charges stay on the devices.
    """
    before = Snapshot.take(federation)
    settings = _settings(federation, "fault-serverapp", num_server_rounds=1)
    run = Background(federation, settings)
    for device in federation.device_list:
        when_charged(device, settings.run_name, answered=True)
    link = next(p for p in federation.parts if p.name == "SuperLink")
    serverapp = one(descendants(link.process.pid), "flwr-serverapp")
    os.kill(serverapp, signal.SIGKILL)
    outcome = run.wait(240)
    assert outcome.returncode != 0 or not outcome.ok
    assert not (settings.run_dir / "final.pt").exists()
    # The charges stay; the devices' answers were paid for.
    for device in federation.device_list:
        assert charges(device, settings.run_name)
    check_invariants(federation, before)
    again = start_run(federation.server_dir, _settings(federation, "fault-serverapp-again",
                                                       num_server_rounds=1))
    assert again.ok, again.log_file.read_text(errors="replace")[-3000:]


def test_superlink_killed_mid_training(federation: LocalFederation) -> None:
    """SuperLink x after the charges: the run fails, nothing outlives it, restarted it serves.

    ``keystay server start`` is what systemd supervises: it exits when its
    SuperLink dies, and is started again on the same folder (same SQLite
    state, same enrolled devices). The SuperLink's SuperExec runs in a
    session of its own, so a process group kill would miss it: Flower hands
    it ``--parent-pid`` and it exits when the SuperLink is gone, and
    ``keystay server start`` stops what is left of the tree (the run's
    ServerApp) before it exits. That is checked here, by pid.
    """
    before = Snapshot.take(federation)
    settings = _settings(federation, "fault-superlink", num_server_rounds=1)
    run = Background(federation, settings)
    for device in federation.device_list:
        when_charged(device, settings.run_name)
    link = next(p for p in federation.parts if p.name == "SuperLink")
    superlink = one(descendants(link.process.pid), "flower-superlink")
    children = descendants(superlink)
    assert one(children, "flwr-serverapp") and one(children, "flower-superexec")
    os.kill(superlink, signal.SIGKILL)
    link.process.wait(30)
    assert link.process.returncode != 0  # systemd sees the failure and restarts
    wait_for("the dead SuperLink's SuperExec and ServerApp to go",
              lambda: not set(children) & set(proc_table()), 30, every=0.2)
    outcome = run.wait(240)
    assert not outcome.ok
    federation.stop_server()  # forget the dead part
    federation.start_server()
    federation.wait_online(2, timeout=180)
    # The devices' charges for the killed run stay.
    for device in federation.device_list:
        assert charges(device, settings.run_name)
    again = start_run(federation.server_dir, _settings(federation, "fault-superlink-again",
                                                       num_server_rounds=1))
    assert again.ok, again.log_file.read_text(errors="replace")[-3000:]
    # After the new run: then the server holds reports even when this cell
    # runs alone (-k), and they reconcile with the devices' charges.
    check_invariants(federation, before)


def test_server_stopped_mid_training(federation: LocalFederation) -> None:
    """``keystay server start`` stopped (SIGTERM, systemd's stop) mid-round: nothing outlives it.

    Flower starts the SuperLink's SuperExec, and the SuperExec each run's
    ServerApp, in sessions of their own, out of the SuperLink's process group:
    before, the stopped server's ServerApp lived on, re-parented to init. The
    command now stops its whole tree before it exits: checked the moment it
    has exited, by pid and command line, and by what names the server folder.
    Restarted, the server serves as after the SuperLink cell.
    """
    before = Snapshot.take(federation)
    settings = _settings(federation, "fault-server-stopped", num_server_rounds=1)
    run = Background(federation, settings)
    for device in federation.device_list:
        when_charged(device, settings.run_name)
    link = next(p for p in federation.parts if p.name == "SuperLink")
    tree = descendants(link.process.pid)
    superlink = one(tree, "flower-superlink")
    serverapp = one(tree, "flwr-serverapp")
    assert one(tree, "flower-superexec")
    assert os.getsid(serverapp) != os.getsid(superlink)  # what a group signal misses
    link.process.send_signal(signal.SIGTERM)
    assert link.process.wait(60) == 0, link.log.read_text(errors="replace")[-2000:]
    live = proc_table()
    outlived = {pid: cmd for pid, cmd in tree.items() if live.get(pid, (0, ""))[1] == cmd}
    assert not outlived, f"outlived keystay server start: {outlived}"
    flower = {pid: cmd for pid, cmd in mentioning(str(federation.server_dir)).items()
              if "flwr-serverapp" in cmd or "flower-superexec" in cmd}
    assert not flower, f"Flower processes of the server folder left: {flower}"
    outcome = run.wait(240)
    assert not outcome.ok
    federation.stop_server()  # forget the stopped part
    federation.start_server()
    federation.wait_online(2, timeout=180)
    # The devices' charges for the interrupted run stay; the ledgers reconcile.
    for device in federation.device_list:
        assert charges(device, settings.run_name)
    check_invariants(federation, before, require_reports=False)


def test_superlink_state_damaged_behind_its_back(federation: LocalFederation) -> None:
    """The SuperLink's state file damaged while it is down: refused, then discarded.

    ``keystay server start`` refuses a garbage ``superlink.db`` before the
    SuperLink runs on it (exit 26, one sentence naming the file, no
    traceback) and nothing is charged on any device. The refusal says the
    file can be moved aside; done so, the SuperLink starts on a new file,
    ``keystay server start`` registers both enrolled devices' keys again, the
    devices come back online (as new nodes) and a run completes; the ledgers
    still reconcile, since reports name devices, not nodes.
    """
    before = Snapshot.take(federation)
    federation.stop_server()
    db = federation.server_dir / "superlink.db"
    # The whole state: a WAL left beside the file would hold every page of a
    # young database, and SQLite would read those (rightly: it is intact).
    for wal in federation.server_dir.glob("superlink.db-*"):
        wal.unlink()
    db.write_bytes(b"\x00not a SuperLink state\xff" * 4096)
    refused = subprocess.run(
        [executable("keystay"), "server", "start", "--dir", str(federation.server_dir)],
        capture_output=True, text=True, env=flower_env(), timeout=120, check=False)
    assert refused.returncode == ExitCode.SERVER_SUPERLINK_STATE, refused.stderr
    assert f"{db} is damaged" in refused.stderr and "Move it aside" in refused.stderr
    assert "Traceback" not in refused.stderr and "ready" not in refused.stdout
    for device in federation.device_list:  # nothing charged for it
        assert block_epsilons(device) == before.epsilons[device.name], device.name
    # What the refusal says to do: move it (and its -wal, -shm) aside, start again.
    for path in federation.server_dir.glob("superlink.db*"):
        path.rename(path.with_name(path.name + ".damaged"))
    link = federation.start_server()
    assert "registered the SuperNode keys of 2 enrolled device(s) again" in \
        link.log.read_text(errors="replace")
    federation.wait_online(2, timeout=240)
    again = start_run(federation.server_dir, _settings(federation, "fault-superlink-state",
                                                       num_server_rounds=1))
    assert again.ok, again.log_file.read_text(errors="replace")[-3000:]
    assert again.rounds[0]["devices_reported"] == 2, again.rounds[0]
    # The reports of this run and of every run before the discard reconcile.
    check_invariants(federation, before)


def test_laptop_asleep_mid_round(federation: LocalFederation) -> None:
    """A laptop sleeps mid-round: the round goes on without it; awake, its ledger is right.

    Sleep is SIGSTOP to the daemon and everything under it (trainer,
    SuperNode, SuperExec, ClientApp), parents first, once it has charged;
    SIGCONT after the round. Its charge stays (never refunded), the server
    holds no report from it for that round, and the next run has it back.
    """
    victim = federation.device_list[0]
    assert victim.part is not None
    before = Snapshot.take(federation)
    settings = _settings(federation, "fault-sleep", num_server_rounds=1, round_timeout=30.0)
    run = Background(federation, settings)
    when_charged(victim, settings.run_name)
    os.kill(victim.part.process.pid, signal.SIGSTOP)
    asleep = [victim.part.process.pid]
    try:
        for pid in descendants(victim.part.process.pid):  # parents before children
            os.kill(pid, signal.SIGSTOP)
            asleep.append(pid)
        charged = block_epsilons(victim)
        outcome = run.wait()
    finally:
        for pid in asleep:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    tail = outcome.log_file.read_text(errors="replace")[-3000:]
    assert outcome.returncode == 0 and len(outcome.rounds) == 1, tail
    (first,) = outcome.rounds
    victim_id = before.ids[victim.name]
    assert victim_id not in first["devices"] and first["devices_reported"] == 1, first
    assert len(first["unavailable"]) == 1 and "no reply" in first["unavailable"][0]["reason"]
    # Awake: the charge made before sleeping stays, whatever the daemon does next.
    assert {row[2] for row in charges(victim, settings.run_name)} == {1}
    assert not not_refunded(charged, block_epsilons(victim))
    with ServerLedger.open(federation.server_dir, create=False) as ledger:
        assert not ledger.reports(device_id=victim_id, run_id=settings.run_name)
    federation.wait_online(2, timeout=180)
    check_invariants(federation, before)
    again = start_run(federation.server_dir, _settings(federation, "fault-sleep-next",
                                                       num_server_rounds=1))
    assert again.ok, again.log_file.read_text(errors="replace")[-3000:]
    assert victim_id in again.rounds[0]["devices"], again.rounds[0]


def test_daemon_killed_mid_training(federation: LocalFederation) -> None:
    """Daemon x mid-training: its SuperNode and trainer die with it; restarted, it lost nothing."""
    victim = federation.device_list[1]
    assert victim.part is not None
    before = Snapshot.take(federation)
    settings = _settings(federation, "fault-daemon", num_server_rounds=1)
    run = Background(federation, settings)
    when_charged(victim, settings.run_name)
    charged = block_epsilons(victim)
    kill_daemon(victim)
    outcome = run.wait()
    tail = outcome.log_file.read_text(errors="replace")[-3000:]
    assert outcome.returncode == 0 and len(outcome.rounds) == 1, tail
    assert before.ids[victim.name] not in outcome.rounds[0]["devices"]
    federation.restart_device(victim)
    # The restarted daemon enforces what was charged before the kill.
    assert not not_refunded(charged, block_epsilons(victim))
    supernodes = lambda: [c for c in descendants(victim.part.process.pid).values()  # noqa: E731
                          if "flower-supernode" in c and "reaper" not in c]
    wait_for("the restarted daemon's SuperNode", supernodes, 60, every=0.2)
    time.sleep(1)
    assert len(supernodes()) == 1
    check_invariants(federation, before)


_WRITER = """
import sys
from keystay.common.model import ModelConfig, initial_weights, save_checkpoint
config = ModelConfig()
weights = initial_weights(config, 0)
i = 0
print("ready", flush=True)
while True:
    i += 1
    save_checkpoint(sys.argv[1], [w + i for w in weights], config, {"i": i})
"""


def test_checkpoint_write_killed_midway(tmp_path: Path) -> None:
    """ServerApp x checkpoint write: a writer SIGKILLed mid-write leaves the last whole file.

    The ServerApp (plain and SecAgg+) writes every checkpoint with
    ``save_checkpoint``; here a process does nothing else, and is killed the
    moment its temporary file exists, i.e. while ``torch.save`` writes it.
    """
    from keystay.common.model import read_checkpoint

    path = tmp_path / "checkpoints" / "round-001.pt"
    for attempt in range(2):  # each attempt imports torch: seconds
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE,
            env=flower_env())
        try:
            assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
            wait_for("a checkpoint being written",
                      lambda: any(path.parent.glob(".round-001.pt.*")) and path.exists(),
                      60, every=0.001)
            writer.kill()
            writer.wait(10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                writer.kill()
        # The name holds a whole checkpoint, never the half being written.
        meta = read_checkpoint(path).meta
        assert meta["i"] >= 1, (attempt, meta)


def test_server_disk_full_mid_round(federation: LocalFederation, server_disk: ServerDisk) -> None:
    """The server's disk fills mid-round: the run stops cleanly; with space back, runs go on.

    The whole server folder (SuperLink state, ledger, logs, runs) is on a
    tmpfs, filled while the devices train. The SuperLink cannot store their
    replies, the round times out, the ServerApp cannot append its row and
    the run fails; ``keystay round start`` says the disk is full (exit 25),
    with the run's last log lines, since its log file could not hold them.
    Nothing is half-written and the devices' charges stay. The SuperLink's
    SuperExec dies on the full disk: ``keystay server start`` then stops the
    SuperLink and exits 21, and is restarted as systemd would; the devices
    come back online and the next run completes.
    """
    if server_disk.unavailable is not None:
        pytest.skip(server_disk.unavailable)
    before = Snapshot.take(federation)
    name = "fault-disk-full"
    link = next(p for p in federation.parts if p.name == "SuperLink")
    cli = subprocess.Popen(
        [executable("keystay"), "round", "start", "--server-dir", str(federation.server_dir),
         "--name", name, "--rounds", "2", "--min-devices", "2", "--local-steps", "40",
         "--sample-rate", "0.05", "--run-config", "round-timeout=30", *RECORD_UNIT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=flower_env(),
        start_new_session=True)
    try:
        for device in federation.device_list:
            when_charged(device, name)
        filler = fill(federation.server_dir)
        try:
            _, err = cli.communicate(timeout=300)
            # The run's ServerApp is gone too: nothing keeps writing.
            wait_for("the run's ServerApp to end", lambda: not [
                c for c in descendants(link.process.pid).values() if "flwr-serverapp" in c],
                60, every=0.5)
        finally:
            filler.unlink()  # space returns
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)
    message = err.decode(errors="replace")
    assert cli.returncode == ExitCode.SERVER_DISK_FULL, message
    assert "the server's disk is full" in message and "Traceback" not in message, message
    # Nothing half-written: no temporary file, no torn row, no partial report.
    assert not [p for p in federation.server_dir.rglob(".*.tmp")]
    rounds = federation.server_dir / "runs" / name / "rounds.jsonl"
    assert None not in complete_rows(rounds.read_text() if rounds.exists() else "")
    with ServerLedger.open(federation.server_dir, create=False) as ledger:
        assert ledger.audit() == []
    for device in federation.device_list:
        assert charges(device, name)  # charged before the disk filled: kept
    # The SuperLink's SuperExec may die on the full disk; `keystay server
    # start` then stops the SuperLink and exits 21, and systemd restarts it.
    with contextlib.suppress(subprocess.TimeoutExpired):
        link.process.wait(5)
    if not link.alive:
        assert link.process.returncode == ExitCode.SERVER_SUPERLINK_DOWN
        assert "SuperExec exited" in link.log.read_text(errors="replace")
        federation.stop_server()
        federation.start_server()  # "ready", on the same folder
    check_invariants(federation, before, require_reports=False)
    # With space back and the SuperLink restarted, the devices are online
    # again and a run completes. Their SuperNodes' heartbeats met the full
    # disk: stock Flower's heartbeat thread died on that error and left the
    # nodes offline for good (keystay.client.daemon.supernode_launch).
    started = time.monotonic()
    federation.wait_online(2, timeout=150)
    print(f"devices online {time.monotonic() - started:.0f} s after the SuperLink restart")
    again = start_run(federation.server_dir, _settings(federation, "fault-disk-full-after",
                                                       num_server_rounds=1))
    assert again.ok, again.log_file.read_text(errors="replace")[-3000:]
    assert again.rounds[0]["devices_reported"] == 2, again.rounds[0]
