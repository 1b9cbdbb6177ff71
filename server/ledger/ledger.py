"""The server's ledger: every device privacy report, verified, plus refusals and central DP.

What it is for
--------------
Devices enforce their own budgets; the server cannot change them. What the
server *can* do is keep an append-only record that lets a security reviewer
check, later and without trusting the ML team, what every device says it
spent:

* each report is stored with its exact signed bytes and Ed25519 signature,
  so anyone with the device's enrolled public key can re-check that no figure
  was altered in transit or at rest (:meth:`ServerLedger.audit` does this);
* each report gets a verdict when it arrives (:class:`Verdict`), with flags
  (:data:`FLAG_UNVERIFIABLE`, :data:`FLAG_CONTRADICTION`,
  :data:`FLAG_OVER_BUDGET`) that the budget report lists first;
* refusals (a device's policy declining a round, with its reason) and the
  central-DP accountant's ε per round are kept beside them. Only policy
  refusals are refusals: a device that could not be reached or failed spent
  nothing the server can see, and the ServerApp keeps it in the round's row
  (``unavailable`` / ``failed``), not here.

Verdict rules
-------------
``verified`` is True when the report is authentically *this* device's report
for *this* round: the signature verifies under the key enrolled for the
device it names (not revoked), the payload is canonical
``keystay.privacy-report.v1`` JSON whose ``device_id`` is the id of that key,
all required fields are present and well-formed, and its ``run_id`` and
``server_round`` are the ones the server sent. Otherwise the report is
flagged ``unverifiable`` and nothing in it is trusted or counted.
(``signature_valid`` tells "bad signature" apart from "good signature on the
wrong round", which is a replay.)

A verified report is then checked against the device's earlier verified
reports and itself:

* ``contradiction``: a block's ε, or the device total, is smaller than in an
  earlier verified report (budgets are spent in one direction only); a block
  that retired earlier is charged again; the device total is below one of its
  own block figures; the device already reported for this run and round; or
  the report arrived from a device other than the one it names.
* ``over-budget``: a block's ε exceeds that block's budget.

Storage
-------
``SERVER_DIR/ledger.v1.sqlite`` (format version in the name and in
``PRAGMA user_version``), WAL, mode 0600. It holds pseudonymous device ids,
public keys, ε figures and mechanisms: never event data (there is none on
the server). Rows are only ever inserted (revocation sets ``revoked_at``).

This module never imports the device's store, capture, daemon, ledger,
policy or identity code; the canonical form and the signature check live in
:mod:`keystay.server.ledger.verify`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.files import ensure_private, out_of_space
from keystay.common.sqlite import ForeignFileError, FormatVersionError, open_versioned
from keystay.server.ledger.audit import audit_reports
from keystay.server.ledger.records import (
    FLAG_CONTRADICTION,
    FLAG_OVER_BUDGET,
    FLAG_UNVERIFIABLE,
    FLAGS,
    REQUIRED_BLOCK_FIELDS,
    REQUIRED_FIELDS,
    AuditFinding,
    BlockEpsilon,
    CentralDPRecord,
    Device,
    Finding,
    RefusalRecord,
    StoredReport,
    Verdict,
    flags_of,
)
from keystay.server.ledger.rules import check_day_fields, check_fields, history_findings
from keystay.server.ledger.verify import (
    ReportVerificationError,
    device_id_from_public_key,
    load_public_key,
    verified_report,
    verify_report,
)

LEDGER_FILE = "ledger.v1.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,          -- pseudonymous: 'dev-' + sha256(public key)[:12]
    name TEXT NOT NULL DEFAULT '',
    signing_public_key_pem TEXT NOT NULL,
    enrolled_at TEXT NOT NULL,           -- ISO 8601, UTC
    revoked_at TEXT                      -- reports received after this are unverifiable
);
CREATE TABLE reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT, -- report order
    received_at TEXT NOT NULL,
    run_id TEXT NOT NULL,                -- as the server sent it (not as the payload claims)
    server_round INTEGER NOT NULL,
    device_id TEXT NOT NULL,             -- as the payload names it ('' if unreadable)
    node_id TEXT,                        -- Flower node the reply came from, if known
    payload_json TEXT NOT NULL,          -- the exact signed bytes (canonical JSON is ASCII)
    signature BLOB NOT NULL,
    signature_valid INTEGER NOT NULL,
    verified INTEGER NOT NULL,
    epsilon_total REAL,                  -- the payload's device total, when verified
    flags TEXT NOT NULL,                 -- JSON list, sorted
    findings TEXT NOT NULL               -- JSON list of {"flag", "detail", "block"}
);
CREATE INDEX reports_device ON reports (device_id, id);
CREATE INDEX reports_run ON reports (run_id, server_round);
CREATE TABLE block_epsilons (
    report_id INTEGER NOT NULL REFERENCES reports (id),
    device_id TEXT NOT NULL,
    block TEXT NOT NULL,
    epsilon REAL NOT NULL,               -- enforced, cumulative after the report's charge
    budget REAL NOT NULL,
    retired INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    PRIMARY KEY (report_id, block)
);
CREATE INDEX block_epsilons_device ON block_epsilons (device_id, block, report_id);
CREATE TABLE refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    device TEXT NOT NULL,                -- node id or device id
    reason TEXT NOT NULL
);
CREATE TABLE central_dp (
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    clip REAL NOT NULL,
    sample_rate REAL NOT NULL,
    sampling TEXT NOT NULL,
    epsilon REAL NOT NULL,               -- cumulative over the run after this round
    delta REAL NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (run_id, server_round)
);
"""


# The rows, flags and rules live in records/rules/audit; they are re-exported
# here because this module is the ledger's public face.
__all__ = [
    "FLAGS", "FLAG_CONTRADICTION", "FLAG_OVER_BUDGET", "FLAG_UNVERIFIABLE", "LEDGER_FILE",
    "REQUIRED_BLOCK_FIELDS", "REQUIRED_FIELDS", "AuditFinding", "BlockEpsilon",
    "CentralDPRecord", "Device", "Finding", "LedgerEnrollmentError", "LedgerNotFoundError",
    "RefusalRecord", "ServerLedger", "ServerLedgerError", "StoredReport", "Verdict", "flags_of",
]


class ServerLedgerError(KeystayError, RuntimeError):
    """The server ledger cannot be opened or a write is not allowed."""

    exit_code = ExitCode.SERVER_LEDGER


class LedgerNotFoundError(ServerLedgerError):
    """No ledger exists in the folder given (and the caller asked not to create one)."""


class LedgerEnrollmentError(ServerLedgerError):
    """A device cannot be enrolled or revoked as asked."""

    exit_code = ExitCode.SERVER_ENROLL_REFUSED


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class ServerLedger:
    """The server's record of device privacy reports. Thread-safe; one SQLite file.

    Use :meth:`open`. Every write is one transaction, so a report and its
    block rows are stored together or not at all.
    """

    def __init__(
        self, conn: sqlite3.Connection, path: Path, clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self._conn = conn
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()

    # --- opening --------------------------------------------------------------

    @classmethod
    def open(
        cls,
        server_dir: Path,
        *,
        create: bool = True,
        clock: Callable[[], datetime] = _utc_now,
    ) -> ServerLedger:
        """Open ``server_dir/ledger.v1.sqlite``.

        Parameters
        ----------
        server_dir : Path
            The server folder (``--server-dir``).
        create : bool
            Create the folder and an empty ledger when missing. Readers
            (``keystay budget``) pass False, so a mistyped folder is an error
            instead of an empty, "clean" report.
        clock : callable
            Returns the current time (tests pin it).

        Raises
        ------
        LedgerNotFoundError
            ``create`` is False and there is no ledger.
        ServerLedgerError
            The file is not a keystay server ledger of this format version.
        """
        server_dir = Path(server_dir)
        path = server_dir / LEDGER_FILE
        if not path.exists():
            if not create:
                raise LedgerNotFoundError(
                    f"no server ledger at {path}; check --server-dir (it is the folder "
                    "'keystay round start' used, which holds ledger.v1.sqlite)"
                )
            server_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            ensure_private(path)
        try:
            conn = open_versioned(path, version=SCHEMA_VERSION, schema=_SCHEMA)
        except ForeignFileError as error:
            raise ServerLedgerError(
                f"{path} has tables but no format version; it is not a keystay "
                "server ledger. Move it aside and point --server-dir at the "
                "right folder"
            ) from error
        except FormatVersionError as error:
            raise ServerLedgerError(
                f"{path} is server ledger format {error.found}; this keystay reads format "
                f"{SCHEMA_VERSION}. Upgrade keystay; do not delete the ledger (it is "
                "the audit record)"
            ) from error
        except sqlite3.DatabaseError as error:
            raise ServerLedgerError(
                f"{path} cannot be read as a server ledger ({error})"
            ) from error
        return cls(conn, path, clock)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ServerLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _now(self) -> str:
        return _iso(self._clock())

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turn a write that SQLite could not make into a :class:`ServerLedgerError`.

        Every write is one statement or one transaction, so a failed one
        stored nothing: the message says so, and which write it was.
        """
        try:
            yield
        except sqlite3.OperationalError as error:
            cause = "the server's disk is full" if out_of_space(error) else str(error)
            raise ServerLedgerError(
                f"the server ledger {self.path} could not store the {what}: {cause}; nothing "
                "of it was stored, and what the ledger held before is unchanged"
            ) from error

    # --- devices --------------------------------------------------------------

    def enroll_device(self, device_id: str, public_key_pem: str, name: str = "") -> Device:
        """Trust ``public_key_pem`` as the report-signing key of ``device_id``.

        Enrolling the same device with the same key again only updates its
        name (idempotent).

        Raises
        ------
        LedgerEnrollmentError
            The PEM is not an Ed25519 public key; ``device_id`` is not the id
            of that key (ids are derived from keys, so a mismatch means the
            wrong key or a typo); the device is enrolled with another key; or
            it was revoked (a revoked key is never trusted again: the device
            must create a new identity, which gets a new id).
        """
        try:
            load_public_key(public_key_pem)
            expected = device_id_from_public_key(public_key_pem)
        except (ValueError, TypeError) as error:
            raise LedgerEnrollmentError(
                f"cannot enroll {device_id!r}: the key given is not an Ed25519 public key in "
                f"PEM form ({error}); copy it from 'keystay device status' on the device"
            ) from error
        if device_id != expected:
            raise LedgerEnrollmentError(
                f"cannot enroll {device_id!r}: that key belongs to device id {expected!r}. "
                "Device ids are derived from the key; enroll the id the device shows"
            )
        with self._lock:
            existing = self.device(device_id)
            if existing is not None:
                if existing.revoked:
                    raise LedgerEnrollmentError(
                        f"device {device_id} was revoked at {existing.revoked_at}; a revoked "
                        "key is never trusted again. Delete the device's signing.key so it "
                        "creates a new identity, then enroll that"
                    )
                if existing.signing_public_key_pem.strip() != public_key_pem.strip():
                    raise LedgerEnrollmentError(
                        f"device {device_id} is already enrolled with a different key; "
                        "revoke it first"
                    )
                self._conn.execute(
                    "UPDATE devices SET name = ? WHERE device_id = ?", (name, device_id)
                )
            else:
                self._conn.execute(
                    "INSERT INTO devices (device_id, name, signing_public_key_pem, enrolled_at) "
                    "VALUES (?, ?, ?, ?)",
                    (device_id, name, public_key_pem, self._now()),
                )
            device = self.device(device_id)
        assert device is not None
        return device

    def revoke_device(self, device_id: str) -> Device:
        """Stop trusting ``device_id``'s key for reports received from now on.

        Reports already received keep their verdicts. Revoking twice keeps the
        first time.

        Raises
        ------
        LedgerEnrollmentError
            No such device is enrolled.
        """
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE devices SET revoked_at = coalesce(revoked_at, ?) WHERE device_id = ?",
                (self._now(), device_id),
            )
            if cursor.rowcount == 0:
                raise LedgerEnrollmentError(
                    f"no enrolled device {device_id!r}; list devices with ServerLedger.devices()"
                )
            device = self.device(device_id)
        assert device is not None
        return device

    def devices(self) -> list[Device]:
        """Every enrolled device (revoked ones too), by id."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT device_id, name, signing_public_key_pem, enrolled_at, revoked_at "
                "FROM devices ORDER BY device_id"
            ).fetchall()
        return [Device(*row) for row in rows]

    def device(self, device_id: str) -> Device | None:
        """One enrolled device, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT device_id, name, signing_public_key_pem, enrolled_at, revoked_at "
                "FROM devices WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        return Device(*row) if row else None

    # --- reports --------------------------------------------------------------

    def record_report(
        self,
        run_id: str,
        server_round: int,
        payload_json: str | bytes,
        signature: bytes,
        *,
        node_id: str | int | None = None,
        sender_device_id: str | None = None,
    ) -> Verdict:
        """Verify and store one device's privacy report; return the verdict.

        Call once per training reply, before aggregating, and aggregate the
        update only when ``verdict.ok`` (verified and unflagged). Never raises
        for a bad report: a bad report is recorded and flagged, because the
        record of it is what security needs.

        Parameters
        ----------
        run_id, server_round : str, int
            The run and round the server sent (the payload must name them).
        payload_json : str or bytes
            The report's canonical JSON exactly as the device signed it.
        signature : bytes
            Ed25519 signature over ``payload_json``.
        node_id : str or int, optional
            Flower node the reply came from, kept for the record.
        sender_device_id : str, optional
            The device the transport says sent it (e.g. from node
            enrollment); a payload naming another device is a contradiction.

        Returns
        -------
        Verdict

        Raises
        ------
        ServerLedgerError
            The ledger cannot be written (the disk is full, say). Nothing of
            the report is stored: its row and its block rows are one
            transaction, rolled back.
        """
        payload_bytes = (
            payload_json.encode("utf-8") if isinstance(payload_json, str) else bytes(payload_json)
        )
        payload_text = payload_bytes.decode("utf-8", errors="backslashreplace")
        signature = bytes(signature)
        findings: list[Finding] = []
        with self._lock, self._writing(f"report of run {run_id} round {int(server_round)}"):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                claimed, payload, signature_valid = self._authenticate(
                    run_id, server_round, payload_bytes, signature, findings
                )
                verified = payload is not None and not findings
                if verified and payload is not None:
                    self._check_history(claimed, run_id, server_round, payload, findings)
                    if sender_device_id is not None and sender_device_id != claimed:
                        findings.append(
                            Finding(
                                FLAG_CONTRADICTION,
                                f"report names device {claimed} but arrived from device "
                                f"{sender_device_id}",
                            )
                        )
                flags = flags_of(findings)
                cursor = self._conn.execute(
                    "INSERT INTO reports (received_at, run_id, server_round, device_id, node_id, "
                    "payload_json, signature, signature_valid, verified, epsilon_total, flags, "
                    "findings) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        self._now(),
                        run_id,
                        int(server_round),
                        claimed,
                        None if node_id is None else str(node_id),
                        payload_text,
                        signature,
                        int(signature_valid),
                        int(verified),
                        float(payload["epsilon_total"]) if verified and payload else None,
                        json.dumps(list(flags)),
                        json.dumps([f.as_dict() for f in findings]),
                    ),
                )
                report_id = int(cursor.lastrowid or 0)
                if verified and payload is not None:
                    for entry in payload["blocks"]:
                        self._conn.execute(
                            "INSERT INTO block_epsilons (report_id, device_id, block, epsilon, "
                            "budget, retired, run_id, server_round) VALUES (?,?,?,?,?,?,?,?)",
                            (
                                report_id,
                                claimed,
                                entry["block"],
                                float(entry["epsilon"]),
                                float(entry["budget"]),
                                int(entry["retired"]),
                                run_id,
                                int(server_round),
                            ),
                        )
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (it does on SQLITE_FULL
                # and I/O errors); a second ROLLBACK would raise and hide why.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return Verdict(
            report_id=report_id,
            device_id=claimed,
            verified=verified,
            signature_valid=signature_valid,
            flags=flags,
            findings=tuple(findings),
        )

    def _authenticate(
        self,
        run_id: str,
        server_round: int,
        payload: bytes,
        signature: bytes,
        findings: list[Finding],
    ) -> tuple[str, dict[str, Any] | None, bool]:
        """Who the report claims to be and whether it is theirs, for this round.

        Appends ``unverifiable`` findings; returns ``(claimed device id,
        payload if authentic and well-formed else None, signature valid)``.
        """

        def fail(detail: str) -> None:
            findings.append(Finding(FLAG_UNVERIFIABLE, detail))

        try:
            parsed = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if not isinstance(parsed, dict):
            fail("payload is not a JSON object; it cannot be a keystay privacy report")
            return "", None, False
        claimed = parsed.get("device_id")
        if not isinstance(claimed, str) or not claimed:
            fail("payload names no device_id")
            return "", None, False
        device = self.device(claimed)
        if device is None:
            fail(
                f"device {claimed} is not enrolled; its reports cannot be verified until "
                "its public key is enrolled (keys are only learned at enrollment)"
            )
            return claimed, None, False
        pem = device.signing_public_key_pem
        signature_valid = verify_report(payload, signature, pem)
        if device.revoked:
            fail(f"device {claimed} was revoked at {device.revoked_at}; its key is not trusted")
            return claimed, None, signature_valid
        try:
            fields = verified_report(payload, signature, pem)
        except ReportVerificationError as error:
            fail(f"report from {claimed} does not verify: {error}")
            return claimed, None, signature_valid
        problems = check_fields(fields)
        if not problems:
            problems = check_day_fields(fields)
        if fields.get("run_id") != run_id:
            problems.append(
                f"report is for run {fields.get('run_id')!r} but arrived in run {run_id!r} "
                "(replayed or misrouted)"
            )
        if fields.get("server_round") != int(server_round):
            problems.append(
                f"report is for round {fields.get('server_round')!r} but arrived in round "
                f"{int(server_round)} (replayed or misrouted)"
            )
        for problem in problems:
            fail(f"signed report from {claimed} is not acceptable: {problem}")
        return claimed, (None if problems else fields), signature_valid

    def _check_history(
        self,
        device_id: str,
        run_id: str,
        server_round: int,
        payload: Mapping[str, Any],
        findings: list[Finding],
    ) -> None:
        """Contradiction and over-budget checks of an authentic report (see rules)."""
        earlier = self._conn.execute(
            "SELECT id FROM reports WHERE device_id = ? AND run_id = ? AND server_round = ? "
            "AND verified = 1 ORDER BY id LIMIT 1",
            (device_id, run_id, int(server_round)),
        ).fetchone()
        previous = self._conn.execute(
            "SELECT id, epsilon_total FROM reports WHERE device_id = ? AND verified = 1 "
            "ORDER BY epsilon_total DESC, id LIMIT 1",
            (device_id,),
        ).fetchone()
        history: dict[str, tuple[float, bool]] = {}
        for entry in payload["blocks"]:
            row = self._conn.execute(
                "SELECT max(epsilon), max(retired) FROM block_epsilons "
                "WHERE device_id = ? AND block = ?",
                (device_id, entry["block"]),
            ).fetchone()
            if row is not None and row[0] is not None:
                history[entry["block"]] = (float(row[0]), bool(row[1]))
        findings.extend(history_findings(
            device_id, run_id, int(server_round), payload,
            earlier_report=None if earlier is None else int(earlier[0]),
            best_previous=None if previous is None else (int(previous[0]), float(previous[1])),
            block_history=history,
        ))

    def reports(
        self,
        *,
        device_id: str | None = None,
        run_id: str | None = None,
        flagged_only: bool = False,
    ) -> list[StoredReport]:
        """Stored reports in report order, optionally filtered."""
        clauses, params = [], []
        if device_id is not None:
            clauses.append("device_id = ?")
            params.append(device_id)
        if run_id is not None:
            clauses.append("run_id = ?")
            params.append(run_id)
        if flagged_only:
            clauses.append("flags != '[]'")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, received_at, run_id, server_round, device_id, node_id, payload_json, "
                f"signature, signature_valid, verified, flags, findings FROM reports {where} "
                "ORDER BY id",
                params,
            ).fetchall()
        return [
            StoredReport(
                id=r[0],
                received_at=r[1],
                run_id=r[2],
                server_round=r[3],
                device_id=r[4],
                node_id=r[5],
                payload_json=r[6],
                signature=bytes(r[7]),
                signature_valid=bool(r[8]),
                verified=bool(r[9]),
                flags=tuple(json.loads(r[10])),
                findings=tuple(Finding(**f) for f in json.loads(r[11])),
            )
            for r in rows
        ]

    def block_epsilons(self, device_id: str | None = None) -> list[BlockEpsilon]:
        """Every block charge from verified reports, in report order."""
        where, params = ("WHERE device_id = ?", [device_id]) if device_id else ("", [])
        with self._lock:
            rows = self._conn.execute(
                "SELECT report_id, device_id, block, epsilon, budget, retired, run_id, "
                f"server_round FROM block_epsilons {where} ORDER BY report_id, block",
                params,
            ).fetchall()
        return [
            BlockEpsilon(r[0], r[1], r[2], float(r[3]), float(r[4]), bool(r[5]), r[6], int(r[7]))
            for r in rows
        ]

    def audit(self) -> list[AuditFinding]:
        """Re-check every verified report as stored now (tampering at rest).

        For each report marked verified: its signature must still verify under
        the device's enrolled key, its payload must still name the stored run
        and round, and its ``block_epsilons`` rows must equal the payload's
        blocks. A failure means someone edited the ledger file after the fact.

        Returns
        -------
        list of AuditFinding
            Empty when the ledger is intact.
        """
        return audit_reports(self.devices(), self.reports(), self.block_epsilons())

    # --- refusals and central DP ----------------------------------------------

    def record_refusal(
        self, run_id: str, server_round: int, device: str, reason: str
    ) -> RefusalRecord:
        """Store that ``device`` (node id or device id) refused a round by policy, and why.

        Call it for policy refusals only (the ClientApp's error code 4001), not
        for a device that was unavailable or failed.
        """
        now = self._now()
        with self._lock, self._writing(f"refusal in run {run_id} round {int(server_round)}"):
            cursor = self._conn.execute(
                "INSERT INTO refusals (received_at, run_id, server_round, device, reason) "
                "VALUES (?,?,?,?,?)",
                (now, run_id, int(server_round), str(device), str(reason)),
            )
        return RefusalRecord(
            int(cursor.lastrowid or 0), now, run_id, int(server_round), str(device), str(reason)
        )

    def refusals(self, run_id: str | None = None) -> list[RefusalRecord]:
        """Stored refusals in order, optionally for one run."""
        where, params = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, received_at, run_id, server_round, device, reason FROM refusals "
                f"{where} ORDER BY id",
                params,
            ).fetchall()
        return [RefusalRecord(*row) for row in rows]

    def record_central_dp(
        self,
        *,
        run_id: str,
        server_round: int,
        noise_multiplier: float,
        clip: float,
        sample_rate: float,
        sampling: str,
        epsilon: float,
        delta: float,
    ) -> CentralDPRecord:
        """Store the central-DP accountant's cumulative ε after a noised round.

        Call once per round in which a central-DP aggregate was released.

        Raises
        ------
        ServerLedgerError
            The round is already recorded for this run (its ε would be
            ambiguous), or a figure is out of range.
        """
        if math.isnan(epsilon) or epsilon < 0:
            raise ServerLedgerError(f"central ε must be >= 0 (inf allowed), got {epsilon!r}")
        if not (0 < delta < 1) or not (0 < sample_rate <= 1) or clip <= 0 or noise_multiplier < 0:
            raise ServerLedgerError(
                "central DP figures out of range: need 0 < delta < 1, 0 < sample_rate <= 1, "
                f"clip > 0, noise_multiplier >= 0; got delta={delta!r}, "
                f"sample_rate={sample_rate!r}, clip={clip!r}, noise_multiplier={noise_multiplier!r}"
            )
        record = CentralDPRecord(
            run_id, int(server_round), float(noise_multiplier), float(clip), float(sample_rate),
            str(sampling), float(epsilon), float(delta), self._now(),
        )
        with self._lock, self._writing(f"central DP of run {run_id} round {int(server_round)}"):
            try:
                self._conn.execute(
                    "INSERT INTO central_dp (run_id, server_round, noise_multiplier, clip, "
                    "sample_rate, sampling, epsilon, delta, recorded_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        record.run_id, record.server_round, record.noise_multiplier, record.clip,
                        record.sample_rate, record.sampling, record.epsilon, record.delta,
                        record.recorded_at,
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise ServerLedgerError(
                    f"central DP for run {run_id} round {int(server_round)} is already "
                    "recorded; each round is released once"
                ) from error
        return record

    def central_dp(self, run_id: str | None = None) -> list[CentralDPRecord]:
        """Central-DP rows by run and round."""
        where, params = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id, server_round, noise_multiplier, clip, sample_rate, sampling, "
                f"epsilon, delta, recorded_at FROM central_dp {where} "
                "ORDER BY run_id, server_round",
                params,
            ).fetchall()
        return [CentralDPRecord(*row) for row in rows]

    def runs(self) -> list[str]:
        """Every run id seen in reports, refusals or central DP, sorted."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT run_id FROM reports UNION SELECT run_id FROM refusals "
                "UNION SELECT run_id FROM central_dp ORDER BY run_id"
            ).fetchall()
        return [r[0] for r in rows]
