"""Versioned SQLite files: created once, other formats and foreign files refused."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from keystay.common.files import ensure_private
from keystay.common.sqlite import ForeignFileError, FormatVersionError, open_versioned

SCHEMA = "CREATE TABLE a (x INTEGER); CREATE TABLE b (y TEXT)"


def test_created_once_with_version_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    ensure_private(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    conn = open_versioned(path, version=2, schema=SCHEMA,
                          always="CREATE TABLE IF NOT EXISTS c (z)")
    conn.execute("INSERT INTO a VALUES (1)")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn.close()
    # Reopened: the schema is not run again (the row stays), `always` is.
    conn = open_versioned(path, version=2, schema=SCHEMA,
                          always="CREATE TABLE IF NOT EXISTS c (z)")
    assert conn.execute("SELECT x FROM a").fetchall() == [(1,)]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


def test_another_version_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    open_versioned(path, version=1, schema=SCHEMA).close()
    with pytest.raises(FormatVersionError) as raised:
        open_versioned(path, version=2, schema=SCHEMA)
    assert (raised.value.found, raised.value.expected) == (1, 2)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_a_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE theirs (x)")
    conn.commit()
    conn.close()
    with pytest.raises(ForeignFileError):
        open_versioned(path, version=1, schema=SCHEMA)


def test_not_a_database_raises_sqlites_error(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    path.write_bytes(b"this is not a database, just text that is long enough" * 40)
    with pytest.raises(sqlite3.DatabaseError):
        open_versioned(path, version=1, schema=SCHEMA)


def test_concurrent_first_opens_create_the_schema_once(tmp_path: Path) -> None:
    path = tmp_path / "f.sqlite"
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            open_versioned(path, version=1, schema=SCHEMA).close()
        except BaseException as error:  # collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
