"""Fuzzed files at rest: the event store and the device ledger, damaged behind the daemon's back.

Store: bits flipped in any column of any batch row (ciphertext, nonce, block,
seq, event count), and the database file truncated or bit-flipped. Ledger:
the database file truncated or bit-flipped. The contract: opening and reading
either gives back exactly what was written, or raises the module's own error
(``StoreError`` / ``DeviceLedgerError``) with a sentence; a damaged block is never
half-read (no partial or altered tokens returned), and no raw ``sqlite3``
error or other exception escapes.
"""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

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
    try:
        with Ledger.open(data) as ledger:
            ledger.totals()
            ledger.retired_blocks()
    except DeviceLedgerError as error:
        assert str(error)
