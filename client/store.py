"""Encrypted event store: token records at rest, grouped into daily blocks.

Only the device daemon opens this store. It holds what the tokenizer produced
(:class:`keystay.common.tokens.TokenRecord`), never raw events, encrypted with
a key that lives beside it in a 0600 file.

On-disk format (version 1)
--------------------------
``<data_dir>/store.key``
    32 raw bytes: the AES-256-GCM key. Created with ``os.open(..., 0o600)``;
    the store refuses to open if group or others can read it. Deleting it
    (:meth:`EventStore.destroy`) makes every batch unreadable (crypto-shred).
``<data_dir>/store.v1.sqlite`` (+ ``-wal``, ``-shm``)
    SQLite in WAL mode. The file name carries the format version so that a
    future format sits beside this one instead of being misread. Tables:

    ``meta(name TEXT PRIMARY KEY, value BLOB)``
        ``format`` = ``"1"``; ``key_check`` = nonce (12 bytes) + AES-GCM of a
        fixed text, which tells a wrong key (:class:`WrongKeyError`) apart
        from altered data (:class:`StoreCorruptError`).
    ``batches(id, block, seq, n_events, nonce, ciphertext, created)``
        One row per :meth:`EventStore.append`. ``block`` is an ISO date
        (an employee-day); ``seq`` numbers the block's batches 0, 1, 2, ...
        (``UNIQUE(block, seq)``); ``nonce`` is 12 random bytes; ``created`` is
        wall-clock seconds (bookkeeping only, not authenticated).

Each batch is ``AESGCM(key).encrypt(nonce, payload, aad)`` with associated
data ``b"keystay.store.v1\\0<block>\\0<seq>\\0<n_events>"``: a batch moved to
another block, renumbered (reordered) or given another event count fails
authentication. Reading a block also requires ``seq`` to run 0..k-1 without a
gap, so a batch deleted from the middle of a block is detected too. Dropping
a block's *last* batches is not detectable from the store alone (that would
need a count kept elsewhere), and a whole block deleted looks like a block
the employee forgot.

The payload (little-endian) is::

    uint32  n                       number of records
    float64 t[n]                    TokenRecord.t
    uint16  token[n]                TokenRecord.token
    ASCII   JSON [[i, app, text], ...]   only records with app or text; absent if none

Struct-packed columns rather than JSON objects: 10 bytes per record, and
``block_tokens`` reads the token column straight into numpy. The payload is
not compressed (compression before encryption leaks content through length,
and typed text may be in it when raw text is allowed).

Durability: every append is one SQLite transaction, so a process killed
mid-write (``kill -9``) leaves a store that opens cleanly, missing at most the
batch in flight. ``synchronous=NORMAL``: in WAL mode that is safe against
process crashes and never corrupts the database; a power cut can lose the
last few committed batches. That trade is right here: losing seconds of
interaction tokens costs nothing, while ``FULL`` would fsync on every append
of an always-on recorder. (The privacy ledger, where losing a write would
under-count epsilon, makes the opposite choice.)

Deleted blocks: ``secure_delete`` is on and the WAL is checkpointed after a
delete, so a forgotten day does not linger in free pages or WAL frames.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import struct
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.files import create_private, ensure_private, fsync_dir
from keystay.common.tokens import VOCAB_SIZE, TokenRecord

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DB_NAME",
    "FORMAT_VERSION",
    "KEY_NAME",
    "BlockInfo",
    "BlockNotFoundError",
    "EventStore",
    "KeyFileError",
    "StoreCorruptError",
    "StoreError",
    "WrongKeyError",
    "block_for",
    "is_block_id",
]

FORMAT_VERSION = 1
DB_NAME = f"store.v{FORMAT_VERSION}.sqlite"
KEY_NAME = "store.key"
KEY_BYTES = 32
NONCE_BYTES = 12

_AAD_PREFIX = f"keystay.store.v{FORMAT_VERSION}".encode()
_KEY_CHECK_AAD = _AAD_PREFIX + b"\0key-check"
_KEY_CHECK_TEXT = b"keystay event store key check"
_HEADER = struct.Struct("<I")
_BIG_ENDIAN = sys.byteorder == "big"
_BLOCK_RE = re.compile(r"\d{4}-\d{2}-\d{2}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id         INTEGER PRIMARY KEY,
    block      TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    n_events   INTEGER NOT NULL,
    nonce      BLOB    NOT NULL,
    ciphertext BLOB    NOT NULL,
    created    REAL    NOT NULL,
    UNIQUE (block, seq)
);
"""


class StoreError(KeystayError):
    """Base class of event store errors."""

    exit_code = ExitCode.DEVICE_STORE


class KeyFileError(StoreError):
    """The key file is missing, malformed or readable by others."""


class WrongKeyError(StoreError):
    """The key file does not belong to this store."""


class StoreCorruptError(StoreError):
    """Stored data failed authentication or is inconsistent (altered, moved, truncated)."""


@contextlib.contextmanager
def _damaged_file_is_corrupt(db_path: Path) -> Iterator[None]:
    """Turn SQLite's "malformed" / "not a database" into :class:`StoreCorruptError`.

    Only for opening and reading: a damaged file is the store's corruption,
    named as such. ``OperationalError`` (locked, disk full, I/O) passes
    through unchanged, since the recorder retries those (see its module doc).
    """
    try:
        yield
    except sqlite3.DatabaseError as error:
        # Text that does not decode is damage too, though SQLite's Python
        # binding reports it as an OperationalError.
        if isinstance(error, sqlite3.OperationalError) and "decode" not in str(error):
            raise
        raise StoreCorruptError(
            f"the event store {db_path} is damaged ({error}); keystay cannot read it. "
            "Restore it from a backup, or run 'keystay device forget --all' to start empty."
        ) from error


class BlockNotFoundError(StoreError, KeyError):
    """The store holds no batch for the requested block."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What the store holds for one block (from the unauthenticated columns).

    Attributes
    ----------
    block : str
        ISO date of the employee-day.
    events : int
        Number of token records.
    batches : int
        Number of encrypted batches.
    bytes : int
        Ciphertext bytes.
    """

    block: str
    events: int
    batches: int
    bytes: int


def block_for(ts: float) -> str:
    """Return the block id (local ISO date) for wall-clock time ``ts`` (``time.time()``).

    >>> import datetime, time
    >>> block_for(time.time()) == datetime.date.today().isoformat()
    True
    """
    return date.fromtimestamp(ts).isoformat()


def is_block_id(block: object) -> bool:
    """Whether ``block`` is a block id this store writes (a valid ISO calendar date)."""
    try:
        _check_block(block)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def _check_block(block: str) -> None:
    if not isinstance(block, str) or not _BLOCK_RE.fullmatch(block):
        raise ValueError(f"block id must be an ISO date YYYY-MM-DD, got {block!r}")
    try:
        date.fromisoformat(block)
    except ValueError:
        raise ValueError(f"block id {block!r} is not a valid calendar date") from None


def _aad(block: str, seq: int, n_events: int) -> bytes:
    return b"\0".join((_AAD_PREFIX, block.encode(), str(seq).encode(), str(n_events).encode()))


def _encode(records: Sequence[TokenRecord]) -> bytes:
    """Pack records into a version-1 payload (see the module docstring)."""
    ts = array("d", [r.t for r in records])
    try:
        tokens = array("H", [r.token for r in records])
    except OverflowError:
        bad = next(r.token for r in records if not 0 <= r.token < 65536)
        raise ValueError(
            f"token id {bad} is outside the vocabulary (0..{VOCAB_SIZE - 1})") from None
    if tokens and max(tokens) >= VOCAB_SIZE:
        raise ValueError(
            f"token id {max(tokens)} is outside the vocabulary (0..{VOCAB_SIZE - 1})")
    if _BIG_ENDIAN:
        ts.byteswap()
        tokens.byteswap()
    extras = [[i, r.app, r.text] for i, r in enumerate(records)
              if r.app is not None or r.text is not None]
    # ASCII JSON: any str survives, lone surrogates included.
    tail = json.dumps(extras, separators=(",", ":")).encode() if extras else b""
    return b"".join((_HEADER.pack(len(records)), ts.tobytes(), tokens.tobytes(), tail))


def _split(payload: bytes, n: int, where: str) -> tuple[memoryview, memoryview, memoryview]:
    """Return the t, token and JSON tail views of an authenticated payload."""
    if len(payload) < _HEADER.size + 10 * n or _HEADER.unpack_from(payload)[0] != n:
        # Authenticated but inconsistent: written by something other than _encode.
        raise StoreCorruptError(f"{where}: payload does not hold the {n} records it declares")
    view = memoryview(payload)
    a = _HEADER.size
    b = a + 8 * n
    c = b + 2 * n
    return view[a:b], view[b:c], view[c:]


def _decode(payload: bytes, n: int, where: str) -> list[TokenRecord]:
    t_bytes, tok_bytes, tail = _split(payload, n, where)
    ts = array("d")
    ts.frombytes(t_bytes)
    tokens = array("H")
    tokens.frombytes(tok_bytes)
    if _BIG_ENDIAN:
        ts.byteswap()
        tokens.byteswap()
    records = list(map(TokenRecord, ts, tokens))
    if tail:
        try:
            extras = json.loads(bytes(tail))
            for i, app, text in extras:
                records[i] = TokenRecord(ts[i], tokens[i], app, text)
        except (ValueError, TypeError, IndexError) as exc:
            raise StoreCorruptError(f"{where}: unreadable app/text column ({exc})") from exc
    return records


class EventStore:
    """The device's encrypted token store. Open it with :meth:`EventStore.open`.

    Thread-safe: one connection guarded by a lock (the daemon appends from the
    recorder thread and reads from service threads).
    """

    def __init__(self, data_dir: Path, conn: sqlite3.Connection, key: bytes) -> None:
        self._dir = data_dir
        self._db_path = data_dir / DB_NAME
        self._key_path = data_dir / KEY_NAME
        self._conn: sqlite3.Connection | None = conn
        self._aead = AESGCM(key)
        self._lock = threading.Lock()

    # -- opening ----------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path | str) -> EventStore:
        """Open the store in ``data_dir``, creating folder, key and database if new.

        Raises
        ------
        KeyFileError
            The key file is readable by group/others, malformed, or missing while
            the database exists (data without its key cannot be read).
        WrongKeyError
            The key file does not belong to this database.
        StoreError
            The database has another format version.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        db_path = data_dir / DB_NAME
        key_path = data_dir / KEY_NAME
        db_existed = db_path.exists() and db_path.stat().st_size > 0
        if key_path.exists() or key_path.is_symlink():
            key = _read_key(key_path)
        elif db_existed:
            raise KeyFileError(
                f"{key_path} is missing but {db_path} exists: the stored events cannot be "
                f"decrypted without it. Restore the key file, or delete {db_path} to start "
                "an empty store.")
        else:
            key = _create_key(key_path)
        # Create the database file 0600 ourselves: SQLite would use the umask,
        # and it gives the -wal/-shm files the database file's mode.
        ensure_private(db_path)
        conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False,
                               timeout=30.0)
        try:
            with _damaged_file_is_corrupt(db_path):
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{db_path}: could not switch SQLite to WAL mode ({mode})")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA secure_delete=ON")
                _init_schema(conn, db_path, key_path, key)
        except BaseException:
            conn.close()
            raise
        return cls(data_dir, conn, key)

    # -- writing -----------------------------------------------------------------

    def append(self, block: str, records: Sequence[TokenRecord]) -> None:
        """Append ``records`` to ``block`` as one encrypted batch (one transaction).

        Empty ``records`` write nothing.

        Raises
        ------
        ValueError
            ``block`` is not an ISO date, or a token id is outside the vocabulary.
        """
        _check_block(block)
        if not records:
            return
        payload = _encode(records)
        n = len(records)
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                (seq,) = conn.execute(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM batches WHERE block = ?", (block,)
                ).fetchone()
                nonce = os.urandom(NONCE_BYTES)
                ciphertext = self._aead.encrypt(nonce, payload, _aad(block, seq, n))
                conn.execute(
                    "INSERT INTO batches (block, seq, n_events, nonce, ciphertext, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (block, seq, n, nonce, ciphertext, time.time()))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- reading -----------------------------------------------------------------

    def blocks(self) -> list[BlockInfo]:
        """Return every block held, oldest first."""
        with self._lock, _damaged_file_is_corrupt(self._db_path):
            rows = self._connection().execute(
                "SELECT block, SUM(n_events), COUNT(*), SUM(LENGTH(ciphertext)) "
                "FROM batches GROUP BY block ORDER BY block").fetchall()
        return [BlockInfo(b, int(e), int(k), int(s)) for b, e, k, s in rows]

    def read_block(self, block: str) -> list[TokenRecord]:
        """Return every record of ``block`` in append order.

        All batches are authenticated before anything is returned.

        Raises
        ------
        BlockNotFoundError
            The store holds nothing for ``block``.
        StoreCorruptError
            A batch failed authentication, or batches are missing.
        """
        payloads = self._verified_payloads(block)
        records: list[TokenRecord] = []
        for seq, n, payload in payloads:
            records.extend(_decode(payload, n, f"block {block} batch {seq}"))
        return records

    def block_tokens(self, block: str) -> np.ndarray:
        """Return the token ids of ``block`` in order, as a 1-D ``int64`` array.

        Raises the same errors as :meth:`read_block`.
        """
        payloads = self._verified_payloads(block)
        # numpy only here: the always-on recorder never pays for it (~14 MiB RSS).
        import numpy as np

        parts = [np.frombuffer(_split(p, n, f"block {block} batch {seq}")[1], dtype="<u2")
                 for seq, n, p in payloads]
        return np.concatenate(parts).astype(np.int64)

    def _verified_payloads(self, block: str) -> list[tuple[int, int, bytes]]:
        with self._lock, _damaged_file_is_corrupt(self._db_path):
            rows = self._connection().execute(
                "SELECT seq, n_events, nonce, ciphertext FROM batches WHERE block = ? "
                "ORDER BY seq", (block,)).fetchall()
        if not is_block_id(block):
            if rows:
                # blocks() lists it, but append() never writes such an id: the
                # block column was edited (its batches cannot authenticate).
                raise StoreCorruptError(
                    f"the store at {self._db_path} holds a block named {block!r}, which is "
                    "not a date keystay writes: the file was altered. Forget that block "
                    "to go on.")
            _check_block(block)  # raises ValueError naming what is wrong
        if not rows:
            raise BlockNotFoundError(f"the event store holds no block {block}")
        out = []
        for expected, (seq, n, nonce, ciphertext) in enumerate(rows):
            if seq != expected:
                raise StoreCorruptError(
                    f"block {block}: batch {expected} is missing (next is batch {seq}); the "
                    f"store at {self._db_path} was altered. Forget this block to go on.")
            try:
                payload = self._aead.decrypt(nonce, ciphertext, _aad(block, seq, n))
            except InvalidTag:
                raise StoreCorruptError(
                    f"block {block} batch {seq} failed authentication: its bytes were altered, "
                    f"or it was moved from another block or position, in {self._db_path}. "
                    "Forget this block to go on.") from None
            out.append((seq, n, payload))
        return out

    # -- deleting ------------------------------------------------------------------

    def delete_blocks(self, blocks: Iterable[str]) -> list[str]:
        """Delete whole blocks; return those that existed (in the order given)."""
        wanted = list(dict.fromkeys(blocks))
        for block in wanted:
            _check_block(block)
        deleted: list[str] = []
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for block in wanted:
                    cur = conn.execute("DELETE FROM batches WHERE block = ?", (block,))
                    if cur.rowcount > 0:
                        deleted.append(block)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if deleted:
                # Move the deletion into the main file (zeroed by secure_delete)
                # and empty the WAL, which still holds the old pages.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def apply_retention(self, days: int, today: date) -> list[str]:
        """Keep the ``days`` most recent calendar days up to ``today``; delete older blocks.

        With ``days=7`` and ``today=2024-01-10`` blocks from 2024-01-04 on are kept
        and 2024-01-03 and earlier are deleted. Returns the deleted block ids.
        """
        if days < 1:
            raise ValueError(f"retention must keep at least 1 day, got {days}")
        cutoff = (today - timedelta(days=days - 1)).isoformat()
        # ISO dates sort as strings.
        old = [info.block for info in self.blocks() if info.block < cutoff]
        return self.delete_blocks(old) if old else []

    def destroy(self) -> None:
        """Crypto-shred: overwrite and delete the key, then delete the database files.

        The store is closed afterwards. Without the key no copy of the database
        (backups, WAL fragments) can be decrypted.
        """
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            try:
                fd = os.open(self._key_path, os.O_WRONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                pass
            else:
                try:
                    os.write(fd, os.urandom(KEY_BYTES))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._key_path.unlink()
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self._db_path}{suffix}").unlink(missing_ok=True)
            fsync_dir(self._dir)

    # -- misc ---------------------------------------------------------------------

    def size_bytes(self) -> int:
        """Bytes on disk used by the database and its WAL/shm files."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self._db_path}{suffix}").st_size
        return total

    @property
    def path(self) -> Path:
        """The database file."""
        return self._db_path

    @property
    def key_path(self) -> Path:
        """The key file."""
        return self._key_path

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the event store {self._db_path} is closed")
        return self._conn


# -- key file ----------------------------------------------------------------------


def _read_key(key_path: Path) -> bytes:
    try:
        fd = os.open(key_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"cannot open the store key {key_path}: {exc.strerror}. It must be "
                           "a regular file (not a symlink) readable by this user.") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"the store key {key_path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"the store key {key_path} has mode {mode:04o}: group/others could read it. "
                f"Run `chmod 600 {key_path}` if only you had access, else rotate by "
                "forgetting the store.")
        if st.st_uid != os.geteuid():
            raise KeyFileError(f"the store key {key_path} belongs to uid {st.st_uid}, "
                               f"not to this user (uid {os.geteuid()})")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"the store key {key_path} holds {len(key)} bytes, expected "
                           f"{KEY_BYTES}; it is damaged or not a keystay key")
    return key


def _create_key(key_path: Path) -> bytes:
    key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
    if not create_private(key_path, key):
        return _read_key(key_path)  # another process created it first
    return key


def _init_schema(conn: sqlite3.Connection, db_path: Path, key_path: Path, key: bytes) -> None:
    aead = AESGCM(key)
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        if "format" not in meta:
            nonce = os.urandom(NONCE_BYTES)
            check = nonce + aead.encrypt(nonce, _KEY_CHECK_TEXT, _KEY_CHECK_AAD)
            conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)",
                             [("format", str(FORMAT_VERSION)), ("key_check", check)])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if "format" in meta:
        fmt = str(meta["format"])
        if fmt != str(FORMAT_VERSION):
            raise StoreError(f"{db_path} has store format {fmt}; this keystay reads format "
                             f"{FORMAT_VERSION}")
        check = bytes(meta.get("key_check", b""))
        try:
            aead.decrypt(check[:NONCE_BYTES], check[NONCE_BYTES:], _KEY_CHECK_AAD)
        except (InvalidTag, ValueError):
            raise WrongKeyError(
                f"the key in {key_path} does not open {db_path}: the key file was replaced "
                "or belongs to another store. Restore the original key file; without it the "
                "stored events cannot be read.") from None
