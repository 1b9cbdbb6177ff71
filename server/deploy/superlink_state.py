"""The SuperLink's state database, checked before ``keystay server start`` runs it.

``flower-superlink`` keeps its state in ``DIR/superlink.db`` (SQLite, schema
by Flower's Alembic migrations). What it holds, and what losing it costs:

* runs, their messages and objects: Flower's working state. A run in flight
  dies with the SuperLink anyway; keystay's record of runs is elsewhere
  (``DIR/runs/NAME/rounds.jsonl``, checkpoints, and the server ledger, which
  holds every verified privacy report);
* the SuperNode keys of enrolled devices, registered through the Control API
  by ``keystay server enroll``, and the keys of revoked devices, kept
  *unregistered*. keystay keeps both in its own registry
  (``DIR/enrollments.v1.sqlite``, with the keys in ``DIR/enrolled/``).

So the file can be discarded: nothing a device paid ε for is in it. What must
not happen is that the SuperLink runs on a damaged or edited copy. Flower
opens a cut-short or emptied file as a *new* database and creates its tables
in it (every enrolled device then silently refused, as unknown keys); it
fails on a garbage file with a traceback in its own log; and it trusts every
row: a revoked device set back to "registered", or an enrolled device's key
swapped for another, would be served rounds.

:func:`check_state` therefore runs before the SuperLink starts and refuses,
with :class:`SuperLinkStateError` (exit code 26, ``SERVER_SUPERLINK_STATE``)
and one sentence naming the file, when

* the file is not a SQLite database, fails SQLite's ``quick_check``, or has
  no Flower schema (no ``alembic_version`` or ``node`` table): damaged;
* (servers that authenticate SuperNodes) an enrolled device's node is gone,
  in a state Flower would not admit (unregistered, or a value Flower never
  writes), or holds another key, or a revoked device's node is not
  unregistered: edited behind keystay's back (or damaged in a way SQLite
  cannot see).

A node registered there that keystay never enrolled is a warning, not a
refusal: an ``enroll`` cut short between the SuperLink and the registry
leaves one, and running the enrollment again finishes it.

The check opens the file read-only (``mode=ro``): it never changes it, and a
refused file is left exactly as found for the operator to keep or inspect.
It judges the state as SQLite reads it, write-ahead log included: a SuperLink
stopped without a checkpoint leaves its newest pages in ``superlink.db-wal``,
and a main file damaged only under pages the log holds is read from the
log, intact, so it is rightly accepted (the e2e cell removes the log too).
The refusal says what to do: move the file aside and start again. Then the
SuperLink starts on a new file, and :func:`reregister` (called by
``keystay server start`` once the SuperLink is up, when it started without
a state file but the registry holds enrolled devices) registers every
enrolled, unrevoked device's key again and records the new node ids. Revoked
devices stay out: their keys are not registered, and the SuperLink admits
registered keys only.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.server.deploy.enrollment import (
    KEYS_DIR,
    FlwrControl,
    Registry,
    load_supernode_public_key,
)
from keystay.server.deploy.superlink import ServerConfig

STATE_FILE = "superlink.db"
#: Tables every SuperLink state of Flower 1.39 has (Alembic's, and the nodes').
_REQUIRED_TABLES = ("alembic_version", "node")
_UINT64 = (1 << 64) - 1
#: The node states in which Flower admits a SuperNode (``NodeStatus``).
_ADMITTED = ("registered", "online", "offline")


class SuperLinkStateError(KeystayError, RuntimeError):
    """``DIR/superlink.db`` is damaged or was edited; the SuperLink was not started."""

    exit_code = ExitCode.SERVER_SUPERLINK_STATE


@dataclass(frozen=True)
class StateCheck:
    """What :func:`check_state` found in a state file it accepted."""

    exists: bool  # False: no state file yet (a new server, or one moved aside)
    warnings: tuple[str, ...] = ()


def state_file(server_dir: Path) -> Path:
    return server_dir / STATE_FILE


def _discard_advice(path: Path) -> str:
    return (f"It holds only Flower's working state (runs in flight, queued messages) and the "
            f"registrations of enrolled devices' SuperNode keys, which keystay keeps too; no "
            f"privacy report or charge is in it. Move it aside (mv {path} {path}.damaged, with "
            f"its -wal and -shm files if any) and start again: the SuperLink starts on a new "
            f"file and keystay registers the enrolled devices again")


def check_state(server_dir: Path, config: ServerConfig) -> StateCheck:
    """Refuse a damaged or edited ``DIR/superlink.db`` before the SuperLink runs on it.

    Parameters
    ----------
    server_dir : Path
        The server folder.
    config : ServerConfig
        Its configuration: the node check applies to servers that
        authenticate SuperNodes only (elsewhere nodes enroll themselves).

    Returns
    -------
    StateCheck
        Whether a state file exists, and warnings to print.

    Raises
    ------
    SuperLinkStateError
        Naming the file and the first thing wrong with it, and what to do.
    """
    path = state_file(server_dir)
    if not path.exists():
        return StateCheck(exists=False)
    damaged = f"{path} is damaged"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as error:
        raise SuperLinkStateError(f"{path} cannot be opened ({error}). "
                                  f"{_discard_advice(path)}") from None
    try:
        with contextlib.closing(conn):
            try:
                verdict = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
                tables = {row[0] for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.Error as error:
                raise SuperLinkStateError(f"{damaged}: SQLite cannot read it ({error}). "
                                          f"{_discard_advice(path)}") from None
            if verdict != ["ok"]:
                raise SuperLinkStateError(
                    f"{damaged}: SQLite's integrity check fails ({'; '.join(verdict[:3])}). "
                    f"{_discard_advice(path)}")
            missing = [t for t in _REQUIRED_TABLES if t not in tables]
            if missing:
                what = "empty or cut short" if not tables else "not a Flower SuperLink state"
                raise SuperLinkStateError(
                    f"{damaged}: it is {what} (no {', '.join(missing)} table). "
                    f"{_discard_advice(path)}")
            if config.insecure or not config.supernode_auth:
                return StateCheck(exists=True)  # nodes enroll themselves: nothing to match
            try:
                rows = conn.execute("SELECT node_id, status, public_key FROM node").fetchall()
            except sqlite3.Error as error:
                raise SuperLinkStateError(f"{damaged}: its node table cannot be read "
                                          f"({error}). {_discard_advice(path)}") from None
    except sqlite3.Error as error:  # closing a connection to a broken file
        raise SuperLinkStateError(f"{damaged} ({error}). {_discard_advice(path)}") from None
    return StateCheck(exists=True, warnings=_match_nodes(server_dir, path, rows))


def _match_nodes(server_dir: Path, path: Path,
                 rows: list[tuple[object, object, object]]) -> tuple[str, ...]:
    """Check the node rows against keystay's registry; return warnings, raise on a mismatch."""
    nodes: dict[int, tuple[str, bytes | None]] = {}
    for node_id, status, key in rows:
        if not isinstance(node_id, int):
            raise SuperLinkStateError(f"{path} was edited: a node row has node id {node_id!r}. "
                                      f"{_discard_advice(path)}")
        nodes[node_id & _UINT64] = (str(status), key if isinstance(key, bytes) else None)
    edited = f"{path} does not match keystay's registry ({server_dir / 'enrollments.v1.sqlite'})"
    enrolled: set[int] = set()
    for entry in Registry.open(server_dir).all():
        if entry.node_id is None or entry.supernode_public_key is None:
            continue
        enrolled.add(entry.node_id)
        status, key = nodes.get(entry.node_id, (None, None))
        who = f"{entry.name} ({entry.device_id}, node {entry.node_id})"
        if entry.revoked:
            if status not in (None, "unregistered"):
                raise SuperLinkStateError(
                    f"{edited}: {who} was revoked on {entry.revoked_at}, but the SuperLink "
                    f"lists it as {status!r}: it would be admitted again. "
                    f"{_discard_advice(path)}")
            continue
        if status not in _ADMITTED:
            raise SuperLinkStateError(
                f"{edited}: {who} is enrolled, but the SuperLink "
                f"{'has no such node' if status is None else f'lists it as {status!r}'}. "
                f"{_discard_advice(path)}")
        if not _same_key(entry.supernode_public_key, key):
            raise SuperLinkStateError(
                f"{edited}: the SuperLink holds another SuperNode key for {who} than the one "
                f"enrolled: another computer could connect as it. {_discard_advice(path)}")
    strangers = sorted(n for n, (status, _) in nodes.items()
                       if n not in enrolled and status != "unregistered")
    if not strangers:
        return ()
    return (f"{path} registers node(s) {', '.join(map(str, strangers))} that keystay did not "
            "enroll (an enrollment cut short: run 'keystay server enroll' again for it; "
            "otherwise 'flwr supernode unregister NODE_ID keystay' with FLWR_HOME="
            f"{server_dir / 'flwr'})",)


def _same_key(openssh: str, stored: bytes | None) -> bool:
    """Whether Flower's stored key is, byte for byte, the enrolled key (OpenSSH text).

    Byte for byte because that is how the SuperLink finds a connecting
    SuperNode's node: by the exact PEM bytes it sends (SubjectPublicKeyInfo),
    which are what ``flwr supernode register`` stored.
    """
    if stored is None:
        return False
    try:
        enrolled = load_supernode_public_key(openssh)
    except KeystayError:
        return False
    pem = enrolled.public_bytes(serialization.Encoding.PEM,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem == stored


def reregister(server_dir: Path, config: ServerConfig) -> list[str]:
    """Register every enrolled, unrevoked device's SuperNode key with a new SuperLink state.

    For a SuperLink that started without a state file while the registry
    holds enrolled devices (the file was moved aside after a refusal).
    Records the new node ids in the registry. Returns the names registered.

    Raises
    ------
    EnrollmentError, SuperLinkUnavailableError
        The flwr CLI failed. The devices registered before it stay
        registered; the next start's :func:`check_state` names the first one
        left out (then the file is moved aside again and all are registered).
    """
    registry = Registry.open(server_dir)
    control = FlwrControl(server_dir, config)
    done = []
    for entry in registry.all():
        if entry.revoked or entry.supernode_public_key is None:
            continue
        pub = server_dir / KEYS_DIR / f"{entry.device_id}.pub"
        pub.parent.mkdir(exist_ok=True)
        pub.write_text(entry.supernode_public_key + "\n")
        node_id = control.register(pub, entry.name)
        registry.put(replace(entry, node_id=node_id))
        done.append(entry.name)
    return done


def needs_reregistering(server_dir: Path, config: ServerConfig) -> bool:
    """Whether the registry holds enrolled devices that a new state file would not know."""
    if config.insecure or not config.supernode_auth:
        return False
    return any(not e.revoked and e.supernode_public_key is not None
               for e in Registry.open(server_dir).all())
