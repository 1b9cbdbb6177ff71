"""Enrolling devices: who may join the federation, and taking that back.

A device asks to join with one file, written by ``keystay device enroll``
(format ``keystay-enrollment/2``)::

    {"format": "keystay-enrollment/2",
     "device_id": "dev-…",                       # names the signing key (see below)
     "signing_public_key_pem": "-----BEGIN PUBLIC KEY-----…",   # Ed25519, signs privacy reports
     "supernode_public_key": "ecdsa-sha2-nistp384 AAAA…",        # Flower node authentication
     "created": "2026-11-23T12:00:00Z",
     "proof": {"signing": "<base64 Ed25519 signature>",
               "supernode": "<base64 ECDSA-SHA384 signature>"}}

Both signatures are over the canonical JSON of every field except ``proof``
(keys sorted, separators ``,`` ``:``, ASCII): they show the requester holds
both private keys, so nobody can enroll a key pair they do not own (for
instance to squat another device's id). The *fingerprint* is the first 80 bits
of SHA-256 over the same bytes; the employee reads it out from their screen,
the operator compares it with ``keystay server enroll`` output (or passes it as
``--fingerprint``), which binds the file to the person across whatever channel
carried it.

``keystay-enrollment/1`` (the daemon's ``enrollment.json``: id and signing key
only) is accepted by an insecure server only: it has no SuperNode key, so it
cannot be admitted to a SuperLink that authenticates nodes.

Enrolling registers the SuperNode key with the SuperLink through the flwr CLI
(``flwr supernode register KEY.pub keystay``, FLWR_HOME from the server folder,
over TLS to the Control API) and records the signing key in the server ledger.
Revoking unregisters the node (the SuperLink then refuses the key for good;
Flower keeps unregistered keys) and marks the device revoked in the ledger. A
revoked device is never admitted again (the ledger's rule too): the computer
comes back only as a new identity.

This module keeps its own small registry, ``DIR/enrollments.v1.sqlite``,
mapping device ids to SuperLink node ids and keys; the server ledger stays the
record of privacy reports.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keystay.common.canonical import canonical_json
from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.fingerprints import device_id_for, fingerprint
from keystay.server.deploy.superlink import (
    FEDERATION_NAME,
    ServerConfig,
    executable,
    flower_env,
)

FORMAT_V1 = "keystay-enrollment/1"
FORMAT_V2 = "keystay-enrollment/2"
REGISTRY_FILE = "enrollments.v1.sqlite"
KEYS_DIR = "enrolled"
# The NIST curves Flower accepts for node authentication.
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
FLWR_TIMEOUT_S = 60.0


class EnrollmentError(KeystayError, ValueError):
    """A request or an operation the server refuses; the message says why and what to do."""

    exit_code = ExitCode.SERVER_ENROLL_REFUSED


class SuperLinkUnavailableError(KeystayError, RuntimeError):
    """The flwr CLI could not reach the SuperLink's Control API."""

    exit_code = ExitCode.SERVER_SUPERLINK_DOWN


@dataclass(frozen=True)
class EnrollmentRequest:
    """A verified enrollment request. Build it with :meth:`parse` or :meth:`load` only."""

    format: str
    device_id: str
    signing_public_key_pem: str
    supernode_public_key: str | None
    created: str | None
    fingerprint: str

    @classmethod
    def load(cls, path: Path) -> EnrollmentRequest:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise EnrollmentError(f"{path} is not a readable JSON enrollment request ({error})") \
                from error
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: Any, source: str = "request") -> EnrollmentRequest:
        """Check the format, that the device id names the signing key, and both proofs.

        Raises
        ------
        EnrollmentError
            Naming the first thing wrong with the request.
        """
        if not isinstance(data, dict):
            raise EnrollmentError(f"{source} is not a keystay enrollment request (not an object)")
        form = data.get("format")
        if form not in (FORMAT_V1, FORMAT_V2):
            raise EnrollmentError(
                f"{source} is not a keystay enrollment request (format {form!r}); the device "
                "writes one with 'keystay device enroll'"
            )
        expected = {"format", "device_id", "signing_public_key_pem"}
        if form == FORMAT_V2:
            expected |= {"supernode_public_key", "created", "proof"}
        missing = sorted(expected - set(data))
        if missing:
            raise EnrollmentError(f"{source}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - expected)
        if unknown:
            raise EnrollmentError(f"{source}: unknown field(s) {', '.join(unknown)}")
        signing_key = _load_signing_key(data["signing_public_key_pem"], source)
        device_id = device_id_for(signing_key)
        if data["device_id"] != device_id:
            raise EnrollmentError(
                f"{source}: device_id {data['device_id']!r} does not match its signing key "
                f"(which names {device_id}); the file was altered or mixed from two devices"
            )
        try:
            payload = canonical_json({k: v for k, v in data.items() if k != "proof"})
        except ValueError as error:  # NaN or infinity: JSON a device never signs
            raise EnrollmentError(
                f"{source}: a field holds a number JSON cannot carry ({error}); the file "
                "was altered after the device wrote it"
            ) from error
        supernode_key: str | None = None
        if form == FORMAT_V2:
            supernode_key = str(data["supernode_public_key"]).strip()
            node_key = load_supernode_public_key(supernode_key, source)
            proof = data["proof"]
            if not isinstance(proof, dict) or set(proof) != {"signing", "supernode"}:
                raise EnrollmentError(f"{source}: proof must hold 'signing' and 'supernode'")
            try:
                signing_sig = base64.b64decode(proof["signing"], validate=True)
                node_sig = base64.b64decode(proof["supernode"], validate=True)
            except (ValueError, TypeError) as error:
                raise EnrollmentError(f"{source}: proof is not base64 ({error})") from error
            try:
                signing_key.verify(signing_sig, payload)
            except InvalidSignature as error:
                raise EnrollmentError(
                    f"{source}: the signing-key proof does not verify; the file was altered "
                    "after the device wrote it. Ask for a fresh one ('keystay device enroll')"
                ) from error
            try:
                node_key.verify(node_sig, payload, ec.ECDSA(hashes.SHA384()))
            except InvalidSignature as error:
                raise EnrollmentError(
                    f"{source}: the SuperNode-key proof does not verify; the file was altered "
                    "after the device wrote it. Ask for a fresh one ('keystay device enroll')"
                ) from error
        return cls(
            format=form,
            device_id=device_id,
            signing_public_key_pem=data["signing_public_key_pem"],
            supernode_public_key=supernode_key,
            created=data.get("created"),
            fingerprint=fingerprint(payload),
        )


def _load_signing_key(pem: Any, source: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(str(pem).encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as error:
        raise EnrollmentError(f"{source}: signing_public_key_pem is not a PEM public key "
                              f"({error})") from error
    if not isinstance(key, Ed25519PublicKey):
        raise EnrollmentError(f"{source}: the signing key is a {type(key).__name__}, "
                              "not Ed25519")
    return key


def load_supernode_public_key(text: str, source: str = "key") -> ec.EllipticCurvePublicKey:
    """Parse an OpenSSH EC public key on a NIST curve (what Flower's node auth accepts)."""
    try:
        key = serialization.load_ssh_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as error:
        raise EnrollmentError(f"{source}: supernode_public_key is not an OpenSSH public key "
                              f"({error})") from error
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise EnrollmentError(f"{source}: the SuperNode key must be an EC key on a NIST curve "
                              "(Flower node authentication); got "
                              f"{getattr(getattr(key, 'curve', None), 'name', type(key).__name__)}")
    return key


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Enrollment:
    """One row of the registry."""

    device_id: str
    name: str
    node_id: int | None
    supernode_public_key: str | None
    signing_public_key_pem: str
    fingerprint: str
    enrolled_at: str
    revoked_at: str | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollment (
    device_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    node_id TEXT,                       -- uint64 as text: SQLite integers are signed
    supernode_public_key TEXT,
    signing_public_key_pem TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    enrolled_at TEXT NOT NULL,
    revoked_at TEXT
);
"""


class Registry:
    """``DIR/enrollments.v1.sqlite``: device id -> SuperLink node id, keys, state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @classmethod
    def open(cls, server_dir: Path) -> Registry:
        return cls(server_dir / REGISTRY_FILE)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def get(self, device_id: str) -> Enrollment | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM enrollment WHERE device_id = ?",
                             (device_id,)).fetchone()
        return _row(row) if row else None

    def all(self) -> list[Enrollment]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM enrollment ORDER BY enrolled_at").fetchall()
        return [_row(r) for r in rows]

    def put(self, entry: Enrollment) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO enrollment VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.device_id, entry.name,
                 None if entry.node_id is None else str(entry.node_id),
                 entry.supernode_public_key, entry.signing_public_key_pem, entry.fingerprint,
                 entry.enrolled_at, entry.revoked_at),
            )

    def mark_revoked(self, device_id: str, when: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE enrollment SET revoked_at = ? WHERE device_id = ? "
                       "AND revoked_at IS NULL", (when, device_id))


def _row(row: tuple[Any, ...]) -> Enrollment:
    return Enrollment(
        device_id=row[0], name=row[1], node_id=None if row[2] is None else int(row[2]),
        supernode_public_key=row[3], signing_public_key_pem=row[4], fingerprint=row[5],
        enrolled_at=row[6], revoked_at=row[7],
    )


# --------------------------------------------------------------------------- flwr CLI


class FlwrControl:
    """The SuperLink's Control API through the ``flwr`` CLI, as its docs describe.

    Uses the server folder's FLWR_HOME (TLS with the folder's CA, or
    ``insecure = true`` for an insecure server).
    """

    def __init__(self, server_dir: Path, config: ServerConfig,
                 timeout: float = FLWR_TIMEOUT_S) -> None:
        self.server_dir = server_dir
        self.config = config
        self.timeout = timeout
        self.home = config.write_flwr_home(server_dir)

    def _flwr(self, *args: str, group: tuple[str, ...] = ("supernode",)) -> dict[str, Any]:
        cmd = [executable("flwr"), *group, *args, "--format", "json"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True,
                                    env=flower_env(self.home), timeout=self.timeout,
                                    check=False)
        except subprocess.TimeoutExpired as error:
            raise SuperLinkUnavailableError(
                f"flwr {' '.join(args[:1])} did not answer within {self.timeout:.0f} s; is the "
                f"SuperLink running ('keystay server start --dir {self.server_dir}')?"
            ) from error
        data = _last_json(result.stdout)
        if result.returncode == 0 and data is not None and data.get("success"):
            return data
        detail = (data or {}).get("error-message") if data else None
        detail = detail or (result.stderr or result.stdout).strip()[-600:]
        lowered = detail.lower()
        if any(s in lowered for s in ("connect", "unavailable", "refused", "timed out")):
            raise SuperLinkUnavailableError(
                f"cannot reach the SuperLink's Control API at {self.config.control_address}: "
                f"{detail}. Start it with 'keystay server start --dir {self.server_dir}'"
            )
        raise EnrollmentError(f"flwr {' '.join(group)} {args[0]} failed: {detail}")

    def register(self, public_key_file: Path, name: str) -> int:
        data = self._flwr("register", str(public_key_file), FEDERATION_NAME, "--name", name)
        return int(data["node-id"])

    def unregister(self, node_id: int) -> None:
        self._flwr("unregister", str(node_id), FEDERATION_NAME)

    def nodes(self) -> dict[int, dict[str, Any]]:
        """node id -> ``{"status": "online"|"offline"|"registered"|"unregistered", …}``."""
        data = self._flwr("list", FEDERATION_NAME)
        return {int(n["node-id"]): n for n in data.get("nodes", [])}

    def run_status(self, run_id: int) -> str:
        """The SuperLink's status of a run (``running``, ``finished:completed``, …)."""
        data = self._flwr(FEDERATION_NAME, "--run-id", str(run_id), group=("ls",))
        runs = data.get("runs", [])
        if not runs:
            raise EnrollmentError(f"the SuperLink knows no run {run_id}")
        return str(runs[0].get("status", ""))


def _last_json(text: str) -> dict[str, Any] | None:
    """The JSON object the flwr CLI prints with ``--format json`` (after any progress lines)."""
    start = text.find("{")
    while start != -1:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


# --------------------------------------------------------------------------- ledger


def _ledger_enroll(server_dir: Path, device_id: str, signing_pem: str, name: str) -> None:
    """Trust the signing key in the server ledger (it refuses revoked ids and key changes)."""
    from keystay.server.ledger.ledger import ServerLedger, ServerLedgerError

    try:
        with ServerLedger.open(server_dir) as ledger:
            ledger.enroll_device(device_id, signing_pem, name)
    except ServerLedgerError as error:
        raise EnrollmentError(f"the server ledger refused {device_id}: {error}") from error


def _ledger_revoke(server_dir: Path, device_id: str) -> None:
    from keystay.server.ledger.ledger import ServerLedger

    with ServerLedger.open(server_dir) as ledger:
        if ledger.device(device_id) is not None:
            ledger.revoke_device(device_id)


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class EnrollOutcome:
    entry: Enrollment
    already: bool


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def enroll(server_dir: Path, request: EnrollmentRequest, *, name: str | None = None,
           expect_fingerprint: str | None = None) -> EnrollOutcome:
    """Admit a device: record its signing key, register its SuperNode key with the SuperLink.

    The ledger comes first (it refuses revoked ids and changed keys, and is
    idempotent), then the SuperLink, then the registry: a failure part-way
    leaves nothing that admits the device, and running enroll again finishes.

    Raises
    ------
    EnrollmentError
        Fingerprint mismatch, a revoked device (never admitted again: the
        device must make a new identity), a device already enrolled with
        different keys, a v1 request on a server that authenticates nodes, or
        a key the SuperLink refuses.
    SuperLinkUnavailableError
        The SuperLink is not running.
    """
    config = ServerConfig.load(server_dir)
    if expect_fingerprint is not None and \
            _norm_fp(expect_fingerprint) != _norm_fp(request.fingerprint):
        raise EnrollmentError(
            f"fingerprint mismatch: the request shows {request.fingerprint}, you expected "
            f"{expect_fingerprint}. Do not enroll it: the file is not the one the employee made"
        )
    registry = Registry.open(server_dir)
    label = name or request.device_id
    existing = registry.get(request.device_id)
    if existing is not None:
        if existing.revoked:
            raise EnrollmentError(
                f"{request.device_id} ({existing.name}) was revoked on {existing.revoked_at} and "
                "is never admitted again. To bring the computer back, on it delete "
                "DATA/signing.key (a new identity) and run 'keystay device enroll --new-key'"
            )
        same = (existing.supernode_public_key == request.supernode_public_key
                and existing.signing_public_key_pem.strip()
                == request.signing_public_key_pem.strip())
        if same:
            return EnrollOutcome(existing, already=True)
        raise EnrollmentError(
            f"{request.device_id} is already enrolled (as {existing.name}) with a different "
            f"SuperNode key; revoke it first ('keystay server revoke --dir {server_dir} "
            f"{request.device_id}') if the device really changed its key"
        )
    if request.supernode_public_key is None and config.supernode_auth and not config.insecure:
        raise EnrollmentError(
            f"this request ({FORMAT_V1}) holds no SuperNode key, and this server admits only "
            "authenticated SuperNodes. On the device run 'keystay device enroll --server "
            f"{config.fleet_address} --ca CA.pem' and enroll the file it writes"
        )

    _ledger_enroll(server_dir, request.device_id, request.signing_public_key_pem, label)
    node_id: int | None = None
    if request.supernode_public_key is not None:
        keys = server_dir / KEYS_DIR
        keys.mkdir(exist_ok=True)
        pub = keys / f"{request.device_id}.pub"
        pub.write_text(request.supernode_public_key + "\n")
        node_id = FlwrControl(server_dir, config).register(pub, label)
    entry = Enrollment(
        device_id=request.device_id, name=label, node_id=node_id,
        supernode_public_key=request.supernode_public_key,
        signing_public_key_pem=request.signing_public_key_pem,
        fingerprint=request.fingerprint, enrolled_at=_now(), revoked_at=None,
    )
    registry.put(entry)
    return EnrollOutcome(entry, already=False)


def _norm_fp(text: str) -> str:
    return "".join(c for c in text.lower() if c in "0123456789abcdef")


@dataclass(frozen=True)
class RevokeOutcome:
    entry: Enrollment
    unregistered: bool


def find(registry: Registry, who: str) -> Enrollment:
    """A device by id, by name, or by SuperLink node id."""
    entry = registry.get(who)
    if entry is not None:
        return entry
    matches = [e for e in registry.all() if e.name == who or str(e.node_id) == who]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise EnrollmentError(f"{who!r} names {len(matches)} devices; use the device id")
    raise EnrollmentError(f"no enrolled device is called {who!r}; see 'keystay server devices'")


def revoke(server_dir: Path, who: str) -> RevokeOutcome:
    """Take a device out: the ledger first (its reports stop counting), then the SuperLink.

    Idempotent: a second call finishes a revocation the SuperLink missed
    (it was down), and otherwise changes nothing.

    Raises
    ------
    EnrollmentError
        Unknown device.
    SuperLinkUnavailableError
        The SuperLink could not be told. The device is revoked in the
        registry and ledger already; run revoke again once the SuperLink runs,
        because until then the SuperLink still admits its key.
    """
    config = ServerConfig.load(server_dir)
    registry = Registry.open(server_dir)
    entry = find(registry, who)
    # The ledger first: it is what makes the device's reports stop counting,
    # and a ledger that cannot be opened must leave the registry unchanged
    # (the command then says nothing was revoked, and that is true).
    _ledger_revoke(server_dir, entry.device_id)
    if not entry.revoked:
        registry.mark_revoked(entry.device_id, _now())
    unregistered = False
    if entry.node_id is not None:
        control = FlwrControl(server_dir, config)
        status = control.nodes().get(entry.node_id, {}).get("status")
        if status not in (None, "unregistered"):
            control.unregister(entry.node_id)
        unregistered = True
    after = registry.get(entry.device_id)
    assert after is not None
    return RevokeOutcome(after, unregistered=unregistered)


@dataclass(frozen=True)
class DeviceState:
    """What ``keystay server devices`` shows for one device."""

    device_id: str
    name: str
    node_id: int | None
    status: str  # online | offline | registered (never connected) | unregistered | revoked | ?
    enrolled_at: str
    revoked_at: str | None
    fingerprint: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "name": self.name,
            "node_id": None if self.node_id is None else str(self.node_id),
            "status": self.status, "online": self.status == "online",
            "revoked": self.revoked_at is not None, "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at, "fingerprint": self.fingerprint,
        }


def device_states(server_dir: Path) -> tuple[list[DeviceState], str | None]:
    """Every enrolled device with its SuperLink status; ``(rows, problem)``.

    ``problem`` says why the live status is unknown (SuperLink down); rows
    then show status ``"?"`` for devices not revoked.
    """
    config = ServerConfig.load(server_dir)
    entries = Registry.open(server_dir).all()
    problem = None
    nodes: dict[int, dict[str, Any]] = {}
    if any(e.node_id is not None for e in entries):
        try:
            nodes = FlwrControl(server_dir, config).nodes()
        except (SuperLinkUnavailableError, EnrollmentError) as error:
            problem = str(error)
    rows = []
    for e in entries:
        if e.node_id is None:
            status = "revoked" if e.revoked else "no-node-key"
        elif problem is not None:
            status = "revoked" if e.revoked else "?"
        else:
            status = str(nodes.get(e.node_id, {}).get("status", "missing"))
            if e.revoked and status == "unregistered":
                status = "revoked"
            elif e.revoked:
                # Revoked here but still admitted by the SuperLink: say so loudly.
                status = f"revoked-but-{status}"
        rows.append(DeviceState(e.device_id, e.name, e.node_id, status, e.enrolled_at,
                                e.revoked_at, e.fingerprint))
    return rows, problem
