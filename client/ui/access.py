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
from keystay.client.ledger import accounting
from keystay.client.ledger.accounting import Mechanism
from keystay.client.ledger.ledger import LEDGER_FILE, UNIT_DAY, UNIT_RECORD
from keystay.client.policy import ASSUMPTION_BROKEN, ASSUMPTION_HONEST
from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.v1 import device_pb2

#: The budgets that can retire a day, as :attr:`DayLedger.retired_by` names them.
BUDGET_HONEST = ASSUMPTION_HONEST
BUDGET_BROKEN = ASSUMPTION_BROKEN
BUDGET_RECORD = UNIT_RECORD

# The page is interactive: a daemon that has not answered in this long is
# reported rather than left hanging a browser tab.
CALL_TIMEOUT_S = 20.0

T = TypeVar("T")


class AccessError(KeystayError, RuntimeError):
    """The daemon is unreachable or refused; the message is meant for a person."""

    exit_code = ExitCode.PAGE_NO_DAEMON


@dataclass(frozen=True, slots=True)
class DayCharge:
    """One day's ε after a round charged it (cumulative over the day's history).

    ``epsilon``/``cost`` are against an honest-but-curious server for an
    employee-day round (the record-level figures otherwise);
    ``epsilon_broken``/``cost_broken`` against a server that breaks secure
    aggregation (None for a record-level round).
    """

    block: str
    epsilon: float
    epsilon_rdp: float
    epsilon_prv: float
    cost: float
    """What this round added to the day's enforced ε."""
    epsilon_broken: float | None = None
    cost_broken: float | None = None
    budget_broken: float | None = None


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
    unit : str
        ``"employee-day"`` or ``"record"``.
    noise_multiplier_broken : float or None
        Employee-day: σ of this device's own share (what a server that breaks
        secure aggregation faces); ``noise_multiplier`` is then the σ of the
        sum an honest-but-curious server sees.
    min_summed_devices : int
        Employee-day: t, the fewest devices whose updates are summed.
    update_clip, day_sample_rate : float
        Employee-day: C (per day) and q (each day's chance to be used).
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
    unit: str = UNIT_RECORD
    noise_multiplier_broken: float | None = None
    min_summed_devices: int = 0
    update_clip: float = 0.0
    day_sample_rate: float = 0.0

    @property
    def employee_day(self) -> bool:
        return self.unit == UNIT_DAY


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
    unit: str = UNIT_RECORD
    """The unit of the day's last charge."""
    epsilon_broken: float | None = None
    """Against a server that breaks secure aggregation (None: never an employee-day charge)."""
    budget_broken: float | None = None
    retired_by: tuple[str, ...] = ()
    """Which budget retired the day: :data:`BUDGET_HONEST`, :data:`BUDGET_BROKEN` and/or
    :data:`BUDGET_RECORD` (empty while it is open)."""


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
        # Which budget retired a day never changes once it has retired: priced
        # once per (day, last charge id), not on every page load.
        self._retired_by: dict[tuple[str, int], tuple[str, ...]] = {}

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
            days = _has_day_tables(conn)
            rows = conn.execute(
                f"""
                SELECT c.id, c.created, c.run_id, c.server_round, c.noise_multiplier,
                       c.sample_rate, c.steps, c.delta, c.accountant, c.answered, c.block,
                       c.eps_enforced, c.eps_rdp, c.eps_prv,
                       coalesce((SELECT p.eps_enforced FROM charges p
                                 WHERE p.block = c.block AND p.id < c.id
                                 ORDER BY p.id DESC LIMIT 1), 0.0),
                       {_DAY_COLUMNS if days else _NO_DAY_COLUMNS}
                FROM charges c {_DAY_JOINS if days else ""} ORDER BY c.id DESC, c.block
                """
            ).fetchall()
        except sqlite3.Error as error:
            raise AccessError(f"the privacy ledger cannot be read: {error}") from error
        finally:
            conn.close()
        rounds: dict[int, RoundCharge] = {}
        charged: dict[int, list[DayCharge]] = {}
        for row in rows:
            charge_id = int(row[0])
            if charge_id not in rounds:
                day_round = row[15] is not None
                rounds[charge_id] = RoundCharge(
                    charge_id=charge_id, created=float(row[1]), run_id=str(row[2]),
                    server_round=int(row[3]), noise_multiplier=float(row[4]),
                    sample_rate=float(row[5]), steps=int(row[6]), delta=float(row[7]),
                    accountant=str(row[8]), answered=bool(row[9]),
                    unit=UNIT_DAY if day_round else UNIT_RECORD,
                    noise_multiplier_broken=None if row[19] is None else float(row[19]),
                    min_summed_devices=int(row[16]) if day_round else 0,
                    update_clip=float(row[17]) if day_round else 0.0,
                    day_sample_rate=float(row[18]) if day_round else 0.0,
                )
                charged[charge_id] = []
            broken = None if row[20] is None else float(row[20])
            charged[charge_id].append(
                DayCharge(block=str(row[10]), epsilon=float(row[11]), epsilon_rdp=float(row[12]),
                          epsilon_prv=float(row[13]), cost=float(row[11]) - float(row[14]),
                          epsilon_broken=broken,
                          cost_broken=None if broken is None else broken - float(row[21]),
                          budget_broken=None if row[22] is None else float(row[22]))
            )
        return [dataclasses.replace(r, days=tuple(charged[i])) for i, r in rounds.items()]

    def day_ledger(self) -> dict[str, DayLedger]:
        """Per day the ledger ever charged: how often, its figures, when and why it retired.

        ``retired_by`` names the budget(s) that retired a day: the ledger retires
        a day when the same round could not be afforded once more under either
        budget, so this re-prices the day's last round once more under each
        series, with the device's own accountant (:func:`_retiring_budgets`).
        """
        conn = self._ledger()
        if conn is None:
            return {}
        try:
            days = _has_day_tables(conn)
            broken = (
                """(SELECT k.eps_enforced FROM broken_charges k WHERE k.block = b.block
                    ORDER BY k.id DESC LIMIT 1),
                   (SELECT k.budget FROM broken_charges k WHERE k.block = b.block
                    ORDER BY k.id DESC LIMIT 1),
                   (SELECT u.unit FROM charge_units u WHERE u.id =
                      (SELECT max(c.id) FROM charges c WHERE c.block = b.block))"""
                if days else "NULL, NULL, NULL"
            )
            rows = conn.execute(
                f"""
                SELECT b.block, (SELECT count(*) FROM charges c WHERE c.block = b.block),
                       b.retired_at, b.forgotten_at,
                       coalesce((SELECT c.eps_enforced FROM charges c WHERE c.block = b.block
                                 ORDER BY c.id DESC LIMIT 1), 0.0), b.budget,
                       (SELECT max(c.id) FROM charges c WHERE c.block = b.block),
                       b.retired, {broken}
                FROM blocks b ORDER BY b.block
                """
            ).fetchall()
            out = {}
            for r in rows:
                block, unit = str(r[0]), UNIT_DAY if r[10] == UNIT_DAY else UNIT_RECORD
                retired_by: tuple[str, ...] = ()
                if (r[2] is not None or r[7]) and r[6] is not None:
                    key = (block, int(r[6]))
                    if key not in self._retired_by:
                        self._retired_by[key] = _retiring_budgets(conn, block, float(r[5]),
                                                                  unit, days)
                    retired_by = self._retired_by[key]
                out[block] = DayLedger(
                    block, int(r[1]), r[2], r[3], float(r[4]), float(r[5]), unit=unit,
                    epsilon_broken=None if r[8] is None else float(r[8]),
                    budget_broken=None if r[9] is None else float(r[9]),
                    retired_by=retired_by,
                )
        except sqlite3.Error as error:
            raise AccessError(f"the privacy ledger cannot be read: {error}") from error
        finally:
            conn.close()
        return out


# The employee-day columns of ``rounds`` (indices 15-22): the round's unit row
# and the day's broken-aggregation charge with the figure before it. A ledger
# no keystay with the employee-day unit has opened lacks those tables: NULLs.
_DAY_COLUMNS = """u.unit, u.min_summed_devices, u.update_clip, u.day_sample_rate,
                       k.noise_multiplier, k.eps_enforced,
                       coalesce((SELECT z.eps_enforced FROM broken_charges z
                                 WHERE z.block = c.block AND z.id < c.id
                                 ORDER BY z.id DESC LIMIT 1), 0.0), k.budget"""
_NO_DAY_COLUMNS = "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
_DAY_JOINS = ("LEFT JOIN charge_units u ON u.id = c.id "
              "LEFT JOIN broken_charges k ON k.id = c.id AND k.block = c.block")


def _has_day_tables(conn: sqlite3.Connection) -> bool:
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {"charge_units", "broken_charges"} <= names


def _over(history: list[Mechanism], delta: float, accountant: str, budget: float) -> float:
    """ε of ``history`` and its last mechanism once more, as a share of ``budget``.

    The ledger's retirement test (rule 6 of :mod:`keystay.client.ledger.ledger`):
    above 1, the same round could not be afforded again.
    """
    eps = accounting.epsilons([*history, history[-1]], delta=delta)
    bound = float(eps.rdp) if accountant == "rdp" else accounting.enforced(eps)
    return bound / budget if budget > 0 else float("inf")


def _retiring_budgets(
    conn: sqlite3.Connection, block: str, budget: float, unit: str, days: bool
) -> tuple[str, ...]:
    """Which budget(s) retired ``block``: each series whose last round would not fit again.

    The ledger does not store which budget it was, so this asks the question
    the ledger asked, with the same accountant, over each series' history.
    The recomputation composes the history from scratch where the ledger
    composed incrementally; both are valid bounds and agree to the grid's
    precision, and if neither lands over its budget the series closer to its
    budget is named.
    """
    rows = conn.execute(
        "SELECT noise_multiplier, sample_rate, steps, delta, accountant FROM charges "
        "WHERE block = ? ORDER BY id", (block,)
    ).fetchall()
    if not rows:
        return ()
    delta, accountant = float(rows[-1][3]), str(rows[-1][4])
    shares = {
        BUDGET_HONEST if unit == UNIT_DAY else BUDGET_RECORD: _over(
            [Mechanism(float(r[0]), float(r[1]), int(r[2])) for r in rows], delta,
            accountant, budget),
    }
    if days and unit == UNIT_DAY:
        broken = conn.execute(
            "SELECT noise_multiplier, sample_rate, steps, budget FROM broken_charges "
            "WHERE block = ? ORDER BY id", (block,)
        ).fetchall()
        if broken:
            shares[BUDGET_BROKEN] = _over(
                [Mechanism(float(r[0]), float(r[1]), int(r[2])) for r in broken], delta,
                accountant, float(broken[-1][3]))
    over = tuple(name for name, share in shares.items() if share > 1.0)
    return over or (max(shares, key=lambda name: shares[name]),)
