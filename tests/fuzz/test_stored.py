"""Fuzzed files at rest: the event store and the device ledger, damaged behind the daemon's back.

Store: bits flipped in any column of any batch row (ciphertext, nonce, block,
seq, event count), and the database file truncated or bit-flipped. Ledger:
the database file truncated or bit-flipped, and one byte of one value of one
row changed as the ``sqlite3`` command line would (an ε lowered, a day
un-retired: a refund). The contract: opening and reading either gives back
exactly what was written, or raises the module's own error (``StoreError`` /
``DeviceLedgerError``) with a sentence; a damaged block is never half-read (no
partial or altered tokens returned), a ledger row changed behind the daemon's
back is always refused (its integrity chain), and no raw ``sqlite3`` error or
other exception escapes.
"""
from __future__ import annotations

import shutil
import sqlite3
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from keystay.client.ledger.chain import TABLES
from keystay.client.ledger.ledger import LEDGER_FILE, DeviceLedgerError, Ledger
from keystay.client.store import DB_NAME, EventStore, StoreError
from keystay.common.tokens import TokenRecord

from .fuzzing import examples, flip_bits

BLOCKS = ("2026-01-01", "2026-01-02")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of two blocks, three batches each, WAL folded into the main file."""
    data = tmp_path_factory.mktemp("store")
    store = EventStore.open(data)
    rng = np.random.default_rng(1)
    for block in BLOCKS:
        for _ in range(3):
            store.append(block, [TokenRecord(t=float(i), token=int(rng.integers(1, 200)))
                                 for i in range(40)])
    store.close()
    conn = sqlite3.connect(data / DB_NAME)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return data


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        if f.name.endswith(("-wal", "-shm")):
            f.unlink()
    return dst


def _read_all(data: Path) -> dict[str, list[int]] | None:
    """Every block's tokens, or None when the store refuses (with its own error)."""
    try:
        store = EventStore.open(data)
    except StoreError as error:
        assert str(error)
        return None
    try:
        out = {}
        for info in store.blocks():
            try:
                out[info.block] = store.block_tokens(info.block).tolist()
            except StoreError as error:
                assert str(error)
        return out
    except StoreError as error:
        assert str(error)
        return None
    finally:
        store.close()


@pytest.fixture(scope="module")
def original(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    tokens = _read_all(_copy(store_dir, tmp_path_factory.mktemp("orig") / "d"))
    assert tokens is not None and set(tokens) == set(BLOCKS)
    return tokens


COLUMNS = ("ciphertext", "nonce", "block", "seq", "n_events")


@examples(200)
@given(row=st.integers(min_value=1, max_value=6), column=st.sampled_from(COLUMNS),
       positions=st.lists(st.integers(min_value=0), min_size=1, max_size=3))
def test_store_row_with_flipped_bits(tmp_path: Path, store_dir: Path,
                                     original: dict[str, list[int]], row: int, column: str,
                                     positions: list[int]) -> None:
    data = _copy(store_dir, tmp_path / "d")
    conn = sqlite3.connect(data / DB_NAME)
    (value,) = conn.execute(f"SELECT {column} FROM batches WHERE id = ?", (row,)).fetchone()
    if isinstance(value, bytes):
        changed: Any = flip_bits(value, positions)
    elif isinstance(value, int):
        changed = value ^ (1 << (positions[0] % 16))
    else:
        changed = flip_bits(value.encode(), positions).decode("latin-1")
    assume(changed != value)
    try:
        conn.execute(f"UPDATE batches SET {column} = ? WHERE id = ?", (changed, row))
        conn.commit()
    except sqlite3.IntegrityError:  # e.g. a seq that collides: SQLite refused the edit
        return
    finally:
        conn.close()
    tokens = _read_all(data)
    assert tokens is not None
    for block, got in tokens.items():
        # Any block read back is exactly what was written, never altered. One
        # known limit (store module doc): a block's *last* batch relabelled to
        # another block leaves the first batches, which still authenticate.
        if column == "block" and got != original.get(block):
            whole = original.get(block, [])
            assert got == whole[: len(got)] and len(got) % 40 == 0, f"block {block} altered"
            continue
        assert got == original.get(block), f"block {block} read back altered"
    assert tokens != original, "a damaged batch was read back as if whole"


@examples(150)
@given(cut=st.floats(min_value=0.0, max_value=0.999),
       positions=st.lists(st.integers(min_value=0), max_size=3))
def test_store_file_truncated_or_flipped(tmp_path: Path, store_dir: Path,
                                         original: dict[str, list[int]], cut: float,
                                         positions: list[int]) -> None:
    data = _copy(store_dir, tmp_path / "d")
    db = data / DB_NAME
    raw = db.read_bytes()
    damaged = flip_bits(raw, positions) if positions else raw
    damaged = damaged[: max(1, int(len(damaged) * cut))] if cut > 0 else damaged
    assume(damaged != raw)
    db.write_bytes(damaged)
    tokens = _read_all(data)
    if tokens is not None:
        for block, got in tokens.items():
            assert got == original.get(block), f"block {block} read back altered"


# --- the device ledger --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.client.ledger.test_ledger import DAY1, DAY2, admit

    data = tmp_path_factory.mktemp("ledger")
    with Ledger.open(data) as ledger:
        admit(ledger, [DAY1, DAY2], q=0.02)
        admit(ledger, [DAY1], q=0.02, now=10_000.0)
    conn = sqlite3.connect(data / LEDGER_FILE)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return data


@examples(150)
@given(cut=st.floats(min_value=0.0, max_value=0.999),
       positions=st.lists(st.integers(min_value=0), max_size=3))
def test_ledger_file_truncated_or_flipped(tmp_path: Path, ledger_dir: Path, cut: float,
                                          positions: list[int]) -> None:
    data = _copy(ledger_dir, tmp_path / "d")
    db = data / LEDGER_FILE
    raw = db.read_bytes()
    damaged = flip_bits(raw, positions) if positions else raw
    damaged = damaged[: max(1, int(len(damaged) * cut))] if cut > 0 else damaged
    assume(damaged != raw)
    db.write_bytes(damaged)
    with Ledger.open(_copy(ledger_dir, tmp_path / "orig")) as ledger:
        original = (ledger.totals(), ledger.retired_blocks())
    try:
        with Ledger.open(data) as ledger:
            # Opened: then exactly as written, never an altered figure.
            assert (ledger.totals(), ledger.retired_blocks()) == original
    except DeviceLedgerError as error:
        assert str(error)


@pytest.fixture(scope="module")
def chained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Record-level and employee-day charges and a retired day (every chained table)."""
    from tests.unit.client.ledger.test_chain import build

    data = build(tmp_path_factory.mktemp("chained"))
    conn = sqlite3.connect(data / LEDGER_FILE)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return data


#: Every value the chain covers: each chained table's columns, and the blocks row.
COVERED = [(t.name, c) for t in TABLES for c in t.columns] + [
    ("blocks", c) for c in ("block", "budget", "retired", "retired_at", "forgotten_at")
]


def _flip_byte(value: object, at: int, mask: int) -> object:
    """``value`` with one byte of its stored form XOR-ed with ``mask`` (1..255)."""
    if isinstance(value, float):
        raw = bytearray(struct.pack(">d", value))
        raw[at % 8] ^= mask
        return struct.unpack(">d", bytes(raw))[0]
    if isinstance(value, int):
        raw = bytearray(value.to_bytes(8, "big", signed=True))
        raw[at % 8] ^= mask
        return int.from_bytes(raw, "big", signed=True)
    if isinstance(value, bytes):
        raw = bytearray(value)
        raw[at % len(raw)] ^= mask
        return bytes(raw)
    assert isinstance(value, str)
    raw = bytearray(value.encode())
    raw[at % len(raw)] ^= mask
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return bytes(raw)  # not text any more: stored as a blob, still an edit


@examples(200)
@given(column=st.sampled_from(COVERED), row=st.integers(min_value=0),
       at=st.integers(min_value=0), mask=st.integers(min_value=1, max_value=255))
def test_a_byte_of_a_ledger_row_changed_behind_the_daemons_back_is_refused(
    tmp_path: Path, chained_dir: Path, column: tuple[str, str], row: int, at: int, mask: int
) -> None:
    table, name = column
    data = _copy(chained_dir, tmp_path / "d")
    conn = sqlite3.connect(data / LEDGER_FILE)
    try:
        rowids = [r[0] for r in conn.execute(f"SELECT rowid FROM {table} ORDER BY rowid")]
        rowid = rowids[row % len(rowids)]
        (value,) = conn.execute(f"SELECT {name} FROM {table} WHERE rowid = ?",
                                (rowid,)).fetchone()
        assume(value is not None)  # a NULL has no byte to change
        flipped = _flip_byte(value, at, mask)
        try:
            conn.execute(f"UPDATE {table} SET {name} = ? WHERE rowid = ?", (flipped, rowid))
            conn.commit()
        except sqlite3.IntegrityError:
            assume(False)  # a duplicate key or a NaN into NOT NULL: SQLite refused it itself
        # An INTEGER PRIMARY KEY is the rowid itself: the row moved with it.
        alias = [r[1] for r in conn.execute(f"PRAGMA table_info({table})") if r[5]] == [name] \
            and isinstance(flipped, int)
        (stored,) = conn.execute(f"SELECT {name} FROM {table} WHERE rowid = ?",
                                 (flipped if alias else rowid,)).fetchone()
        assume((type(stored), stored) != (type(value), value))  # SQLite may convert it back
    finally:
        conn.close()
    with pytest.raises(DeviceLedgerError) as info:
        Ledger.open(data)
    message = str(info.value)
    assert f"{table} row" in message or "chain" in message, message
    assert "never delete the ledger" in message


# ----------------------------------------------------------------- the SuperLink's state


@pytest.fixture(scope="module")
def superlink_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server folder whose real Flower state file and keystay registry agree."""
    from tests.unit.server.deploy.test_superlink_state import build

    return build(tmp_path_factory.mktemp("superlink") / "server")


def _enrolled_nodes(server: Path) -> dict[int, tuple[str, bytes]]:
    """node id -> (status, key bytes) of every enrolled device's node row."""
    from keystay.server.deploy.enrollment import Registry
    from keystay.server.deploy.superlink_state import STATE_FILE

    conn = sqlite3.connect(f"file:{server / STATE_FILE}?mode=ro", uri=True)
    try:
        rows = {n & ((1 << 64) - 1): (s, k) for n, s, k in
                conn.execute("SELECT node_id, status, public_key FROM node")}
    finally:
        conn.close()
    return {e.node_id: rows[e.node_id] for e in Registry.open(server).all()
            if e.node_id in rows}


def _superlink_verdict(server: Path) -> str | None:
    """None if ``check_state`` accepts the folder, else its refusal; checks it changed nothing."""
    from keystay.server.deploy.superlink import ServerConfig
    from keystay.server.deploy.superlink_state import (
        STATE_FILE,
        SuperLinkStateError,
        check_state,
    )

    db = server / STATE_FILE
    before = db.read_bytes()
    try:
        check_state(server, ServerConfig())
        verdict = None
    except SuperLinkStateError as error:
        verdict = str(error)
        assert str(db) in verdict and "Move it aside" in verdict, verdict
    assert db.read_bytes() == before  # read-only, refused or not
    return verdict


@examples(200)
@given(cut=st.floats(min_value=0.0, max_value=0.999),
       positions=st.lists(st.integers(min_value=0), max_size=3))
def test_superlink_state_file_truncated_or_flipped(
    tmp_path: Path, superlink_dir: Path, cut: float, positions: list[int]
) -> None:
    """A damaged state file is refused, or accepted with every enrolled node as it was."""
    from keystay.server.deploy.superlink_state import STATE_FILE

    server = _copy(superlink_dir, tmp_path / "s")
    db = server / STATE_FILE
    raw = db.read_bytes()
    damaged = flip_bits(raw, positions) if positions else raw
    damaged = damaged[: int(len(damaged) * cut)] if cut > 0 else damaged
    assume(damaged != raw)
    db.write_bytes(damaged)
    verdict = _superlink_verdict(server)
    event("accepted" if verdict is None else "refused")
    if verdict is None:
        # Accepted: what admits devices (their node rows) is exactly as registered.
        assert _enrolled_nodes(server) == _enrolled_nodes(superlink_dir)


#: The node columns that decide who is admitted; the others are Flower's bookkeeping.
_ADMISSION = ("node_id", "status", "public_key")
_NODE_COLUMNS = (*_ADMISSION, "owner_name", "registered_at", "online_until",
                 "heartbeat_interval")


@examples(200)
@given(name=st.sampled_from(_NODE_COLUMNS), row=st.integers(min_value=0),
       at=st.integers(min_value=0), mask=st.integers(min_value=1, max_value=255))
def test_a_byte_of_a_superlink_node_row_changed_behind_its_back(
    tmp_path: Path, superlink_dir: Path, name: str, row: int, at: int, mask: int
) -> None:
    """One byte of one node value changed with SQL: refused iff it decides admission."""
    from keystay.server.deploy.superlink_state import STATE_FILE

    server = _copy(superlink_dir, tmp_path / "s")
    conn = sqlite3.connect(server / STATE_FILE)
    try:
        rowids = [r[0] for r in conn.execute("SELECT rowid FROM node ORDER BY rowid")]
        rowid = rowids[row % len(rowids)]
        (value, status) = conn.execute(f"SELECT {name}, status FROM node WHERE rowid = ?",
                                       (rowid,)).fetchone()
        assume(value is not None)
        flipped = _flip_byte(value, at, mask)
        try:
            conn.execute(f"UPDATE node SET {name} = ? WHERE rowid = ?", (flipped, rowid))
            conn.commit()
        except sqlite3.IntegrityError:
            assume(False)  # a duplicate node id or key: SQLite refused the edit itself
        (stored,) = conn.execute(f"SELECT {name} FROM node WHERE rowid = ?",
                                 (rowid,)).fetchone()
        assume((type(stored), stored) != (type(value), value))
    finally:
        conn.close()
    verdict = _superlink_verdict(server)
    # An enrolled device's node: its id, state and key decide who connects as
    # it. A revoked device's (unregistered) node: only its state does (moved
    # or re-keyed, it is still unregistered; deleted, it is what a fresh state
    # file holds for it, and its key is not registered either way).
    decides = name in _ADMISSION if status != "unregistered" else name == "status"
    if decides:
        assert verdict is not None and "registry" in verdict, (name, value, stored)
    else:
        assert verdict is None, verdict
