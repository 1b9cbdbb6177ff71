"""The SuperLink's state file, damaged or edited behind its back, is refused before it runs.

The state file is a real one: Flower's own ``SqlLinkState`` (its Alembic
migrations, its node rows) with three SuperNode keys registered, matched by
keystay's registry of three enrolled devices, one of them revoked (its node
unregistered, as ``keystay server revoke`` leaves it). Each damage or edit
is refused with :class:`SuperLinkStateError` (exit code 26) naming the file,
and the file is left byte for byte as found. ``keystay server start`` on
such a folder is checked in a real process (no traceback, nothing started).
Bit flips and truncations are fuzzed in tests/fuzz/test_stored.py.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keystay.common.exitcodes import ExitCode
from keystay.server.deploy.enrollment import Enrollment, Registry
from keystay.server.deploy.superlink import ServerConfig, executable, flower_env
from keystay.server.deploy.superlink_state import (
    STATE_FILE,
    SuperLinkStateError,
    check_state,
    needs_reregistering,
)

CONFIG = ServerConfig()  # TLS and node authentication: the production default
NAMES = ("alice-laptop", "bob-laptop", "carol-laptop")  # carol's is revoked
_INT64 = 1 << 63


def _new_key() -> tuple[str, bytes]:
    """A SuperNode key as keystay enrolls it (OpenSSH) and as Flower stores it (PEM)."""
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    openssh = public.public_bytes(serialization.Encoding.OpenSSH,
                                  serialization.PublicFormat.OpenSSH).decode()
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return openssh, pem


def build(server_dir: Path) -> Path:
    """A server folder whose superlink.db and registry agree (see the module docstring)."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    server_dir.mkdir(parents=True, exist_ok=True)
    state = SqlLinkState(str(server_dir / STATE_FILE), NoOpFederationManager(),
                         ObjectStoreFactory().store())
    state.initialize()
    registry = Registry.open(server_dir)
    for i, name in enumerate(NAMES):
        openssh, pem = _new_key()
        node_id = state.create_node("none", "none", pem, 0.0)
        revoked = "2026-12-01T00:00:00Z" if i == 2 else None
        if revoked:
            state.delete_node("none", node_id)  # what `flwr supernode unregister` does
        registry.put(Enrollment(
            device_id=f"dev-{i}", name=name, node_id=node_id, supernode_public_key=openssh,
            signing_public_key_pem="unused here", fingerprint=f"fp{i}",
            enrolled_at="2026-11-01T00:00:00Z", revoked_at=revoked))
    del state
    conn = sqlite3.connect(server_dir / STATE_FILE)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    for extra in server_dir.glob(f"{STATE_FILE}-*"):
        extra.unlink()
    return server_dir


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("superlink-state") / "server")


@pytest.fixture
def server(tmp_path: Path, pristine: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "server"))


def _refused(server: Path, *phrases: str) -> str:
    """Check ``server``'s state is refused, naming the file and ``phrases``, and unchanged."""
    db = server / STATE_FILE
    before = db.read_bytes()
    with pytest.raises(SuperLinkStateError) as caught:
        check_state(server, CONFIG)
    message = str(caught.value)
    assert str(db) in message and "Move it aside" in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert caught.value.exit_code == ExitCode.SERVER_SUPERLINK_STATE == 26
    assert db.read_bytes() == before  # read-only: left exactly as found
    return message


def _sql(server: Path, statement: str, *args: object) -> None:
    conn = sqlite3.connect(server / STATE_FILE)
    with conn:
        conn.execute(statement, args)
    conn.close()


def _node(server: Path, name: str) -> int:
    entry = next(e for e in Registry.open(server).all() if e.name == name)
    assert entry.node_id is not None
    return entry.node_id - (1 << 64) if entry.node_id >= _INT64 else entry.node_id


def test_the_untouched_state_is_accepted(server: Path) -> None:
    found = check_state(server, CONFIG)
    assert found.exists and found.warnings == ()


def test_no_state_file_is_a_new_one_and_asks_for_the_enrolled_devices(server: Path) -> None:
    (server / STATE_FILE).unlink()
    found = check_state(server, CONFIG)
    assert not found.exists
    assert needs_reregistering(server, CONFIG)
    assert not needs_reregistering(server, replace(CONFIG, insecure=True, supernode_auth=False))


@pytest.mark.parametrize("damage, phrase", [
    (lambda raw: b"", "empty or cut short"),
    (lambda raw: raw[: len(raw) // 2], "SQLite"),
    (lambda raw: b"not a database at all " * 100, "SQLite cannot read it"),
    (lambda raw: raw[:100] + bytes(len(raw) - 100), "damaged"),
], ids=["emptied", "cut in half", "garbage", "pages zeroed"])
def test_a_damaged_file_is_refused(server: Path, damage, phrase: str) -> None:  # type: ignore[no-untyped-def]
    db = server / STATE_FILE
    db.write_bytes(damage(db.read_bytes()))
    _refused(server, "is damaged", phrase)


def test_a_valid_database_that_is_not_flowers_is_refused(server: Path) -> None:
    (server / STATE_FILE).unlink()
    _sql(server, "CREATE TABLE notes (x)")
    _refused(server, "not a Flower SuperLink state", "alembic_version")


def test_a_revoked_device_set_back_to_registered_is_refused(server: Path) -> None:
    _sql(server, "UPDATE node SET status = 'registered' WHERE node_id = ?",
         _node(server, "carol-laptop"))
    _refused(server, "carol-laptop", "was revoked", "would be admitted again")


def test_an_enrolled_devices_key_swapped_is_refused(server: Path) -> None:
    _, other = _new_key()
    _sql(server, "UPDATE node SET public_key = ? WHERE node_id = ?", other,
         _node(server, "alice-laptop"))
    _refused(server, "alice-laptop", "another SuperNode key")


@pytest.mark.parametrize("statement, phrase", [
    ("DELETE FROM node WHERE node_id = ?", "has no such node"),
    ("UPDATE node SET status = 'unregistered' WHERE node_id = ?", "'unregistered'"),
    ("UPDATE node SET status = 'trusted' WHERE node_id = ?", "'trusted'"),
    ("UPDATE node SET node_id = node_id + 1 WHERE node_id = ?", "has no such node"),
])
def test_an_enrolled_devices_node_removed_or_changed_is_refused(
    server: Path, statement: str, phrase: str,
) -> None:
    _sql(server, statement, _node(server, "bob-laptop"))
    _refused(server, "bob-laptop", phrase)


def test_a_node_keystay_never_enrolled_is_a_warning(server: Path) -> None:
    _, pem = _new_key()
    _sql(server, "INSERT INTO node (node_id, owner_aid, owner_name, status, public_key) "
         "VALUES (42, 'none', 'none', 'registered', ?)", pem)
    found = check_state(server, CONFIG)
    assert found.exists
    (warning,) = found.warnings
    assert "42" in warning and "did not enroll" in warning


def test_an_insecure_server_checks_the_file_not_the_nodes(server: Path) -> None:
    insecure = replace(CONFIG, insecure=True, supernode_auth=False)
    _sql(server, "DELETE FROM node")
    assert check_state(server, insecure).exists
    (server / STATE_FILE).write_bytes(b"garbage" * 10)
    with pytest.raises(SuperLinkStateError):
        check_state(server, insecure)


def test_server_start_refuses_a_damaged_state_with_its_exit_code_and_no_traceback(
    tmp_path: Path,
) -> None:
    """A real ``keystay server start``: exit 26, one sentence naming the file, nothing started."""
    server = tmp_path / "server"
    init = subprocess.run(
        [executable("keystay"), "server", "init", "--dir", str(server), "--fleet-address",
         "127.0.0.1:1", "--control-port", "2", "--host", "127.0.0.1"],
        capture_output=True, text=True, env=flower_env(), timeout=120, check=False)
    assert init.returncode == 0, init.stderr
    db = server / STATE_FILE
    db.write_bytes(b"\x00garbage\xff" * 500)
    done = subprocess.run([executable("keystay"), "server", "start", "--dir", str(server)],
                          capture_output=True, text=True, env=flower_env(), timeout=120,
                          check=False)
    assert done.returncode == ExitCode.SERVER_SUPERLINK_STATE, done.stderr
    assert f"{db} is damaged" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "ready" not in done.stdout
    assert not (server / "logs" / "superlink.out").exists()  # the SuperLink never ran
    assert db.read_bytes() == b"\x00garbage\xff" * 500
