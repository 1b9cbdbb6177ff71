"""Versioned SQLite files: open, create on first use, refuse any other format.

Design
------
The device ledger and the server ledger are SQLite files whose format
version is ``PRAGMA user_version``. Opening one is the same steps each time,
written once here (:func:`open_versioned`):

* WAL journal and ``synchronous=FULL``: a committed row survives power
  loss, not only a process crash (a charge or an audit row must never be
  lost after it was acknowledged);
* autocommit mode (``isolation_level=None``): callers issue ``BEGIN
  IMMEDIATE`` themselves where a check and a write must be one unit;
* the version check and the creation are one ``BEGIN IMMEDIATE``
  transaction, so two processes opening a new file at once cannot both
  create it;
* a file with tables but no version is not ours (:class:`ForeignFileError`);
  a file of another version is refused (:class:`FormatVersionError`), never
  migrated or overwritten silently. Callers turn these into their own
  sentences (what to do differs: a device must never delete its ledger, a
  server operator points at another folder).

``sqlite3.DatabaseError`` (a corrupt file, not a database at all) propagates
unchanged for the caller to word.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "x.sqlite"
>>> conn = open_versioned(path, version=3, schema="CREATE TABLE t (a INTEGER)")
>>> conn.execute("PRAGMA user_version").fetchone()[0]
3
>>> conn.close()
>>> open_versioned(path, version=4, schema="")
Traceback (most recent call last):
...
keystay.common.sqlite.FormatVersionError: ... is format 3, not 4
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from keystay.common.errors import KeystayError


class ForeignFileError(KeystayError):
    """The file has tables but no format version: it is not a keystay file."""


class FormatVersionError(KeystayError):
    """The file is of another format version than this keystay reads."""

    def __init__(self, path: Path, found: int, expected: int) -> None:
        super().__init__(f"{path} is format {found}, not {expected}")
        self.found = found
        self.expected = expected


def open_versioned(
    path: Path,
    *,
    version: int,
    schema: str,
    always: str | None = None,
    timeout: float = 60.0,
) -> sqlite3.Connection:
    """Open (creating if empty) the SQLite file ``path`` of format ``version``.

    Parameters
    ----------
    path : Path
        The file; create it beforehand with the mode it needs (0600).
    version : int
        The format this code reads and writes (``PRAGMA user_version``; > 0).
    schema : str
        ``;``-separated statements run once, on an empty file.
    always : str or None
        ``;``-separated statements run at every open, in the same
        transaction (idempotent ``CREATE TABLE IF NOT EXISTS`` added after
        the format was fixed).
    timeout : float
        Seconds to wait for another process's lock.

    Returns
    -------
    sqlite3.Connection
        In autocommit mode, usable from any thread (callers lock).

    Raises
    ------
    ForeignFileError, FormatVersionError, sqlite3.DatabaseError
        See the module docstring. The connection is closed first.
    """
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               timeout=timeout)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise ForeignFileError(f"{path} has tables but no format version")
                for statement in schema.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={int(version)}")
            elif found != version:
                raise FormatVersionError(path, found, version)
            for statement in (always or "").split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    return conn
