"""The device ledger's integrity chain: rows edited behind the daemon's back are refused.

Why
---
The ledger is a SQLite file of the daemon's own user. Anything that can
write it (the ``sqlite3`` command line, a script, a disk fault that SQLite's
page checks miss) could lower an ε, delete a charge or un-retire a day, and
the daemon would go on charging against the smaller figures: a refund. This
module makes such an edit visible the next time the ledger is opened, so the
daemon refuses to train instead of trusting it.

Design
------
A device-local 32-byte key, ``DATA_DIR/ledger.v1.key`` (mode 0600, created
with the ledger, never leaves the device), keys HMAC-SHA256 tags over:

* **every charge row**, in table ``chain``: the rows of ``charges`` (every
  column but ``answered``), ``broken_charges``, ``charge_units`` and
  ``participation``. Entry ``seq`` holds the row's table and key and
  ``tag_seq = HMAC(key, tag_{seq-1} ‖ table ‖ row)``, so each tag covers
  every row before it: a row edited, deleted, added, or moved to another id
  breaks the chain at the first such row. Entries are appended in the
  transaction that writes the charge.
* **the chain's head**, in table ``chain_head``: ``HMAC(key, "head" ‖ n ‖ tag_n)``.
  Without it, deleting the *last* charge together with its chain entries
  would leave a shorter chain that still verifies; with it, that needs the key.
* **every ``blocks`` row** (budget, retirement, forgetting), in table
  ``block_tags``: ``HMAC(key, "block" ‖ tag of the block's last charge row ‖ row)``.
  Binding it to the last charge means an older copy of the row (from before
  the day retired) does not verify once the day has been charged since.
* **every stored accountant state** (a cache of the history), in table
  ``state_tags``. A state whose tag does not verify is rebuilt from the
  history, as any other stale state (:meth:`Ledger._state`), never trusted.

``answered`` is left out: it is a status flag the daemon sets after the
charge, and no ε depends on it.

Values are encoded with their type (``_encode``), so a number stored as text,
or a REAL turned INTEGER, is an edit too.

Opening (:func:`open_chain`, one ``BEGIN IMMEDIATE`` transaction) verifies the
whole chain: the ledger is small and opened once per daemon (a ledger of
1,000 charges opens in about 45 ms of CPU, against 1.5 ms without the chain:
``bench/bench_ledger_open.py``). The first bad row
is named in a :class:`ChainError`. An edit made while the daemon runs is
caught at its next start.

The key file
------------
A key of its own, not one derived from the signing key (``signing.key``):
the signing identity can be replaced on purpose (re-enrollment deletes it),
and the ledger must outlive that with every charge it holds. Both live in the
same 0700 folder, so one more file costs nothing in exposure.

A key file without its ledger, or with an empty one, means the ledger was
deleted or truncated: refused, never started afresh (that would be a refund).
A ledger with chain rows but no key file is refused: it cannot be checked.

Adoption
--------
A ledger written before the chain existed has rows and no chain. It is
adopted once, on its first open by this version: every row is tagged as
found and a WARNING is logged. Adoption cannot prove anything about what
happened before it: an edit made before that first open is tagged with the
rest and stays undetected. To tell adoption from a chain removed later, the
key is written to ``ledger.v1.key.new`` first and moved to ``ledger.v1.key``
only once the adoption is committed: a key file beside a ledger that has
rows but no chain means the chain was removed, and is refused.

What the chain cannot do
------------------------
Anyone who can read the key can recompute every tag: other software running
as the daemon's user can (see SECURITY.md). Removing the key *and* every
chain table makes a ledger look unchained, and it is adopted again (logged).
Restoring an older copy of both files (a backup) verifies: a rollback is
detected only by the server, whose ledger holds a signed report of every
answered charge (reconciliation). The chain detects; it never repairs.
"""

from __future__ import annotations

import ast
import contextlib
import hmac
import logging
import os
import secrets
import sqlite3
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from keystay.common.errors import KeystayError
from keystay.common.files import create_private, fsync_dir

KEY_FILE = "ledger.v1.key"
#: Where a new key waits until the ledger's chain holding its tags is committed.
PENDING_KEY_FILE = KEY_FILE + ".new"
KEY_BYTES = 32

log = logging.getLogger(__name__)

_DOMAIN = b"keystay device ledger chain v1\0"
_GENESIS = bytes(32)  # the "previous tag" of the first entry

#: Created on every open, like the ledger's other late tables.
SCHEMA = """
CREATE TABLE IF NOT EXISTS chain (
    seq INTEGER PRIMARY KEY,          -- 1, 2, 3, ... in write order, without gaps
    tbl TEXT NOT NULL,                -- the table of the row it covers
    row_key BLOB NOT NULL,            -- the row's primary key, encoded
    tag BLOB NOT NULL,                -- HMAC(key, previous tag || table || row)
    UNIQUE (tbl, row_key)
);
CREATE TABLE IF NOT EXISTS chain_head (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    seq INTEGER NOT NULL,             -- the last entry of the chain
    tag BLOB NOT NULL                 -- HMAC(key, "head" || seq || its tag)
);
CREATE TABLE IF NOT EXISTS block_tags (
    block TEXT PRIMARY KEY,
    tag BLOB NOT NULL                 -- HMAC(key, "block" || last charge's tag || blocks row)
);
CREATE TABLE IF NOT EXISTS state_tags (
    state_table TEXT NOT NULL,        -- accountant_state or broken_accountant_state
    block TEXT NOT NULL,
    tag BLOB NOT NULL,
    PRIMARY KEY (state_table, block)
)
"""


class ChainError(KeystayError):
    """The ledger does not match its integrity chain, or the chain cannot be checked."""


@dataclass(frozen=True, slots=True)
class _Table:
    """A table whose rows the chain covers: which columns, which key, which charge."""

    name: str
    columns: tuple[str, ...]  # covered columns; the key's columns come first
    key: int  # how many leading columns form the primary key

    @property
    def charge(self) -> str:
        """The column holding the charge id (the first key column)."""
        return self.columns[0]

    def describe(self, key: Sequence[object]) -> str:
        named = ", ".join(f"{c} {v!r}" if isinstance(v, str) else f"{c} {v}"
                          for c, v in zip(self.columns[: self.key], key, strict=False))
        return f"{self.name} row ({named})"


#: The chained tables, in the order a charge's rows are appended.
TABLES = (
    _Table("charges", ("id", "block", "created", "run_id", "server_round", "noise_multiplier",
                       "sample_rate", "steps", "delta", "eps_rdp", "eps_prv", "eps_prv_upper",
                       "eps_enforced", "accountant"), key=2),
    _Table("broken_charges", ("id", "block", "noise_multiplier", "sample_rate", "steps",
                              "eps_rdp", "eps_prv", "eps_prv_upper", "eps_enforced", "budget"),
           key=2),
    _Table("charge_units", ("id", "unit", "min_summed_devices", "update_clip",
                            "day_sample_rate"), key=1),
    _Table("participation", ("charge_id", "created", "run_id", "server_round", "blocks"), key=1),
)
_BY_NAME = {t.name: t for t in TABLES}
_BLOCK_COLUMNS = ("block", "budget", "retired", "retired_at", "forgotten_at")


def _encode(values: Sequence[object]) -> bytes:
    r"""An unambiguous byte string of SQLite values, type included.

    ``ascii()`` of the tuple: the values SQLite returns (None, int, float,
    str, bytes) each have one spelling there, with their type (``1`` and
    ``1.0`` differ, a float is written exactly), it escapes every non-ASCII
    character (so a Python whose Unicode tables say otherwise about what is
    printable spells it the same way), and it runs in C.

    >>> _encode([1, 1.0]) == _encode([1.0, 1])
    False
    >>> _encode(["2025-03-03", None, 0.1, "é"])
    b"('2025-03-03', None, 0.1, '\\xe9')"
    """
    return ascii(tuple(values)).encode("ascii")


def _decode_key(encoded: bytes) -> tuple[object, ...]:
    """The values of an encoded row key (for naming a row that is gone).

    >>> _decode_key(_encode([3, "2025-03-03"]))
    (3, '2025-03-03')
    """
    value = ast.literal_eval(encoded.decode("ascii"))
    if not isinstance(value, tuple):
        raise ValueError("not a row key")
    return value


def _select(table: _Table, where: str = "") -> str:
    keys = ", ".join(table.columns[: table.key])
    return f"SELECT {', '.join(table.columns)} FROM {table.name} {where} ORDER BY {keys}"


class LedgerChain:
    """Computes, appends and verifies the tags of one ledger. Callers hold its transaction.

    Parameters
    ----------
    key : bytes
        The device-local key (:data:`KEY_BYTES` bytes).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a ledger key is {KEY_BYTES} bytes, not {len(key)}")
        self._key = key

    def __repr__(self) -> str:
        return "LedgerChain(<key hidden>)"  # never show key material

    def _mac(self, *parts: bytes) -> bytes:
        return hmac.digest(self._key, _DOMAIN + b"".join(parts), "sha256")

    def _row_tag(self, previous: bytes, table: _Table, row: Sequence[object]) -> bytes:
        return self._mac(b"row", previous, _encode([table.name]), _encode(row))

    def _head_tag(self, seq: int, tag: bytes) -> bytes:
        return self._mac(b"head", _encode([seq]), tag)

    def _block_tag(self, last_charge_tag: bytes, row: Sequence[object]) -> bytes:
        return self._mac(b"block", last_charge_tag, _encode(row))

    def state_tag(self, state_table: str, block: str, version: str, last: int, count: int,
                  state: bytes) -> bytes:
        """The tag of a stored accountant state: its block, version, coverage and bytes."""
        return self._mac(b"state", _encode([state_table, block, version, last, count]), state)

    # --- writing (inside the caller's transaction) ---------------------------------------

    def append_charge(
        self, conn: sqlite3.Connection, charge_id: int, *, tag_blocks: bool = True
    ) -> None:
        """Chain every row of charge ``charge_id``, then re-tag the blocks it charged."""
        row = conn.execute("SELECT seq, tag FROM chain ORDER BY seq DESC LIMIT 1").fetchone()
        seq, previous = (0, _GENESIS) if row is None else (int(row[0]), bytes(row[1]))
        blocks: list[str] = []
        for table in TABLES:
            for values in conn.execute(_select(table, f"WHERE {table.charge} = ?"),
                                       (charge_id,)).fetchall():
                seq += 1
                previous = self._row_tag(previous, table, values)
                conn.execute("INSERT INTO chain (seq, tbl, row_key, tag) VALUES (?,?,?,?)",
                             (seq, table.name, _encode(values[: table.key]), previous))
                if table.name == "charges":
                    blocks.append(values[1])
        conn.execute(
            "INSERT INTO chain_head (one, seq, tag) VALUES (1,?,?) ON CONFLICT(one) DO UPDATE "
            "SET seq = excluded.seq, tag = excluded.tag",
            (seq, self._head_tag(seq, previous)),
        )
        for block in blocks if tag_blocks else ():
            self.tag_block(conn, block)

    def tag_block(self, conn: sqlite3.Connection, block: str) -> None:
        """(Re-)tag ``block``'s row of ``blocks`` after the daemon changed it."""
        row = conn.execute(f"SELECT {', '.join(_BLOCK_COLUMNS)} FROM blocks WHERE block = ?",
                           (block,)).fetchone()
        last = conn.execute(
            "SELECT c.tag FROM chain c WHERE c.tbl = 'charges' AND c.row_key = ?",
            (_encode([self._last_charge(conn, block), block]),),
        ).fetchone()
        if row is None or last is None:
            raise ChainError(f"block {block!r} has no blocks row or no chained charge to tag")
        conn.execute(
            "INSERT INTO block_tags (block, tag) VALUES (?,?) ON CONFLICT(block) DO UPDATE "
            "SET tag = excluded.tag",
            (block, self._block_tag(bytes(last[0]), row)),
        )

    @staticmethod
    def _last_charge(conn: sqlite3.Connection, block: str) -> object:
        return conn.execute("SELECT max(id) FROM charges WHERE block = ?", (block,)).fetchone()[0]

    def adopt(self, conn: sqlite3.Connection) -> int:
        """Tag every row of a ledger written before the chain, as found. Returns the rows."""
        ids = [r[0] for r in conn.execute(
            " UNION ".join(f"SELECT {t.charge} FROM {t.name}" for t in TABLES) + " ORDER BY 1"
        ).fetchall()]
        for charge_id in ids:
            self.append_charge(conn, charge_id, tag_blocks=False)
        for (block,) in conn.execute(
            "SELECT block FROM blocks WHERE block IN (SELECT block FROM charges)"
        ).fetchall():
            self.tag_block(conn, block)  # a row with no charge stays untagged: verify names it
        return int(conn.execute("SELECT count(*) FROM chain").fetchone()[0])

    # --- verifying ----------------------------------------------------------------------

    def verify(self, conn: sqlite3.Connection) -> int:
        """Check every chained row, the head and every blocks row. Returns the rows checked.

        Raises
        ------
        ChainError
            Naming the first row that does not match, in chain order.
        """
        rows: dict[str, dict[bytes, tuple[object, ...]]] = {
            t.name: {_encode(v[: t.key]): tuple(v) for v in conn.execute(_select(t))}
            for t in TABLES
        }
        last_charge: dict[object, tuple[object, bytes]] = {}  # block -> (id, tag)
        previous, count = _GENESIS, 0
        for seq, name, row_key, tag in conn.execute(
            "SELECT seq, tbl, row_key, tag FROM chain ORDER BY seq"
        ):
            count += 1
            if seq != count:
                raise ChainError(f"chain entry {count} is missing: a row was removed with its tag")
            table = _BY_NAME.get(name)
            if table is None or not isinstance(row_key, bytes) or not isinstance(tag, bytes):
                raise ChainError(f"chain entry {seq} was edited (it names no ledger row)")
            values = rows[table.name].pop(row_key, None)
            if values is None:
                raise ChainError(
                    f"the {_described(table, row_key)} is missing: it was deleted, or its id "
                    "or block changed"
                )
            if not hmac.compare_digest(self._row_tag(previous, table, values), tag):
                raise ChainError(
                    f"the {table.describe(values)} does not match its tag: it was edited, or "
                    "a row before it was removed or reordered"
                )
            previous = tag
            if table.name == "charges":
                known = last_charge.get(values[1])
                if known is None or _later(values[0], known[0]):
                    last_charge[values[1]] = (values[0], tag)
        head = conn.execute("SELECT seq, tag FROM chain_head").fetchone()
        if count and head is None:
            raise ChainError("the chain's head is missing: the last charges may have been removed")
        if head is not None and not (
            head[0] == count and isinstance(head[1], bytes)
            and hmac.compare_digest(self._head_tag(count, previous), head[1])
        ):
            raise ChainError(
                f"the chain ends at entry {count} but its head does not match it (it names entry "
                f"{head[0]}): the last charge rows were removed, or the head was edited"
            )
        for table in TABLES:
            for values in rows[table.name].values():
                raise ChainError(
                    f"the {table.describe(values)} has no tag: it was added behind the daemon's "
                    "back (or by a keystay older than the chain)"
                )
        self._verify_blocks(conn, {b: t for b, (_, t) in last_charge.items()})
        return count

    def _verify_blocks(self, conn: sqlite3.Connection, last_tags: dict[object, bytes]) -> None:
        tags = dict(conn.execute("SELECT block, tag FROM block_tags").fetchall())
        for row in conn.execute(
            f"SELECT {', '.join(_BLOCK_COLUMNS)} FROM blocks ORDER BY block"
        ).fetchall():
            block = row[0]
            last = last_tags.pop(block, None)
            tag = tags.pop(block, None)
            if last is None:
                raise ChainError(f"the blocks row (block {block!r}) has no charge: it was added "
                                 "behind the daemon's back")
            if not isinstance(tag, bytes) or not hmac.compare_digest(
                self._block_tag(last, row), tag
            ):
                raise ChainError(
                    f"the blocks row (block {block!r}) does not match its tag: it was edited "
                    "(a spent day un-retired, its budget or dates changed)"
                )
        for block in sorted(map(str, tags)):
            raise ChainError(f"the blocks row (block {block!r}) was deleted (a spent day "
                             "un-retired)")
        for block in sorted(map(str, last_tags)):
            raise ChainError(f"block {block!r} has charges but its blocks row was deleted")


def _later(a: object, b: object) -> bool:
    try:
        return bool(a > b)  # type: ignore[operator]
    except TypeError:  # an id edited into text: the tags already failed on it
        return False


def _described(table: _Table, row_key: bytes) -> str:
    """``table.describe`` of an encoded key (for a row that is gone)."""
    try:
        return table.describe(_decode_key(row_key))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        # a key edited into nonsense
        return f"{table.name} row (key {row_key!r})"


# --- the key file and opening -----------------------------------------------------------


def _read_key(path: Path) -> bytes | None:
    """The key in ``path``, or None if there is no such file."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ChainError(f"{path} cannot be read ({error.strerror})") from error
    if mode & 0o077:
        raise ChainError(
            f"{path} has mode {mode:04o}; the ledger key must be readable by its owner only "
            f"(anyone who reads it can rewrite the ledger unnoticed). Check who could have "
            f"read it, then run 'chmod 600 {path}'"
        )
    if len(data) != KEY_BYTES:
        raise ChainError(f"{path} holds {len(data)} bytes, not a {KEY_BYTES}-byte ledger key")
    return data


def _has_rows(conn: sqlite3.Connection) -> bool:
    return any(
        conn.execute(f"SELECT 1 FROM {name} LIMIT 1").fetchone()
        for name in (*(t.name for t in TABLES), "blocks")
    )


def _started(conn: sqlite3.Connection) -> bool:
    return any(
        conn.execute(f"SELECT 1 FROM {name} LIMIT 1").fetchone()
        for name in ("chain", "chain_head", "block_tags")
    )


_SQLITE_MAGIC = b"SQLite format 3\0"


def check_not_replaced(ledger_path: Path) -> None:
    """Refuse a missing or headless ledger file beside an existing key: it was deleted.

    Called before SQLite opens the file. A new ledger gets its key only once
    its schema is written (and a WAL ledger's first page, with the header, is
    written when it is created), so a key beside no ledger never occurs by
    itself. SQLite would take a file emptied, or cut to a byte, for a new
    database and create an empty ledger in it: a refund of every ε.
    """
    key_path = ledger_path.with_name(KEY_FILE)
    if not key_path.exists():
        return
    try:
        with ledger_path.open("rb") as handle:
            header = handle.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        header = None
    if header != _SQLITE_MAGIC:
        state = "missing" if header is None else "empty or cut short"
        raise ChainError(
            f"{ledger_path} is {state} but its key {key_path} exists: the ledger was deleted "
            "or truncated, and starting a new one would refund every ε it held"
        )


def open_chain(conn: sqlite3.Connection, data_dir: Path) -> LedgerChain:
    """Load (or create) the ledger's key, adopt an unchained ledger, verify the chain.

    One ``BEGIN IMMEDIATE`` transaction on ``conn``: two processes opening
    an unchained ledger at once adopt it once.

    Raises
    ------
    ChainError
        The chain does not verify, the key is missing, unreadable or
        readable by others, or the ledger has rows but its chain was removed.
    sqlite3.Error
        From the file (the caller words it).
    """
    key_path = data_dir / KEY_FILE
    pending = data_dir / PENDING_KEY_FILE
    adopted = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        key = _read_key(key_path)
        if _started(conn):
            # The key may still wait under its pending name (a crash after the commit
            # below), or be moving into place right now (the mover links, then unlinks).
            key = key or _read_key(pending) or _read_key(key_path)
            if key is None:
                raise ChainError(
                    f"the ledger's key {key_path} is missing, so the ledger cannot be checked"
                )
        elif key is not None:
            if _has_rows(conn):
                raise ChainError(
                    "the ledger has charges but no integrity chain, while its key exists: the "
                    "chain was removed"
                )
        else:
            # A new ledger, or one written before the chain (adopted below). Another
            # process may have made the key a moment ago: theirs is kept, and read.
            create_private(pending, secrets.token_bytes(KEY_BYTES))
            key = _read_key(key_path) or _read_key(pending) or _read_key(key_path)
            if key is None:
                raise ChainError(f"{pending} vanished while the ledger key was being made")
        chain = LedgerChain(key)
        if not _started(conn):
            adopted = chain.adopt(conn)
        chain.verify(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if pending.exists():
        # The chain holding this key's tags is committed: only now may the key sit
        # beside the ledger under its own name (see "Adoption" above).
        with contextlib.suppress(FileExistsError):  # another process moved it first
            os.link(pending, key_path)
        fsync_dir(data_dir)
        pending.unlink(missing_ok=True)
    if _read_key(key_path) != key:
        raise ChainError(f"{key_path} changed while the ledger was being opened; open it again")
    if adopted:
        log.warning(
            "%s: adopted a ledger written before its integrity chain: %d rows tagged as found. "
            "Edits made to it before now cannot be detected; edits from now on are refused",
            data_dir, adopted,
        )
    return chain
