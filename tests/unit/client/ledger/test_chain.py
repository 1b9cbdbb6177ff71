"""The device ledger's integrity chain: every edit behind the daemon's back is refused.

Each edit is made as someone with the ``sqlite3`` command line would make it,
on a closed ledger; the next :meth:`Ledger.open` must refuse with a
:class:`DeviceLedgerError` naming the first bad row and what to do, and change
nothing on disk (nothing is adopted, repaired or charged). Untouched ledgers
must keep opening, and ledgers from before the chain are adopted once.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from keystay.client.ledger import accounting
from keystay.client.ledger.accounting import Mechanism
from keystay.client.ledger.chain import KEY_FILE, PENDING_KEY_FILE
from keystay.client.ledger.ledger import LEDGER_FILE, DeviceLedgerError, Ledger
from keystay.client.policy import DevicePolicy
from keystay.common.exitcodes import ExitCode
from tests.unit.client.ledger.test_ledger import (
    DAY1,
    DAY2,
    DAY3,
    _charge_real,
    admit,
    admit_day,
    dump,
)

DAY4 = "2025-03-06"
#: What every refusal must tell the person reading it.
ADVICE = ("restore the ledger and its key file", "never delete the ledger",
          "nothing is charged")


def build(folder: Path) -> Path:
    """Record-level rounds on DAY1/DAY2, an employee-day day spent (retired) on DAY3."""
    with Ledger.open(folder) as ledger:
        first = admit(ledger, [DAY1, DAY2], q=0.01)
        ledger.mark_answered(first)
        admit(ledger, [DAY1], q=0.02, run_id="run-b", server_round=2, now=2_000.0)
        admit_day(ledger, [DAY3], server_round=3)
        last = admit_day(ledger, [DAY3], server_round=4)
        assert last.blocks[0].retired
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("ledger"))


@pytest.fixture
def data(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the built ledger folder (its WAL folded in)."""
    copy = tmp_path / "data"
    shutil.copytree(built, copy)
    return copy


def sql(folder: Path, *statements: str) -> None:
    """Edit the closed ledger as the sqlite3 command line would."""
    conn = sqlite3.connect(folder / LEDGER_FILE)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def snapshot(folder: Path) -> dict[str, object]:
    """Every table's rows, and every file's bytes but SQLite's own WAL and shm."""
    files = {f.name: f.read_bytes() for f in sorted(folder.iterdir())
             if f.is_file() and not f.name.endswith(("-wal", "-shm"))}
    files.pop(LEDGER_FILE, None)  # compared through its rows: a refused open may checkpoint
    tables: dict[str, object] = {}
    if (folder / LEDGER_FILE).exists() and (folder / LEDGER_FILE).stat().st_size:
        tables = dict(dump(folder / LEDGER_FILE))
    return {"files": files, "tables": tables}


def refused(folder: Path, *words: str) -> str:
    """Open must refuse, saying ``words`` and the advice, and leave the folder as it was."""
    before = snapshot(folder)
    with pytest.raises(DeviceLedgerError) as info:
        Ledger.open(folder)
    message = str(info.value)
    for word in (*words, *ADVICE):
        assert word in message, f"{word!r} not in: {message}"
    assert info.value.exit_code == ExitCode.DEVICE_LEDGER
    assert snapshot(folder) == before, "a refused open changed the ledger"
    # Refused again on the next start: nothing was adopted or repaired in between.
    with pytest.raises(DeviceLedgerError):
        Ledger.open(folder)
    return message


# --- an untouched ledger --------------------------------------------------------------


def test_an_untouched_ledger_of_many_charges_opens_and_keeps_charging(tmp_path: Path) -> None:
    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=32.0)
    days = [f"2025-01-{d:02d}" for d in range(1, 29)]
    with Ledger.open(tmp_path) as ledger:
        for n in range(120):
            if n % 2:
                charge = admit(ledger, days[n % 13: n % 13 + 2], q=0.001, policy=policy,
                               now=1_000.0 + n, server_round=n + 1)
            else:
                charge = admit_day(ledger, [days[14 + n % 14]], q=0.05, server_round=n + 1)
            if n % 3:
                ledger.mark_answered(charge)  # answered is not chained: a flag, no ε
        ledger.forget_block_data(days[0], now=9_000.0)
        totals = ledger.totals()
        charged = len(ledger.history(days[13]))
    for _ in range(2):
        with Ledger.open(tmp_path) as ledger:
            assert ledger.totals() == totals
    with Ledger.open(tmp_path) as ledger:  # and it keeps charging, chained on
        admit(ledger, [days[13]], q=0.001, policy=policy, now=50_000.0, server_round=999)
    with Ledger.open(tmp_path) as ledger:
        assert len(ledger.history(days[13])) == charged + 1


def test_the_key_is_private_and_the_chain_covers_every_charge_row(data: Path) -> None:
    key = data / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    assert not (data / PENDING_KEY_FILE).exists()
    tables = dump(data / LEDGER_FILE)
    covered = sum(len(tables[t]) for t in
                  ("charges", "broken_charges", "charge_units", "participation"))
    assert len(tables["chain"]) == covered == 5 + 2 + 2 + 4
    assert len(tables["block_tags"]) == len(tables["blocks"]) == 3


# --- every edit is refused ------------------------------------------------------------

EDITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (statements, words the refusal must say)
    "delete a charge row": (
        (f"DELETE FROM charges WHERE id = 1 AND block = '{DAY2}'",),
        (f"charges row (id 1, block '{DAY2}') is missing",),
    ),
    "lower an ε": (
        ("UPDATE charges SET eps_enforced = eps_enforced / 2, eps_prv_upper = eps_prv_upper / 2 "
         "WHERE id = 2",),
        (f"charges row (id 2, block '{DAY1}') does not match its tag",),
    ),
    "lower a broken-aggregation ε": (
        ("UPDATE broken_charges SET eps_enforced = 0.01 WHERE id = 4",),
        (f"broken_charges row (id 4, block '{DAY3}') does not match its tag",),
    ),
    "un-retire a day": (
        (f"UPDATE blocks SET retired = 0, retired_at = NULL WHERE block = '{DAY3}'",),
        (f"blocks row (block '{DAY3}') does not match its tag", "un-retired"),
    ),
    "delete a spent day's blocks row": (
        (f"DELETE FROM blocks WHERE block = '{DAY3}'",),
        (f"blocks row (block '{DAY3}') was deleted",),
    ),
    "raise a day's budget": (
        (f"UPDATE blocks SET budget = 30 WHERE block = '{DAY1}'",),
        (f"blocks row (block '{DAY1}') does not match its tag",),
    ),
    "change a mechanism": (
        ("UPDATE charges SET noise_multiplier = 4.0 WHERE id = 1",),
        (f"charges row (id 1, block '{DAY1}') does not match its tag",),
    ),
    "raise t of an employee-day charge": (
        ("UPDATE charge_units SET min_summed_devices = 100 WHERE id = 3",),
        ("charge_units row (id 3) does not match its tag",),
    ),
    "shorten the participation gap": (
        ("UPDATE participation SET created = 0 WHERE charge_id = 4",),
        ("participation row (charge_id 4) does not match its tag",),
    ),
    "a number stored as a blob": (
        ("UPDATE charges SET steps = CAST(steps AS BLOB) WHERE id = 1",),
        (f"charges row (id 1, block '{DAY1}') does not match its tag",),
    ),
    "reorder ids": (
        ("UPDATE charges SET id = -id WHERE id IN (1, 2)",
         "UPDATE charges SET id = 3 + id WHERE id < 0"),
        (f"charges row (id 1, block '{DAY1}') does not match its tag",),
    ),
    "add a charge row": (
        (f"INSERT INTO charges SELECT 9, '{DAY4}', created, run_id, server_round, "
         "noise_multiplier, sample_rate, steps, delta, 0, 0, 0, 0, accountant, answered "
         "FROM charges WHERE id = 1 AND block = '" + DAY1 + "'",),
        (f"charges row (id 9, block '{DAY4}') has no tag",),
    ),
    "delete a middle charge with its tags": (
        ("DELETE FROM charges WHERE id = 2", "DELETE FROM participation WHERE charge_id = 2",
         "DELETE FROM chain WHERE seq IN (4, 5)"),  # charge 2's two rows
        ("chain entry 4 is missing",),
    ),
    "delete the last charge with its tags": (
        ("DELETE FROM chain WHERE seq > (SELECT max(seq) FROM chain) - 4",
         "DELETE FROM charges WHERE id = 4", "DELETE FROM broken_charges WHERE id = 4",
         "DELETE FROM charge_units WHERE id = 4", "DELETE FROM participation WHERE charge_id = 4"),
        ("the chain ends at entry 9 but its head does not match it",),
    ),
    "remove the chain, keep the key": (
        ("DELETE FROM chain", "DELETE FROM chain_head", "DELETE FROM block_tags"),
        ("no integrity chain, while its key exists",),
    ),
    "edit a tag": (
        ("UPDATE chain SET tag = zeroblob(32) WHERE seq = 3",),
        ("participation row (charge_id 1) does not match its tag",),
    ),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_behind_the_daemons_back_is_refused_and_nothing_changes(
    data: Path, edit: str
) -> None:
    statements, words = EDITS[edit]
    sql(data, *statements)
    refused(data, f"{data / LEDGER_FILE} fails its integrity check", *words)


def test_the_last_charge_of_a_day_charged_once_removed_with_its_tags(data: Path) -> None:
    """The hardest rollback: no older blocks row to keep consistent; the head catches it."""
    with Ledger.open(data) as ledger:
        admit(ledger, [DAY4], q=0.01, server_round=9, now=5_000.0)
    sql(data, "DELETE FROM chain WHERE seq > (SELECT max(seq) FROM chain) - 2",
        "DELETE FROM charges WHERE id = 5", "DELETE FROM participation WHERE charge_id = 5",
        f"DELETE FROM blocks WHERE block = '{DAY4}'",
        f"DELETE FROM block_tags WHERE block = '{DAY4}'",
        "UPDATE chain_head SET seq = seq - 2")
    refused(data, "head does not match")


def test_a_deleted_key_file_is_refused_never_remade(data: Path) -> None:
    (data / KEY_FILE).unlink()
    refused(data, f"key {data / KEY_FILE} is missing")
    assert not (data / KEY_FILE).exists()


def test_a_key_others_can_read_is_refused(data: Path) -> None:
    os.chmod(data / KEY_FILE, 0o644)
    refused(data, "mode 0644", "chmod 600")


def test_another_key_is_refused(data: Path) -> None:
    (data / KEY_FILE).write_bytes(os.urandom(32))
    refused(data, f"charges row (id 1, block '{DAY1}') does not match its tag")


@pytest.mark.parametrize("keep", [0, 1, None])
def test_a_ledger_emptied_cut_or_deleted_beside_its_key_is_not_started_afresh(
    data: Path, keep: int | None
) -> None:
    """SQLite takes an empty file, or one byte of one, for a new database: never here."""
    path = data / LEDGER_FILE
    if keep is None:
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:keep])
    message = refused(data, "but its key", "deleted or truncated")
    assert ("missing" if keep is None else "empty or cut short") in message
    assert path.exists() == (keep is not None)  # no fresh ledger was created


def test_a_truncated_ledger_is_refused(data: Path) -> None:
    path = data / LEDGER_FILE
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DeviceLedgerError, match="never delete"):
        Ledger.open(data)


def test_an_edited_accountant_state_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    """The state is a cache: a forged one (a smaller ε) is recomputed from the chained history."""
    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=16.0)
    m = Mechanism(1.0, 0.004, 100)
    with Ledger.open(tmp_path) as ledger:
        for n in range(1, 4):
            _charge_real(ledger, [DAY1], m, n, policy)
    # Swap in the state of one round for that of three, keeping its version and counts.
    forged = accounting.state_to_bytes(accounting.state_of([m]))
    sql(tmp_path, f"UPDATE accountant_state SET state = x'{forged.hex()}'")
    with Ledger.open(tmp_path) as ledger:  # a cache, not a charge: the ledger opens
        charge = _charge_real(ledger, [DAY1], m, 4, policy)
    expected = accounting.epsilons([m] * 4, delta=policy.delta)
    assert charge.blocks[0].epsilon_rdp == pytest.approx(expected.rdp, rel=1e-9)


def test_a_refusal_stops_the_daemon_with_its_exit_code_and_no_traceback(data: Path) -> None:
    sql(data, f"UPDATE blocks SET retired = 0 WHERE block = '{DAY3}'")
    result = subprocess.run(
        [sys.executable, "-c", "from keystay.cli.main import run; run()", "device", "run",
         "--data", str(data), "--source", "none"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "KEYSTAY_DEBUG": ""},
    )
    assert result.returncode == ExitCode.DEVICE_LEDGER, result.stderr
    assert "Traceback" not in result.stderr
    assert f"blocks row (block '{DAY3}') does not match its tag" in result.stderr
    assert "never delete the ledger" in result.stderr


# --- adoption: ledgers written before the chain ------------------------------------------


def unchain(folder: Path) -> None:
    """Make ``folder``'s ledger look as keystay before the chain wrote it."""
    sql(folder, *(f"DROP TABLE {t}" for t in ("chain", "chain_head", "block_tags", "state_tags")))
    (folder / KEY_FILE).unlink()


def test_a_ledger_from_before_the_chain_is_adopted_once_and_logged(
    data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unchain(data)
    before = dump(data / LEDGER_FILE)
    with caplog.at_level(logging.WARNING, logger="keystay.client.ledger.chain"), \
            Ledger.open(data) as ledger:
        totals = ledger.totals()
    (record,) = [r for r in caplog.records if "adopted" in r.getMessage()]
    assert "13 rows tagged as found" in record.getMessage()
    assert "cannot be detected" in record.getMessage()
    after = dump(data / LEDGER_FILE)
    assert {t: after[t] for t in before} == before, "adoption changed a ledger row"
    assert stat.S_IMODE((data / KEY_FILE).stat().st_mode) == 0o600
    assert not (data / PENDING_KEY_FILE).exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING), Ledger.open(data) as ledger:  # once only
        assert ledger.totals() == totals
    assert not [r for r in caplog.records if "adopted" in r.getMessage()]
    sql(data, "UPDATE charges SET eps_enforced = 0 WHERE id = 1")  # and now guarded
    refused(data, "does not match its tag")


def test_a_crash_before_the_adoption_committed_adopts_with_the_waiting_key(data: Path) -> None:
    unchain(data)
    key = os.urandom(32)
    pending = data / PENDING_KEY_FILE
    pending.write_bytes(key)
    os.chmod(pending, 0o600)
    Ledger.open(data).close()
    assert (data / KEY_FILE).read_bytes() == key and not pending.exists()


def test_a_crash_after_the_adoption_committed_finds_its_key(data: Path) -> None:
    # The chain is committed, the key still under its pending name.
    os.rename(data / KEY_FILE, data / PENDING_KEY_FILE)
    with Ledger.open(data) as ledger:
        assert ledger.retired_blocks() == {DAY3}
    assert (data / KEY_FILE).exists() and not (data / PENDING_KEY_FILE).exists()


def test_two_daemons_adopting_at_once_share_one_key(data: Path) -> None:
    unchain(data)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(block: str, round_: int) -> None:
        try:
            barrier.wait()
            with Ledger.open(data) as ledger:
                admit(ledger, [block], q=0.001, server_round=round_, now=9_000.0 + round_)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=a) for a in ((DAY4, 10), (DAY2, 11))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with Ledger.open(data) as ledger:
        assert len(ledger.history(DAY4)) == 1 and len(ledger.history(DAY2)) == 2
