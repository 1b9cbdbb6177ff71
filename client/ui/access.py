"""The page's only way to the daemon: one small adapter, :class:`DaemonAccess`.

Design note
-----------
Everything the employee's page shows or changes goes through this class: one
place says which surface of the daemon the page uses, and it is only ever the
employee's *control* socket (``DATA/control.sock``, served to the daemon's
own uid only), never the federation socket:

* ``status``, ``show``, ``export``, ``pause``, ``resume`` and ``forget`` call
  the daemon's ``Control`` service through :class:`ControlClient`, exactly as
  the ``keystay device`` commands do; the daemon decides and answers.
* ``policy_text`` asks the daemon (``Control.Policy``) for the policy it
  really enforces, as ``keystay device policy`` does.
* ``rounds`` reads the device ledger (``ledger.v1.sqlite``) *read-only*: the
  ledger holds mechanisms and ε figures only, never an event, and the
  employee owns it. A read-only SQLite connection cannot change a charge, so
  the write-ahead guarantees of :mod:`keystay.client.ledger.ledger` hold.

Errors reach the page as :class:`AccessError` with a sentence for a person
(the daemon's own reason when it refused), never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from keystay.client.control_client import ControlClient
from keystay.client.device_client import DeviceUnavailableError, control_socket_path
from keystay.client.ledger.ledger import LEDGER_FILE
from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.v1 import device_pb2

# The page is interactive: a daemon that has not answered in this long is
# reported rather than left hanging a browser tab.
CALL_TIMEOUT_S = 20.0

T = TypeVar("T")


class AccessError(KeystayError, RuntimeError):
    """The daemon is unreachable or refused; the message is meant for a person."""

    exit_code = ExitCode.PAGE_NO_DAEMON


@dataclass(frozen=True, slots=True)
class DayCharge:
    """One day's ε after a round charged it (cumulative over the day's history)."""

    block: str
    epsilon: float
    epsilon_rdp: float
    epsilon_prv: float
    cost: float
    """What this round added to the day's enforced ε."""


@dataclass(frozen=True, slots=True)
class RoundCharge:
    """One admitted training round, as the device ledger recorded it before training.

    Attributes
    ----------
    charge_id : int
    created : float
        Unix seconds when the charge was written (before training started).
    run_id : str
    server_round : int
    noise_multiplier, sample_rate : float
    steps : int
        The mechanism ``(σ, q, T)`` every charged day saw.
    delta : float
    accountant : str
        Whose bound is enforced.
    answered : bool
        Whether the daemon sent the update and its signed report (a charge
        can exist without an answer if training failed: never refunded).
    days : tuple of DayCharge
    """

    charge_id: int
    created: float
    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    answered: bool
    days: tuple[DayCharge, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class DayLedger:
    """What the ledger knows of a day beyond ``status``: rounds, retirement, forgetting."""

    block: str
    charges: int
    retired_at: float | None
    forgotten_at: float | None
    epsilon: float = 0.0
    """Enforced ε after the day's last charge (what it has spent, forever)."""
    budget: float = 0.0


class DaemonAccess:
    """The page's calls to the daemon (re-point this class to the control socket).

    Parameters
    ----------
    data_dir : Path
        The device's data folder (socket, ledger, policy.toml).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.socket = control_socket_path(self.data_dir)

    # -- calls answered by the daemon ---------------------------------------

    def _call(self, fn: Callable[[Any], T]) -> T:
        try:
            client = ControlClient(self.socket)
        except DeviceUnavailableError as error:
            raise AccessError(str(error)) from error
        with client:
            try:
                return fn(client.stub)
            except grpc.RpcError as error:
                code = error.code() if hasattr(error, "code") else None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise AccessError(
                        f"the device daemon at {self.socket} does not answer; start it with "
                        f"'keystay device run --data {self.data_dir}'"
                    ) from error
                raise AccessError(f"the daemon answered: {error.details()}") from error

    def status(self) -> dict[str, Any]:
        """``keystay device status --json``'s content (protobuf JSON mapping)."""
        from google.protobuf.json_format import MessageToDict

        reply = self._call(lambda s: s.Status(device_pb2.StatusRequest(), timeout=CALL_TIMEOUT_S))
        fields: dict[str, Any] = MessageToDict(reply, always_print_fields_with_no_presence=True)
        return fields

    def show(self, day: str | None) -> dict[str, Any]:
        """Per kept day: events, token counts by kind, apps seen, ε (never text)."""
        reply = self._call(
            lambda s: s.Show(device_pb2.ShowRequest(day=day or ""), timeout=CALL_TIMEOUT_S)
        )
        summary: dict[str, Any] = json.loads(reply.summary_json)
        return summary

    def export(self, day: str) -> str:
        """One day of the employee's own data, ``keystay-export/1`` JSON text."""
        reply = self._call(
            lambda s: s.Export(device_pb2.ExportRequest(day=day), timeout=CALL_TIMEOUT_S)
        )
        return str(reply.json)

    def pause(self, seconds: float) -> str:
        """Stop recording for ``seconds`` (0: until resumed); the ISO end time or ``""``."""
        reply = self._call(
            lambda s: s.Pause(device_pb2.PauseRequest(seconds=seconds), timeout=CALL_TIMEOUT_S)
        )
        return str(reply.paused_until)

    def resume(self) -> None:
        self._call(lambda s: s.Resume(device_pb2.ResumeRequest(), timeout=CALL_TIMEOUT_S))

    def forget(self, days: list[str], everything: bool) -> tuple[list[str], bool]:
        """Delete days (or everything, destroying the store key); what was forgotten."""
        reply = self._call(
            lambda s: s.Forget(
                device_pb2.ForgetRequest(days=days, all=everything), timeout=CALL_TIMEOUT_S
            )
        )
        return list(reply.forgotten), bool(reply.key_destroyed)

    # -- computed locally until the control socket answers them -------------

    def policy_text(self) -> str:
        """What ``keystay device policy`` prints: the policy the running daemon enforces."""
        reply = self._call(
            lambda s: s.Policy(device_pb2.PolicyRequest(), timeout=CALL_TIMEOUT_S)
        )
        return f"policy from {reply.source}\n\n{reply.text}"

    def _ledger(self) -> sqlite3.Connection | None:
        path = self.data_dir / LEDGER_FILE
        if not path.exists():
            return None
        try:
            return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        except sqlite3.Error as error:
            raise AccessError(f"the privacy ledger {path} cannot be read: {error}") from error

    def rounds(self) -> list[RoundCharge]:
        """Every round the ledger charged, newest first (empty without a ledger)."""
        conn = self._ledger()
        if conn is None:
            return []
        try:
            rows = conn.execute(
                """
                SELECT c.id, c.created, c.run_id, c.server_round, c.noise_multiplier,
                       c.sample_rate, c.steps, c.delta, c.accountant, c.answered, c.block,
                       c.eps_enforced, c.eps_rdp, c.eps_prv,
                       coalesce((SELECT p.eps_enforced FROM charges p
                                 WHERE p.block = c.block AND p.id < c.id
                                 ORDER BY p.id DESC LIMIT 1), 0.0)
                FROM charges c ORDER BY c.id DESC, c.block
                """
            ).fetchall()
        except sqlite3.Error as error:
            raise AccessError(f"the privacy ledger cannot be read: {error}") from error
        finally:
            conn.close()
        rounds: dict[int, RoundCharge] = {}
        days: dict[int, list[DayCharge]] = {}
        for row in rows:
            charge_id = int(row[0])
            if charge_id not in rounds:
                rounds[charge_id] = RoundCharge(
                    charge_id=charge_id, created=float(row[1]), run_id=str(row[2]),
                    server_round=int(row[3]), noise_multiplier=float(row[4]),
                    sample_rate=float(row[5]), steps=int(row[6]), delta=float(row[7]),
                    accountant=str(row[8]), answered=bool(row[9]),
                )
                days[charge_id] = []
            days[charge_id].append(
                DayCharge(block=str(row[10]), epsilon=float(row[11]), epsilon_rdp=float(row[12]),
                          epsilon_prv=float(row[13]), cost=float(row[11]) - float(row[14]))
            )
        return [dataclasses.replace(r, days=tuple(days[i])) for i, r in rounds.items()]

    def day_ledger(self) -> dict[str, DayLedger]:
        """Per day the ledger ever charged: how often, and when it retired or was forgotten."""
        conn = self._ledger()
        if conn is None:
            return {}
        try:
            rows = conn.execute(
                """
                SELECT b.block, (SELECT count(*) FROM charges c WHERE c.block = b.block),
                       b.retired_at, b.forgotten_at,
                       coalesce((SELECT c.eps_enforced FROM charges c WHERE c.block = b.block
                                 ORDER BY c.id DESC LIMIT 1), 0.0), b.budget
                FROM blocks b ORDER BY b.block
                """
            ).fetchall()
        except sqlite3.Error as error:
            raise AccessError(f"the privacy ledger cannot be read: {error}") from error
        finally:
            conn.close()
        return {
            str(r[0]): DayLedger(str(r[0]), int(r[1]), r[2], r[3], float(r[4]), float(r[5]))
            for r in rows
        }
