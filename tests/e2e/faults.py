"""What the fault-matrix cells share: processes seen from /proc, ledgers read from outside.

The cells (tests/e2e/test_fault_matrix.py for record-level rounds,
tests/e2e/test_secagg.py for employee-day rounds through SecAgg+) kill a
process at a phase of a round and then check issue 13's invariants with
:func:`check_invariants`. Everything here observes from outside, as an
operator could: ``/proc`` for processes, a read-only SQLite connection for the
device ledger (the test reads what the daemon wrote, never writes), the
employee's control socket for the store, the server ledger for reports.

Both ε series of the employee-day unit are checked: the honest one
(``charges``) and the one against a server that breaks secure aggregation
(``broken_charges``); a record-level ledger has only the first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keystay.client.control_client import ControlClient
from keystay.server.deploy.local import LocalDevice, LocalFederation
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.rounds import RunOutcome, start_run
from keystay.server.settings import RunSettings

# ----------------------------------------------------------------- processes


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live, non-zombie process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if stat[0] != "Z":
            table[int(entry)] = (int(stat[1]), cmdline.decode(errors="replace"))
    return table


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below ``pid``."""
    table = proc_table()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmdline) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmdline
                frontier.append(child)
    return found


def mentioning(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose command line holds ``marker``."""
    return {pid: cmd for pid, (_, cmd) in proc_table().items() if marker in cmd}


def wait_for(what: str, predicate: Callable[[], object], timeout: float,
             every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def one(processes: dict[int, str], name: str) -> int:
    """The one pid among ``processes`` whose command line names ``name`` (reapers aside)."""
    matching = [pid for pid, cmd in processes.items() if name in cmd and "reaper" not in cmd]
    assert len(matching) == 1, f"expected one {name}: {processes}"
    return matching[0]


def kill_daemon(device: LocalDevice) -> None:
    """SIGKILL the device's daemon; supervision: nothing it started outlives it."""
    assert device.part is not None
    os.kill(device.part.process.pid, signal.SIGKILL)
    device.part.process.wait(10)
    wait_for("the dead daemon's children to go",
             lambda: not mentioning(str(device.data_dir)), 20, every=0.2)


def supernodes(device: LocalDevice) -> list[int]:
    """The live ``flower-supernode`` processes under the device's daemon."""
    assert device.part is not None
    return [pid for pid, cmd in descendants(device.part.process.pid).items()
            if "flower-supernode" in cmd and "reaper" not in cmd]


# ----------------------------------------------------------------- device state


def ledger(device: LocalDevice) -> sqlite3.Connection:
    """The device ledger, read-only."""
    uri = f"file:{device.data_dir / 'ledger.v1.sqlite'}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=10)


def charges(device: LocalDevice, run_id: str) -> list[tuple[int, str, int, float, int]]:
    """(charge id, block, server round, ε enforced after it, answered) for a run."""
    with contextlib.closing(ledger(device)) as conn:
        return conn.execute(
            "SELECT id, block, server_round, eps_enforced, answered FROM charges "
            "WHERE run_id = ? ORDER BY id, block", (run_id,)).fetchall()


def broken_charges(device: LocalDevice, run_id: str) -> dict[tuple[str, int], float]:
    """(block, server round) -> ε against a server breaking SecAgg, after that charge.

    Empty for a record-level ledger (no ``broken_charges`` table, or no row).
    """
    with contextlib.closing(ledger(device)) as conn:
        try:
            rows = conn.execute(
                "SELECT k.block, c.server_round, k.eps_enforced FROM broken_charges k "
                "JOIN charges c ON c.id = k.id AND c.block = k.block WHERE c.run_id = ?",
                (run_id,)).fetchall()
        except sqlite3.OperationalError:  # no such table: a record-level ledger
            return {}
    return {(block, rnd): float(eps) for block, rnd, eps in rows}


def block_epsilons(device: LocalDevice) -> dict[str, tuple[float, float | None]]:
    """Each block's (ε, ε against a broken SecAgg or None) after its newest charge.

    What the daemon enforces; the second series exists for employee-day
    charges only.
    """
    with contextlib.closing(ledger(device)) as conn:
        rows = conn.execute(
            "SELECT block, eps_enforced FROM charges c WHERE id = "
            "(SELECT MAX(id) FROM charges WHERE block = c.block)").fetchall()
        try:
            broken = dict(conn.execute(
                "SELECT block, eps_enforced FROM broken_charges k WHERE id = "
                "(SELECT MAX(id) FROM broken_charges WHERE block = k.block)").fetchall())
        except sqlite3.OperationalError:
            broken = {}
    return {block: (float(eps), None if broken.get(block) is None else float(broken[block]))
            for block, eps in rows}


def not_refunded(before: dict[str, tuple[float, float | None]],
                 after: dict[str, tuple[float, float | None]]) -> list[str]:
    """The blocks whose ε went down in either series between two readings (none, if right)."""
    lower = []
    for block, (eps, broken) in before.items():
        now, now_broken = after.get(block, (0.0, None))
        if now < eps or (broken is not None and (now_broken is None or now_broken < broken)):
            lower.append(block)
    return lower


def status(device: LocalDevice, timeout: float = 60.0) -> tuple[str, dict[str, int]]:
    """(device id, events per block) from the employee's control socket, once it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ControlClient(device.control_socket) as client:
                answer = client.status()
            return answer.device_id, {b.block: int(b.events) for b in answer.blocks}
        except Exception:  # a restarting daemon: refused, not yet bound
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@dataclass
class Snapshot:
    """What must survive a fault: per device, the stored events and each block's ε."""

    events: dict[str, dict[str, int]] = field(default_factory=dict)
    epsilons: dict[str, dict[str, tuple[float, float | None]]] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)  # device name -> device id

    @classmethod
    def take(cls, federation: LocalFederation) -> Snapshot:
        snap = cls()
        for device in federation.device_list:
            device_id, events = status(device)
            snap.ids[device.name] = device_id
            snap.events[device.name] = events
            snap.epsilons[device.name] = block_epsilons(device)
        return snap


def check_invariants(federation: LocalFederation, before: Snapshot, *,
                     require_reports: bool = True) -> None:
    """The four promises of issue 13, checked after a fault and its restart."""
    after = Snapshot.take(federation)
    for device in federation.device_list:
        # No store batch lost (these daemons record nothing new: --source none).
        assert after.events[device.name] == before.events[device.name], device.name
        # No ε refunded, in either series: every block's ε is what it was, or more.
        lower = not_refunded(before.epsilons[device.name], after.epsilons[device.name])
        assert not lower, (device.name, lower)
    # Device and server reconcile: every report the server holds is a charge
    # the device made, with the same ε per block, in both series.
    by_id = {after.ids[d.name]: d for d in federation.device_list}
    with ServerLedger.open(federation.server_dir, create=False) as server:
        reports = server.reports()
    assert reports or not require_reports, "the server holds no report at all"
    for report in reports:
        payload = report.payload()
        assert payload is not None and report.verified, report
        device = by_id[report.device_id]
        charged = {(block, rnd): eps for _, block, rnd, eps, _ in
                   charges(device, report.run_id)}
        broken = broken_charges(device, report.run_id)
        for block in payload["blocks"]:
            key = (block["block"], report.server_round)
            assert key in charged, f"report with no device charge: {report.run_id} {key}"
            assert charged[key] == pytest.approx(block["epsilon"], rel=1e-9), key
            if block.get("epsilon_broken") is not None:
                assert key in broken, f"report with no broken-series charge: {key}"
                assert broken[key] == pytest.approx(block["epsilon_broken"], rel=1e-9), key
    # Every checkpoint on disk loads: none is half-written.
    check_checkpoints(federation.server_dir)


def check_checkpoints(server_dir: Path) -> None:
    from keystay.common.model import read_checkpoint

    for path in server_dir.rglob("*.pt"):
        if not path.name.startswith("."):  # temp files a killed writer left
            read_checkpoint(path)


# ----------------------------------------------------------------- runs


class Background:
    """``start_run`` in a thread, so the test can kill something while it goes."""

    def __init__(self, federation: LocalFederation, settings: RunSettings) -> None:
        self.outcome: RunOutcome | None = None
        self._thread = threading.Thread(
            target=self._run, args=(federation.server_dir, settings), daemon=True)
        self._thread.start()

    def _run(self, server_dir: Path, settings: RunSettings) -> None:
        self.outcome = start_run(server_dir, settings)

    def wait(self, timeout: float = 300.0) -> RunOutcome:
        self._thread.join(timeout)
        assert self.outcome is not None, "the run did not end"
        return self.outcome


def when_charged(device: LocalDevice, run_id: str, answered: bool = False,
                 timeout: float = 180.0) -> None:
    """Wait for the device's first charge of ``run_id`` (answered, if asked)."""
    wait_for(f"{device.name} to charge run {run_id}",
             lambda: any(row[4] or not answered for row in charges(device, run_id)),
             timeout)
