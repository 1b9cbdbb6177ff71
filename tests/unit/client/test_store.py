"""EventStore: round trips, encryption at rest, tamper detection, retention, crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystay.client.store import (
    DB_NAME,
    KEY_NAME,
    BlockInfo,
    BlockNotFoundError,
    EventStore,
    KeyFileError,
    StoreCorruptError,
    StoreError,
    WrongKeyError,
    block_for,
)
from keystay.common.tokens import VOCAB_SIZE, TokenRecord, token_id

DAY = "2024-03-04"


def records(n: int, start: float = 0.0, token: int = 5) -> list[TokenRecord]:
    return [TokenRecord(start + i * 0.1, token + i % 7) for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore.open(tmp_path / "data")
    yield s
    s.close()


def sql(path: Path, statement: str, *params: object) -> None:
    """Alter the database behind the store's back (an attacker or a bad disk)."""
    conn = sqlite3.connect(path / DB_NAME)
    with conn:
        conn.execute(statement, params)
    conn.close()


# -- round trip ---------------------------------------------------------------------


def test_round_trip_keeps_order_app_and_text(store: EventStore) -> None:
    first = [TokenRecord(1.0, token_id("app:browser"), "firefox"),
             TokenRecord(1.5, token_id("key:letter"), None, "é"),
             TokenRecord(2.0, token_id("key:space"))]
    second = records(1000, start=3.0)
    store.append(DAY, first)
    store.append(DAY, second)
    store.append("2024-03-05", records(3))
    store.append(DAY, [])  # nothing written
    assert store.read_block(DAY) == first + second
    tokens = store.block_tokens(DAY)
    assert tokens.dtype == np.int64
    assert tokens.tolist() == [r.token for r in first + second]
    assert store.blocks() == [
        BlockInfo(DAY, 1003, 2, store.blocks()[0].bytes),
        BlockInfo("2024-03-05", 3, 1, store.blocks()[1].bytes),
    ]


def test_data_survives_reopen_and_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EventStore.open(data) as s:
        s.append(DAY, records(10))
    assert (data / DB_NAME).exists() and DB_NAME == "store.v1.sqlite"
    assert stat.S_IMODE((data / KEY_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((data / DB_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    with EventStore.open(data) as s:
        assert s.read_block(DAY) == records(10)
        assert s.size_bytes() > 0


def test_records_are_encrypted_at_rest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EventStore.open(data) as s:
        s.append(DAY, [TokenRecord(1.0, token_id("app:browser"), "unmistakable-app-name",
                                   "hunter2-secret")])
    raw = b"".join(p.read_bytes() for p in data.iterdir() if p.name.startswith("store.v1"))
    assert b"unmistakable-app-name" not in raw and b"hunter2-secret" not in raw


def test_invalid_block_ids_and_tokens_are_refused(store: EventStore) -> None:
    for bad in ("monday", "2024-13-01", "2024-02-30", "../2024-01-01"):
        with pytest.raises(ValueError, match="block id"):
            store.append(bad, records(1))
    with pytest.raises(ValueError, match=str(VOCAB_SIZE + 3)):
        store.append(DAY, [TokenRecord(0.0, VOCAB_SIZE + 3)])
    with pytest.raises(ValueError, match="-1"):
        store.append(DAY, [TokenRecord(0.0, -1)])
    assert store.blocks() == []


def test_unknown_block_and_closed_store(store: EventStore) -> None:
    with pytest.raises(BlockNotFoundError, match="2020-01-01"):
        store.read_block("2020-01-01")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.blocks()


def test_block_for_is_the_local_date() -> None:
    ts = time.mktime((2024, 3, 4, 23, 59, 0, 0, 0, -1))
    assert block_for(ts) == "2024-03-04"
    assert block_for(ts + 120) == "2024-03-05"


def test_store_modules_do_not_import_torch() -> None:
    code = ("import sys, keystay.client.store, keystay.sim.employees; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "False"


# -- keys ------------------------------------------------------------------------------


def test_wrong_key_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    EventStore.open(data).close()
    key = data / KEY_NAME
    key.write_bytes(os.urandom(32))
    with pytest.raises(WrongKeyError, match=str(key)):
        EventStore.open(data)


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    EventStore.open(data).close()
    key = data / KEY_NAME
    key.chmod(0o640)
    with pytest.raises(KeyFileError, match=r"0640.*chmod 600"):
        EventStore.open(data)
    key.chmod(0o600)
    EventStore.open(data).close()


def test_missing_key_with_existing_data_is_not_replaced(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with EventStore.open(data) as s:
        s.append(DAY, records(2))
    (data / KEY_NAME).unlink()
    with pytest.raises(KeyFileError, match="missing"):
        EventStore.open(data)
    assert not (data / KEY_NAME).exists()


def test_truncated_key_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    EventStore.open(data).close()
    (data / KEY_NAME).write_bytes(b"short")
    with pytest.raises(KeyFileError, match="5 bytes"):
        EventStore.open(data)


# -- tampering -----------------------------------------------------------------------------


def three_batches(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    with EventStore.open(data) as s:
        for i in range(3):
            s.append(DAY, records(50, start=i * 10.0))
        s.append("2024-03-05", records(50))
    return data


def test_flipped_ciphertext_byte_is_detected_and_nothing_returned(tmp_path: Path) -> None:
    data = three_batches(tmp_path)
    conn = sqlite3.connect(data / DB_NAME)
    (blob,) = conn.execute("SELECT ciphertext FROM batches WHERE block=? AND seq=1",
                           (DAY,)).fetchone()
    conn.close()
    flipped = bytearray(blob)
    flipped[len(flipped) // 2] ^= 0x01
    sql(data, "UPDATE batches SET ciphertext=? WHERE block=? AND seq=1", bytes(flipped), DAY)
    with EventStore.open(data) as s:
        with pytest.raises(StoreCorruptError, match=rf"block {DAY} batch 1"):
            s.read_block(DAY)
        with pytest.raises(StoreCorruptError):
            s.block_tokens(DAY)
        assert len(s.read_block("2024-03-05")) == 50  # other blocks stay readable


def test_batch_moved_to_another_block_is_detected(tmp_path: Path) -> None:
    data = three_batches(tmp_path)
    # Appended to the other block's sequence, so only the encryption can tell.
    sql(data, "UPDATE batches SET block='2024-03-05', seq=1 WHERE block=? AND seq=2", DAY)
    with EventStore.open(data) as s:
        with pytest.raises(StoreCorruptError, match="block 2024-03-05 batch 1 failed auth"):
            s.read_block("2024-03-05")
        with pytest.raises(StoreCorruptError):
            s.block_tokens("2024-03-05")
    sql(data, "UPDATE batches SET block='2024-03-06' WHERE block=? AND seq=0", DAY)
    with EventStore.open(data) as s:
        with pytest.raises(StoreCorruptError, match="block 2024-03-06 batch 0 failed auth"):
            s.read_block("2024-03-06")
        with pytest.raises(StoreCorruptError, match=f"block {DAY}: batch 0 is missing"):
            s.read_block(DAY)


def test_reordered_batches_are_detected(tmp_path: Path) -> None:
    data = three_batches(tmp_path)
    sql(data, "UPDATE batches SET seq=-1 WHERE block=? AND seq=0", DAY)
    sql(data, "UPDATE batches SET seq=0 WHERE block=? AND seq=1", DAY)
    sql(data, "UPDATE batches SET seq=1 WHERE block=? AND seq=-1", DAY)
    with EventStore.open(data) as s, pytest.raises(StoreCorruptError, match="batch 0"):
        s.read_block(DAY)


def test_deleted_middle_batch_is_detected(tmp_path: Path) -> None:
    data = three_batches(tmp_path)
    sql(data, "DELETE FROM batches WHERE block=? AND seq=1", DAY)
    with EventStore.open(data) as s, pytest.raises(StoreCorruptError, match="batch 1 is missing"):
        s.read_block(DAY)


def test_altered_event_count_is_detected(tmp_path: Path) -> None:
    data = three_batches(tmp_path)
    sql(data, "UPDATE batches SET n_events=49 WHERE block=? AND seq=0", DAY)
    with EventStore.open(data) as s, pytest.raises(StoreCorruptError, match="batch 0"):
        s.read_block(DAY)


# -- deletion, retention, destroy ------------------------------------------------------------


def test_delete_blocks_returns_what_existed(store: EventStore) -> None:
    for day in ("2024-03-01", "2024-03-02"):
        store.append(day, records(5))
    assert store.delete_blocks(["2024-03-02", "2024-03-09", "2024-03-02"]) == ["2024-03-02"]
    assert [b.block for b in store.blocks()] == ["2024-03-01"]
    with pytest.raises(BlockNotFoundError):
        store.read_block("2024-03-02")


def test_retention_deletes_whole_old_blocks(store: EventStore) -> None:
    for day in range(1, 11):
        for _ in range(2):
            store.append(f"2024-03-{day:02d}", records(4))
    deleted = store.apply_retention(7, today=date(2024, 3, 10))
    assert deleted == ["2024-03-01", "2024-03-02", "2024-03-03"]
    kept = store.blocks()
    assert [b.block for b in kept] == [f"2024-03-{d:02d}" for d in range(4, 11)]
    assert all(b.events == 8 and b.batches == 2 for b in kept)
    assert store.apply_retention(7, today=date(2024, 3, 10)) == []
    with pytest.raises(ValueError, match="at least 1 day"):
        store.apply_retention(0, today=date(2024, 3, 10))


def test_destroy_shreds_key_and_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    s = EventStore.open(data)
    s.append(DAY, records(100))
    s.destroy()
    assert not any(p.name.startswith(("store.v1", "store.key")) for p in data.iterdir())
    with pytest.raises(StoreError, match="closed"):
        s.read_block(DAY)
    with EventStore.open(data) as fresh:  # a new, empty store with a new key
        assert fresh.blocks() == []


# -- crash safety -------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from keystay.client.store import EventStore
    from keystay.common.tokens import TokenRecord
    store = EventStore.open(sys.argv[1])
    batch = [TokenRecord(i * 0.001, 1 + i % 50) for i in range(1000)]
    n = 0
    while True:
        store.append("2024-03-04", batch)
        n += 1
        print(n, flush=True)
""")


def test_kill_9_mid_write_leaves_a_store_that_opens(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        reported = 0
        for line in proc.stdout:
            reported = int(line)
            if reported >= 30:
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # lines printed before the kill landed
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert reported >= 30, proc.stderr.read() if proc.stderr else ""
    reported = max([reported, *(int(x) for x in rest.split())])
    assert proc.returncode == -signal.SIGKILL
    with EventStore.open(data) as s:
        events = len(s.read_block("2024-03-04"))  # authenticates every batch
        (check,) = s._connection().execute("PRAGMA integrity_check").fetchone()
    assert check == "ok"
    # Everything reported as written is there; at most the batch in flight
    # (committed, not yet printed) is extra, and nothing is half-written.
    assert events in (reported * 1000, (reported + 1) * 1000)


# -- properties ------------------------------------------------------------------------------------

record_strategy = st.builds(
    TokenRecord,
    t=st.floats(allow_nan=False),
    token=st.integers(0, VOCAB_SIZE - 1),
    app=st.none() | st.text(max_size=20),
    text=st.none() | st.text(max_size=5),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(record_strategy, min_size=1, max_size=30), min_size=1,
                        max_size=4))
def test_any_records_round_trip(tmp_path: Path, batches: list[list[TokenRecord]]) -> None:
    data = tmp_path / f"data-{time.monotonic_ns()}"
    with EventStore.open(data) as s:
        for batch in batches:
            s.append(DAY, batch)
        flat = [r for batch in batches for r in batch]
        assert s.read_block(DAY) == flat
        assert s.block_tokens(DAY).tolist() == [r.token for r in flat]
