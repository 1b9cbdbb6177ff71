"""The per-block privacy ledger: what every block has spent, written before anything leaves.

Privacy model
-------------
The device's data is split into disjoint *blocks*, one per employee-day
(``YYYY-MM-DD``). DP-SGD is record-level within a block: a record is one
non-overlapping window of 33 events (:data:`keystay.common.windows.PRIVACY_UNIT`),
so each event is in exactly one record. A training round on blocks ``B₁ … Bₖ`` runs one mechanism
``M = (σ, q, T)`` (noise multiplier, Poisson sample rate over the union of
the blocks' windows, steps); every record of every ``Bᵢ`` sees exactly that
mechanism, so the round appends ``M`` to each ``Bᵢ``'s history and to no
other block's. A block's ε is the composition of its whole history,
``ε_b = ε(M_b1 ∘ M_b2 ∘ … , δ)``, across every round, every run and every
daemon restart; it is never reset.

Because each record lives in exactly one block, the guarantee for any one
record of the device is that of its block (parallel composition over
disjoint data), so the device's ε is ``max_b ε_b``: no record, in particular
no record of any one employee-day, is exposed more than that.

Rules the ledger enforces (:meth:`Ledger.admit`)
-----------------------------------------------
1. The request passes :meth:`DevicePolicy.check_request`.
2. No requested block is retired (``block-retired``).
3. At least ``min_participation_gap_seconds`` (wall clock) since the last
   charge (``too-soon``).
4. For every block, ``ε(history_b + [M], δ) <= epsilon_per_block`` under the
   enforced accountant (``budget-exceeded``); otherwise nothing is charged.
5. The charge rows are committed (``synchronous=FULL``: fsync'd) *before*
   training starts and long before the update is answered: write-ahead. A
   crash anywhere after the commit keeps the charge (never a refund); a
   crash before it means nothing was trained.
6. Retirement: after the charge a block retires when the same mechanism
   could not be afforded once more, ``ε(history_b + [M, M], δ) > budget``.
   Retired blocks are never trained on again, even by a cheaper mechanism,
   and never un-retire (not even if the budget is raised later): a block is
   spent in one direction only. Rule 4 alone already keeps every block
   within budget; retirement makes the end explicit, so spent days drop out
   of block selection and show as spent to the employee.

Storage
-------
``DATA_DIR/ledger.v1.sqlite`` (the format version is in the file name and in
``PRAGMA user_version``), WAL journal, ``synchronous=FULL``, mode 0600. It
holds mechanisms and ε figures only: never an event, token or window. That is
all that is needed to prove, later, that budgets were respected.

Every charge row, every ``blocks`` row and every stored accountant state is
covered by an HMAC chain under a device-local key, ``DATA_DIR/ledger.v1.key``
(:mod:`keystay.client.ledger.chain`, which says what the chain can and cannot
prove). It is verified on every open: a row edited, deleted, added or
reordered behind the daemon's back (a refund) is refused. A ledger written
before the chain is adopted once, as found (logged): adoption cannot prove
anything about edits made before that first open.

Errors: an unreadable or unknown-version ledger, one that fails its chain, or
one whose key is missing raises :class:`DeviceLedgerError` (exit code
``DEVICE_LEDGER`` when it stops ``keystay device run``) and training must stop
(never start a fresh ledger next to a broken one: that would be a silent
refund; a ledger file deleted or emptied beside its key is refused too). An
accountant returning NaN or a negative ε raises :class:`DeviceLedgerError`
(never admit on an unknown ε).

Accounting in bounded time
--------------------------
Re-running an accountant over a block's whole history makes a charge slower
with every round (the PRV accountant took 23 s at 10 distinct mechanisms and
482 s at 50). Instead the ledger keeps, per block, an
:class:`~keystay.client.ledger.accounting.AccountantState`: the composed RDP
curve (RDP adds) and the composed dominating privacy loss distributions
(:mod:`keystay.client.ledger.pld`; a new round is one convolution). A charge
composes only the new mechanism into the stored state (and once more, in
the same transforms, for the retirement check), so its cost does not grow
with the number of charges: it depends on the new mechanism (its own PLD is
cached by ``(σ, q, T)``) and on the width of the block's PLD, which the
block's budget bounds. The state is δ-free, stored in table
``accountant_state`` in the same transaction as the charge rows, and tagged
with :data:`~keystay.client.ledger.accounting.STATE_VERSION` and the id and
count of the charge rows it covers; when it is missing, of another version
(new grid or orders), or stale (rows written without it), it is rebuilt from
the block's history, which stays the source of truth (once, at a cost of
one composition per distinct mechanism). The table was added
without changing the file format: a ledger written before it simply gets its
states rebuilt on first use.

The maths is numpy and scipy only (no torch), so the daemon charges without
the warm trainer. ``admit(epsilon_fn=...)`` still accepts a function of the
whole history (tests; comparisons) and then prices from scratch.
"""

from __future__ import annotations

import dataclasses
import hmac
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Protocol

from keystay.client.ledger import accounting
from keystay.client.ledger.accounting import Epsilons, Mechanism
from keystay.client.ledger.chain import (
    KEY_FILE,
    ChainError,
    LedgerChain,
    check_not_replaced,
    open_chain,
)
from keystay.client.ledger.chain import SCHEMA as CHAIN_SCHEMA
from keystay.client.policy import (
    ASSUMPTION_BROKEN,
    POLICY_FILE,
    DevicePolicy,
    Refusal,
    TrainingRequest,
)
from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.files import ensure_private
from keystay.common.sqlite import ForeignFileError, FormatVersionError, open_versioned

LEDGER_FILE = "ledger.v1.sqlite"
SCHEMA_VERSION = 1

EpsilonFn = Callable[[Sequence[Mechanism], float], Epsilons]
"""``epsilon_fn(history, delta) -> Epsilons`` for a composed history."""

_SCHEMA = """
CREATE TABLE charges (
    id INTEGER NOT NULL,              -- one id per admitted round, shared by its blocks
    block TEXT NOT NULL,
    created REAL NOT NULL,            -- unix seconds
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    eps_rdp REAL NOT NULL,            -- the block's epsilon AFTER this charge (cumulative)
    eps_prv REAL NOT NULL,
    eps_prv_upper REAL NOT NULL,
    eps_enforced REAL NOT NULL,
    accountant TEXT NOT NULL,         -- whose bound eps_enforced is
    answered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (id, block)
);
CREATE INDEX charges_block ON charges (block, id);
CREATE TABLE blocks (
    block TEXT PRIMARY KEY,
    budget REAL NOT NULL,             -- epsilon_per_block in force at the last charge
    retired INTEGER NOT NULL DEFAULT 0,
    retired_at REAL,
    forgotten_at REAL                 -- the store's data for the block was deleted
);
CREATE TABLE participation (
    charge_id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    blocks INTEGER NOT NULL
);
"""

# Added after format 1 shipped; created on open when missing (older ledgers, older
# keystay versions ignore it). A cache of the history: rebuilt, never trusted blindly.
_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS accountant_state (
    block TEXT PRIMARY KEY,
    version TEXT NOT NULL,            -- accounting.STATE_VERSION it was built with
    last_charge INTEGER NOT NULL,     -- id of the newest charge row composed into it
    charges INTEGER NOT NULL,         -- how many charge rows of the block it composes
    state BLOB NOT NULL               -- accounting.state_to_bytes
)
"""


# Added with the employee-day unit, the same way (older ledgers simply lack them,
# and every charge they hold is record-level). A round of the employee-day unit
# charges two mechanisms to each day: the one an honest-but-curious server
# faces (in ``charges``, as every round before) and the one a server that
# breaks secure aggregation faces (in ``broken_charges``), each with its own
# accountant state.
_DAY_SCHEMA = """
CREATE TABLE IF NOT EXISTS charge_units (
    id INTEGER PRIMARY KEY,           -- charges.id (no row: a record-level charge)
    unit TEXT NOT NULL,               -- 'employee-day'
    min_summed_devices INTEGER NOT NULL,
    update_clip REAL NOT NULL,
    day_sample_rate REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS broken_charges (
    id INTEGER NOT NULL,              -- charges.id of the same round
    block TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,   -- the device's own share: sigma_eff / sqrt(t)
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    eps_rdp REAL NOT NULL,            -- the block's epsilon AFTER this charge (cumulative)
    eps_prv REAL NOT NULL,
    eps_prv_upper REAL NOT NULL,
    eps_enforced REAL NOT NULL,
    budget REAL NOT NULL,             -- epsilon_per_day_broken_aggregation in force
    PRIMARY KEY (id, block)
);
CREATE TABLE IF NOT EXISTS broken_accountant_state (
    block TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    last_charge INTEGER NOT NULL,
    charges INTEGER NOT NULL,
    state BLOB NOT NULL
)
"""

#: The units a charge can be made in (``TrainingRequest.privacy_unit``).
UNIT_RECORD = "record"
UNIT_DAY = "employee-day"


@dataclass(frozen=True, slots=True)
class _Series:
    """Where one ε series of a block lives: its charge rows and its accountant state."""

    charges: str
    state: str


_HONEST = _Series(charges="charges", state="accountant_state")
_BROKEN = _Series(charges="broken_charges", state="broken_accountant_state")


class DeviceLedgerError(KeystayError, RuntimeError):
    """The ledger cannot be trusted or written; training must stop."""

    exit_code = ExitCode.DEVICE_LEDGER


def enforced_epsilon(eps: Epsilons, accountant: str) -> float:
    """The bound a block's budget is checked against, for the policy's ``accountant``.

    ``"prv"``: :func:`keystay.client.ledger.accounting.enforced`,
    ``min(rdp, prv_upper)``, where ``prv_upper`` holds the certified PLD
    bound (:mod:`keystay.client.ledger.pld`; the PRV accountant of Gopi et
    al. 2021 before it), or the RDP bound where that is lower or where the
    PLD gave no finite bound (then ``prv_upper`` is inf). Both are valid upper bounds on the ε
    of the same history, so their minimum is one too. The PRV *estimate* is
    never enforced. ``"rdp"``: the RDP bound alone (Mironov 2017; Balle et
    al. 2020 conversion), looser, so budgets are spent sooner.
    """
    if accountant == "prv":
        return float(accounting.enforced(eps))
    if accountant == "rdp":
        return float(eps.rdp)
    raise ValueError(f"unknown accountant {accountant!r}; allowed: 'prv', 'rdp'")


def accountant_name(accountant: str) -> str:
    """How the enforced bound is named in the ledger and in privacy reports."""
    if accountant == "prv":
        return accounting.ACCOUNTANT
    if accountant == "rdp":
        return "rdp"
    raise ValueError(f"unknown accountant {accountant!r}; allowed: 'prv', 'rdp'")


@dataclass(frozen=True, slots=True)
class BlockCharge:
    """One block's ε after a charge (cumulative over its whole history).

    Attributes
    ----------
    block : str
    epsilon_rdp, epsilon_prv, epsilon_prv_upper : float
        The block's ε under each accountant after this charge.
    epsilon : float
        The enforced bound after this charge (``<= budget``).
    epsilon_before : float
        The enforced bound before it.
    budget : float
        The budget of ``epsilon``: ``epsilon_per_day`` for an employee-day
        charge (against an honest-but-curious server), ``epsilon_per_block``
        for a record-level one.
    retired : bool
        Whether the block retired with this charge (either budget).
    epsilon_broken, epsilon_broken_rdp, epsilon_broken_prv : float or None
        Employee-day charges: the day's ε against a server that breaks secure
        aggregation, after this charge (enforced, RDP, PLD). None for a
        record-level charge.
    epsilon_broken_before : float or None
    budget_broken : float or None
        ``epsilon_per_day_broken_aggregation``; None for a record-level charge.
    """

    block: str
    epsilon_rdp: float
    epsilon_prv: float
    epsilon_prv_upper: float
    epsilon: float
    epsilon_before: float
    budget: float
    retired: bool
    epsilon_broken: float | None = None
    epsilon_broken_rdp: float | None = None
    epsilon_broken_prv: float | None = None
    epsilon_broken_before: float | None = None
    budget_broken: float | None = None

    @property
    def cost(self) -> float:
        """What this round added to the block's enforced ε."""
        return self.epsilon - self.epsilon_before

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget - self.epsilon)

    @property
    def cost_broken(self) -> float | None:
        """What this round added to the broken-aggregation ε (None: record-level)."""
        if self.epsilon_broken is None or self.epsilon_broken_before is None:
            return None
        return self.epsilon_broken - self.epsilon_broken_before


@dataclass(frozen=True, slots=True)
class Charge:
    """An admitted, durably recorded round.

    Attributes
    ----------
    id : int
        Charge id (pass the charge to :meth:`Ledger.mark_answered`).
    created : float
        Unix seconds.
    run_id : str
    server_round : int
    mechanism : Mechanism
        ``(σ, q, T)`` charged to every block.
    delta : float
    accountant : str
        Whose bound is enforced (``"prv"`` or ``"rdp"``).
    blocks : tuple of BlockCharge
        Each block's ε after the charge, in the order given.
    epsilon_round : Epsilons
        ε of this round's mechanism alone.
    epsilon_round_enforced : float
        The enforced bound of this round's mechanism alone.
    epsilon_total : float
        The device's ε after the charge: the enforced ε of its most spent
        block, over every block in the ledger (see :meth:`Ledger.device_epsilon`).
    unit : str
        ``"employee-day"`` or ``"record"``: what ε protects.
    broken_mechanism : Mechanism or None
        Employee-day: the mechanism a server that breaks secure aggregation
        faces (the device's own share); None for a record-level charge.
    epsilon_round_broken : Epsilons or None
    epsilon_round_broken_enforced : float or None
        ε of ``broken_mechanism`` alone.
    epsilon_total_broken : float or None
        The largest broken-aggregation ε over every block after the charge.
    min_summed_devices : int
        t of the policy in force (0 for a record-level charge).
    update_clip, day_sample_rate : float
        The employee-day request's C and q (0 for a record-level charge).
    """

    id: int
    created: float
    run_id: str
    server_round: int
    mechanism: Mechanism
    delta: float
    accountant: str
    blocks: tuple[BlockCharge, ...]
    epsilon_round: Epsilons
    epsilon_round_enforced: float
    epsilon_total: float
    unit: str = UNIT_RECORD
    broken_mechanism: Mechanism | None = None
    epsilon_round_broken: Epsilons | None = None
    epsilon_round_broken_enforced: float | None = None
    epsilon_total_broken: float | None = None
    min_summed_devices: int = 0
    update_clip: float = 0.0
    day_sample_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class BlockTotal:
    """What one block has spent, for status, reports and audits.

    Attributes
    ----------
    block : str
    epsilon : float
        Enforced ε (under ``accountant``) after the block's last charge.
    epsilon_rdp, epsilon_prv : float
    budget : float
    remaining : float
        ``max(0, budget - epsilon)``.
    retired : bool
    charges : int
        Rounds that charged this block.
    runs : int
        Distinct runs among them.
    accountant : str
    delta : float
    retired_at, forgotten_at : float or None
        Unix seconds.
    unit : str
        The unit of the block's last charge.
    epsilon_broken, epsilon_broken_rdp, epsilon_broken_prv, budget_broken : float or None
        The broken-aggregation series after the block's last employee-day
        charge; None if it never had one.
    """

    block: str
    epsilon: float
    epsilon_rdp: float
    epsilon_prv: float
    budget: float
    remaining: float
    retired: bool
    charges: int
    runs: int
    accountant: str
    delta: float
    retired_at: float | None = None
    forgotten_at: float | None = None
    unit: str = UNIT_RECORD
    epsilon_broken: float | None = None
    epsilon_broken_rdp: float | None = None
    epsilon_broken_prv: float | None = None
    budget_broken: float | None = None

    @property
    def remaining_broken(self) -> float | None:
        """``max(0, budget_broken - epsilon_broken)``, or None."""
        if self.epsilon_broken is None or self.budget_broken is None:
            return None
        return max(0.0, self.budget_broken - self.epsilon_broken)


@dataclass(slots=True)
class _Planned:
    """One block of an admit being priced: its history and ε before and after ``M``."""

    block: str
    history: list[Mechanism]
    before: float
    after: Epsilons
    broken_history: list[Mechanism] = field(default_factory=list)
    broken_before: float | None = None
    broken_after: Epsilons | None = None


def _key(history: Sequence[Mechanism]) -> tuple[tuple[float, float, int], ...]:
    return tuple((float(m.noise_multiplier), float(m.sample_rate), int(m.steps)) for m in history)


_RESTORE = (
    "Training stays stopped and nothing is charged: restore the ledger and its key file "
    f"({LEDGER_FILE}, {KEY_FILE}) from a backup; never delete the ledger (that would "
    "reset spent budgets)"
)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Ledger:
    """The device's privacy ledger (one SQLite file). Thread-safe.

    Use :meth:`open`. All methods serialise on one lock and one connection;
    :meth:`admit` holds a write transaction (``BEGIN IMMEDIATE``) from its
    first read to its commit, so two rounds can never both pass the budget
    check on the same remaining ε, even from two processes.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, chain: LedgerChain) -> None:
        self._conn = conn
        self.path = path
        self._chain = chain
        self._lock = threading.RLock()

    # --- opening ----------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path) -> Ledger:
        """Open (or create) ``data_dir/ledger.v1.sqlite`` and verify its integrity chain.

        Raises
        ------
        DeviceLedgerError
            If the file is unreadable, of another format version, or fails its
            chain (the first bad row is named), or its key is missing.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = data_dir / LEDGER_FILE
        try:
            # Before the file is created: a key beside no ledger means it was deleted.
            check_not_replaced(path)
        except ChainError as error:
            raise DeviceLedgerError(f"{error}. {_RESTORE}") from error
        # The ledger holds no event data, but when and how much this device
        # trained is still nobody else's business: 0600.
        ensure_private(path)
        # WAL, synchronous=FULL (a committed charge survives power loss),
        # autocommit (admit() issues BEGIN IMMEDIATE itself so the check and
        # the write are one unit), version check and creation in one
        # transaction: see keystay.common.sqlite.
        try:
            conn = open_versioned(path, version=SCHEMA_VERSION, schema=_SCHEMA,
                                  always=";".join((_STATE_SCHEMA, _DAY_SCHEMA, CHAIN_SCHEMA)))
            try:
                # A damaged file can open and still fail half-way through a later
                # query; a full check now (the ledger is small, and opened once per
                # daemon) refuses it before anything is read from it or charged to it.
                problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError(
                        f"damaged: {'; '.join(str(p) for p in problems[:3])}"
                    )
                # SQLite's checks see pages, not meaning: the chain sees every row.
                chain = open_chain(conn, data_dir)
            except BaseException:
                conn.close()
                raise
        except ChainError as error:
            raise DeviceLedgerError(
                f"{path} fails its integrity check: {error}. {_RESTORE}"
            ) from error
        except ForeignFileError as error:
            raise DeviceLedgerError(
                f"{path} has tables but no format version; it is not a keystay "
                "ledger. Training stays stopped until it is moved aside"
            ) from error
        except FormatVersionError as error:
            raise DeviceLedgerError(
                f"{path} is ledger format {error.found}; this keystay reads format "
                f"{SCHEMA_VERSION}. Upgrade keystay; never delete the ledger (that "
                "would reset spent budgets)"
            ) from error
        except sqlite3.DatabaseError as error:
            raise DeviceLedgerError(
                f"{path} cannot be read ({error}). Training stays stopped: restore the "
                "ledger from a backup; never delete it (that would reset spent budgets)"
            ) from error
        return cls(conn, path, chain)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- reading -----------------------------------------------------------------

    def history(self, block: str, *, broken: bool = False) -> list[Mechanism]:
        """Every mechanism ever charged to ``block``, oldest first.

        Answered or not: a charge counts from the moment it is written.
        ``broken=True``: the broken-aggregation series (employee-day charges
        only).
        """
        with self._lock:
            return self._history(block, _BROKEN if broken else _HONEST)

    def _history(self, block: str, series: _Series = _HONEST) -> list[Mechanism]:
        rows = self._conn.execute(
            f"SELECT noise_multiplier, sample_rate, steps FROM {series.charges} "
            "WHERE block = ? ORDER BY id",
            (block,),
        ).fetchall()
        return [
            Mechanism(noise_multiplier=float(s), sample_rate=float(q), steps=int(t))
            for s, q, t in rows
        ]

    def retired_blocks(self, unit: str | None = None) -> set[str]:
        """Blocks whose budget is spent; never to be trained on again.

        With ``unit="employee-day"``, also the days charged before by a
        record-level round: those rounds bound what one token window reveals,
        not what the whole day does, so the day's employee-day ε is unknown
        and no employee-day round may read it (:meth:`admit` refuses it).
        """
        with self._lock:
            rows = self._conn.execute("SELECT block FROM blocks WHERE retired = 1").fetchall()
            closed = {r[0] for r in rows}
            if unit == UNIT_DAY:
                closed |= self._record_charged()
        return closed

    def _record_charged(self, blocks: Sequence[str] | None = None) -> set[str]:
        """Blocks with at least one record-level charge (optionally among ``blocks``)."""
        query = (
            "SELECT DISTINCT c.block FROM charges c LEFT JOIN charge_units u ON u.id = c.id "
            "WHERE u.id IS NULL"
        )
        params: tuple[str, ...] = ()
        if blocks is not None:
            query += f" AND c.block IN ({','.join('?' * len(blocks))})"
            params = tuple(blocks)
        return {r[0] for r in self._conn.execute(query, params).fetchall()}

    def totals(self) -> list[BlockTotal]:
        """What every charged block has spent, sorted by block.

        Figures come from each block's last charge row, which holds the ε of
        the block's whole history at that time; no accountant is run here.
        """
        with self._lock:
            rows = self._conn.execute(
                """
                SELECT b.block, c.eps_enforced, c.eps_rdp, c.eps_prv, b.budget, b.retired,
                       c.accountant, c.delta, b.retired_at, b.forgotten_at,
                       (SELECT count(*) FROM charges x WHERE x.block = b.block),
                       (SELECT count(DISTINCT run_id) FROM charges x WHERE x.block = b.block),
                       coalesce(u.unit, 'record'),
                       k.eps_enforced, k.eps_rdp, k.eps_prv, k.budget
                FROM blocks b
                JOIN charges c ON c.block = b.block
                 AND c.id = (SELECT max(id) FROM charges y WHERE y.block = b.block)
                LEFT JOIN charge_units u ON u.id = c.id
                LEFT JOIN broken_charges k ON k.block = b.block
                 AND k.id = (SELECT max(id) FROM broken_charges z WHERE z.block = b.block)
                ORDER BY b.block
                """
            ).fetchall()
        return [
            BlockTotal(
                block=block,
                epsilon=eps,
                epsilon_rdp=rdp,
                epsilon_prv=prv,
                budget=budget,
                remaining=max(0.0, budget - eps),
                retired=bool(retired),
                charges=int(charges),
                runs=int(runs),
                accountant=accountant,
                delta=delta,
                retired_at=retired_at,
                forgotten_at=forgotten_at,
                unit=unit,
                epsilon_broken=broken,
                epsilon_broken_rdp=broken_rdp,
                epsilon_broken_prv=broken_prv,
                budget_broken=budget_broken,
            )
            for (
                block,
                eps,
                rdp,
                prv,
                budget,
                retired,
                accountant,
                delta,
                retired_at,
                forgotten_at,
                charges,
                runs,
                unit,
                broken,
                broken_rdp,
                broken_prv,
                budget_broken,
            ) in rows
        ]

    def device_epsilon(self) -> float:
        """The device's ε: the largest enforced ε over its blocks (0 if none charged).

        Blocks are disjoint and each record (token window) lives in exactly
        one of them, so by parallel composition no record is exposed more
        than its block's ε; the device-wide record-level guarantee is the
        maximum over blocks, and for each employee-day it is that day's
        block ε. It is *not* a bound on everything the device ever held
        together (that would need group privacy over many records).
        """
        with self._lock:
            return self._device_epsilon()

    def _device_epsilon(self, series: _Series = _HONEST) -> float:
        row = self._conn.execute(
            f"""
            SELECT max(c.eps_enforced) FROM {series.charges} c
            WHERE c.id = (SELECT max(id) FROM {series.charges} y WHERE y.block = c.block)
            """
        ).fetchone()
        return float(row[0]) if row[0] is not None else 0.0

    def device_epsilon_broken(self) -> float:
        """The largest broken-aggregation ε over the device's days (0 if none charged)."""
        with self._lock:
            return self._device_epsilon(_BROKEN)

    def unanswered(self) -> list[int]:
        """Ids of charges whose round was never answered (crash, refusal after charge).

        Their ε stays counted; this list is for status and audits.
        """
        with self._lock:
            rows = self._conn.execute(
                "SELECT DISTINCT id FROM charges WHERE answered = 0 ORDER BY id"
            ).fetchall()
        return [r[0] for r in rows]

    # --- writing -----------------------------------------------------------------

    def admit(
        self,
        *,
        request: TrainingRequest,
        policy: DevicePolicy,
        blocks: Sequence[str],
        mechanism: Mechanism,
        broken_mechanism: Mechanism | None = None,
        epsilon_fn: EpsilonFn | None = None,
        now: float | None = None,
    ) -> Charge:
        """Check a round against the policy and the budgets; charge it durably or refuse.

        Call this *before* training (write-ahead): once it returns, the ε is
        spent whatever happens next.

        Parameters
        ----------
        request : TrainingRequest
            The round as asked (checked with ``policy.check_request``).
        policy : DevicePolicy
            The device policy in force (budget, δ, accountant, gap).
        blocks : sequence of str
            The blocks the round will read (already selected, e.g. by
            :meth:`DevicePolicy.select_blocks`); duplicates are ignored.
        mechanism : Mechanism
            Record unit: ``(σ, q, T)`` the trainer will run: σ and T must
            equal the request's, ``q`` is the Poisson rate over the union of
            the blocks' training windows. Employee-day unit: the mechanism an
            honest-but-curious server faces, ``(σ_eff, q_day, 1)`` with
            ``σ_eff <= σ`` (rounding's cost) and ``q_day`` the request's
            ``day_sample_rate``; charged against ``epsilon_per_day``.
        broken_mechanism : Mechanism, optional
            Employee-day unit only (required there): the mechanism a server
            that breaks secure aggregation faces, ``(σ_eff / √t, q_day, 1)``
            with ``t`` the policy's ``min_summed_devices``; charged against
            ``epsilon_per_day_broken_aggregation``. A day retires when either
            budget could not afford the same round again.
        epsilon_fn : callable, optional
            ``None`` (the default, and what the daemon uses): price with the
            block's stored :class:`~keystay.client.ledger.accounting.AccountantState`,
            composing only ``M`` into it (bounded time; see the module
            docstring), and store the new state with the charge. Otherwise
            ``epsilon_fn(history, delta) -> Epsilons`` for a composed history,
            called for ``history_b + [M]`` and ``history_b + [M, M]`` per
            distinct block history, and for ``[M]`` (memoised within a call).
        now : float, optional
            Unix seconds (tests); default ``time.time()``.

        Returns
        -------
        Charge

        Raises
        ------
        Refusal
            ``no-dp``, ``noise-below-floor``, ``clip-above-max``,
            ``too-many-steps``, ``bad-request``, ``unit-mismatch`` (from the
            policy), ``no-data`` (no blocks), ``block-retired`` (spent, or,
            for an employee-day round, charged before by a record-level
            round), ``too-soon``, ``budget-exceeded`` (either series). The
            ledger is unchanged.
        DeviceLedgerError
            If ``epsilon_fn`` gives NaN or a negative ε, or the write fails.
            The ledger is unchanged.
        ValueError
            If ``mechanism`` does not match the request (a daemon bug).
        """
        policy.check_request(request)
        wanted = tuple(dict.fromkeys(blocks))
        if not wanted:
            raise Refusal("no-data", "refused: the round has no blocks to train on")
        if request.privacy_unit == UNIT_DAY:
            self._check_day_mechanisms(mechanism, broken_mechanism, request, policy)
        else:
            if broken_mechanism is not None:
                raise ValueError("a record-level round has no broken-aggregation mechanism")
            self._check_mechanism(mechanism, request)
        now = time.time() if now is None else float(now)
        pricer = self._pricer(mechanism, policy.delta, epsilon_fn, _HONEST)
        broken_pricer = (
            None if broken_mechanism is None
            else self._pricer(broken_mechanism, policy.delta, epsilon_fn, _BROKEN)
        )

        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    charge = self._admit_locked(
                        request, policy, wanted, mechanism, pricer, broken_pricer, now
                    )
                    # In the same transaction: a charge is never committed untagged.
                    self._chain.append_charge(conn, charge.id)
                    conn.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT may already have ended the transaction.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, ChainError) as error:
                # Nothing was committed, so nothing was charged: the round must
                # not train (the daemon answers with an error, not an update).
                raise DeviceLedgerError(
                    f"cannot write the charge to {self.path} ({error}); nothing was charged "
                    "and the round must not train"
                ) from error
        return charge

    def _pricer(
        self, mechanism: Mechanism, delta: float, epsilon_fn: EpsilonFn | None, series: _Series
    ) -> _Pricer:
        if epsilon_fn is None:
            return _StatePricer(self, mechanism, delta, series)
        return _HistoryPricer(epsilon_fn, mechanism, delta)

    @staticmethod
    def _check_day_mechanisms(
        honest: Mechanism,
        broken: Mechanism | None,
        request: TrainingRequest,
        policy: DevicePolicy,
    ) -> None:
        """The two employee-day mechanisms must be the request's, as the contract states.

        One term per sampled day per round (``steps = 1``), the day rate the
        request asked, an honest σ no larger than the request's (rounding
        only lowers it) and a broken-aggregation σ no larger than the honest
        one over √t: a daemon bug that overstated the noise would make the
        device claim more privacy than it has, so it raises.
        """
        if broken is None:
            raise ValueError("an employee-day round needs its broken-aggregation mechanism")
        for name, m in (("mechanism", honest), ("broken_mechanism", broken)):
            if int(m.steps) != 1:
                raise ValueError(f"employee-day {name} has {m.steps} steps; a round is one")
            if float(m.sample_rate) != float(request.day_sample_rate):
                raise ValueError(
                    f"employee-day {name} sample_rate {m.sample_rate} differs from the "
                    f"request's day_sample_rate {request.day_sample_rate}"
                )
        if not 0.0 < float(honest.noise_multiplier) <= float(request.noise_multiplier):
            raise ValueError(
                f"employee-day noise multiplier {honest.noise_multiplier} is not in (0, "
                f"{request.noise_multiplier}] (the request's σ)"
            )
        share = float(honest.noise_multiplier) / math.sqrt(policy.min_summed_devices)
        if float(broken.noise_multiplier) > share * (1.0 + 1e-12):
            raise ValueError(
                f"broken-aggregation noise multiplier {broken.noise_multiplier} exceeds "
                f"σ_eff / √t = {share} (t = {policy.min_summed_devices})"
            )

    @staticmethod
    def _check_mechanism(mechanism: Mechanism, request: TrainingRequest) -> None:
        if float(mechanism.noise_multiplier) != float(request.noise_multiplier):
            raise ValueError(
                f"mechanism noise_multiplier {mechanism.noise_multiplier} differs from the "
                f"request's {request.noise_multiplier}"
            )
        if int(mechanism.steps) != int(request.local_steps):
            raise ValueError(
                f"mechanism steps {mechanism.steps} differ from the request's local_steps "
                f"{request.local_steps}"
            )
        q = float(mechanism.sample_rate)
        if not (0.0 < q <= 1.0):
            raise ValueError(f"mechanism sample_rate must be in (0, 1], got {q!r}")

    def _admit_locked(
        self,
        request: TrainingRequest,
        policy: DevicePolicy,
        wanted: tuple[str, ...],
        mechanism: Mechanism,
        pricer: _Pricer,
        broken_pricer: _Pricer | None,
        now: float,
    ) -> Charge:
        conn = self._conn
        marks = ",".join("?" * len(wanted))
        retired = conn.execute(
            f"SELECT block, retired_at FROM blocks WHERE retired = 1 AND block IN ({marks}) "
            "ORDER BY block",
            wanted,
        ).fetchall()
        if retired:
            names = tuple(r[0] for r in retired)
            detail = ", ".join(
                f"{b} (retired {_when(at)})" if at is not None else b for b, at in retired
            )
            raise Refusal(
                "block-retired",
                f"refused: block(s) {detail} spent their privacy budget and are never trained "
                "on again",
                names,
            )
        day = request.privacy_unit == UNIT_DAY
        if day:
            mixed = tuple(sorted(self._record_charged(wanted)))
            if mixed:
                raise Refusal(
                    "block-retired",
                    f"refused: block(s) {', '.join(mixed)} were trained on by record-level "
                    "rounds, which bound what one token window reveals but not the whole day; "
                    "their employee-day ε is unknown, so no employee-day round reads them",
                    mixed,
                )

        gap = policy.min_participation_gap_seconds
        if gap > 0:
            last = conn.execute("SELECT max(created) FROM participation").fetchone()[0]
            # A clock set back makes now - last negative: refused until the
            # clock passes last + gap (conservative: the gap is never shortened).
            if last is not None and now - last < gap:
                raise Refusal(
                    "too-soon",
                    f"refused: this device last took part in a round at {_when(last)}, "
                    f"{max(0.0, now - last):.0f} s ago; its policy asks for at least {gap:g} s "
                    f"between rounds ({POLICY_FILE} min_participation_gap_seconds); try again "
                    f"after {_when(last + gap)}",
                )

        accountant = policy.accountant
        budget = policy.epsilon_per_day if day else policy.epsilon_per_block
        budget_broken = policy.epsilon_per_day_broken_aggregation
        planned: list[_Planned] = []
        over: list[str] = []
        for block in wanted:
            history = self._history(block)
            plan = _Planned(
                block=block,
                history=history,
                before=self._spent(block, history, policy, pricer, _HONEST),
                after=pricer.after(block, history),
            )
            if broken_pricer is not None:
                broken_history = self._history(block, _BROKEN)
                plan.broken_history = broken_history
                plan.broken_before = self._spent(
                    block, broken_history, policy, broken_pricer, _BROKEN
                )
                plan.broken_after = broken_pricer.after(block, broken_history)
            planned.append(plan)
            if enforced_epsilon(plan.after, accountant) > budget or (
                plan.broken_after is not None
                and enforced_epsilon(plan.broken_after, accountant) > budget_broken
            ):
                over.append(block)
        if over:
            raise Refusal(
                "budget-exceeded",
                self._over_reason(planned, over, mechanism, policy, budget),
                tuple(over),
            )

        charge_id = int(conn.execute("SELECT coalesce(max(id), 0) + 1 FROM charges").fetchone()[0])
        results: list[BlockCharge] = []
        for plan in planned:
            block, history, after = plan.block, plan.history, plan.after
            # Retire when the same round could not be afforded once more (rule 6),
            # under either budget.
            again = pricer.again(block, history)
            retire = enforced_epsilon(again, accountant) > budget
            eps_after = enforced_epsilon(after, accountant)
            conn.execute(
                "INSERT INTO charges (id, block, created, run_id, server_round, "
                "noise_multiplier, sample_rate, steps, delta, eps_rdp, eps_prv, eps_prv_upper, "
                "eps_enforced, accountant, answered) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,0)",
                (
                    charge_id,
                    block,
                    now,
                    request.run_id,
                    int(request.server_round),
                    float(mechanism.noise_multiplier),
                    float(mechanism.sample_rate),
                    int(mechanism.steps),
                    policy.delta,
                    float(after.rdp),
                    float(after.prv),
                    float(after.prv_upper),
                    eps_after,
                    accountant_name(accountant),
                ),
            )
            pricer.store(block, charge_id)
            broken_eps: float | None = None
            broken_after: Epsilons | None = None
            if broken_pricer is not None and plan.broken_after is not None:
                broken_after = plan.broken_after
                broken_again = broken_pricer.again(block, plan.broken_history)
                retire = retire or enforced_epsilon(broken_again, accountant) > budget_broken
                broken_eps = enforced_epsilon(broken_after, accountant)
                broken_m = broken_pricer.mechanism
                conn.execute(
                    "INSERT INTO broken_charges (id, block, noise_multiplier, sample_rate, steps, "
                    "eps_rdp, eps_prv, eps_prv_upper, eps_enforced, budget) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        charge_id,
                        block,
                        float(broken_m.noise_multiplier),
                        float(broken_m.sample_rate),
                        int(broken_m.steps),
                        float(broken_after.rdp),
                        float(broken_after.prv),
                        float(broken_after.prv_upper),
                        broken_eps,
                        budget_broken,
                    ),
                )
                broken_pricer.store(block, charge_id)
            conn.execute(
                "INSERT INTO blocks (block, budget, retired, retired_at) VALUES (?,?,?,?) "
                "ON CONFLICT(block) DO UPDATE SET budget = excluded.budget, "
                "retired = max(retired, excluded.retired), "
                "retired_at = coalesce(retired_at, excluded.retired_at)",
                (block, budget, int(retire), now if retire else None),
            )
            results.append(
                BlockCharge(
                    block=block,
                    epsilon_rdp=float(after.rdp),
                    epsilon_prv=float(after.prv),
                    epsilon_prv_upper=float(after.prv_upper),
                    epsilon=eps_after,
                    epsilon_before=plan.before,
                    budget=budget,
                    retired=retire,
                    epsilon_broken=broken_eps,
                    epsilon_broken_rdp=None if broken_after is None else float(broken_after.rdp),
                    epsilon_broken_prv=None if broken_after is None else float(broken_after.prv),
                    epsilon_broken_before=plan.broken_before,
                    budget_broken=None if broken_after is None else budget_broken,
                )
            )
        conn.execute(
            "INSERT INTO participation (charge_id, created, run_id, server_round, blocks) "
            "VALUES (?,?,?,?,?)",
            (charge_id, now, request.run_id, int(request.server_round), len(wanted)),
        )
        charge = Charge(
            id=charge_id,
            created=now,
            run_id=request.run_id,
            server_round=int(request.server_round),
            mechanism=mechanism,
            delta=policy.delta,
            accountant=accountant_name(accountant),
            blocks=tuple(results),
            epsilon_round=pricer.alone(),
            epsilon_round_enforced=enforced_epsilon(pricer.alone(), accountant),
            epsilon_total=self._device_epsilon(),
        )
        if broken_pricer is None:
            return charge
        conn.execute(
            "INSERT INTO charge_units (id, unit, min_summed_devices, update_clip, "
            "day_sample_rate) VALUES (?,?,?,?,?)",
            (charge_id, UNIT_DAY, policy.min_summed_devices, float(request.update_clip),
             float(request.day_sample_rate)),
        )
        alone = broken_pricer.alone()
        return dataclasses.replace(
            charge,
            unit=UNIT_DAY,
            broken_mechanism=broken_pricer.mechanism,
            epsilon_round_broken=alone,
            epsilon_round_broken_enforced=enforced_epsilon(alone, accountant),
            epsilon_total_broken=self._device_epsilon(_BROKEN),
            min_summed_devices=policy.min_summed_devices,
            update_clip=float(request.update_clip),
            day_sample_rate=float(request.day_sample_rate),
        )

    def _spent(
        self,
        block: str,
        history: Sequence[Mechanism],
        policy: DevicePolicy,
        pricer: _Pricer,
        series: _Series,
    ) -> float:
        """The block's enforced ε now: from its last row if δ is unchanged, else recomputed."""
        if not history:
            return 0.0
        delta_of = "c.delta" if series is _HONEST else (
            "(SELECT delta FROM charges d WHERE d.id = c.id AND d.block = c.block)"
        )
        row = self._conn.execute(
            f"SELECT {delta_of}, c.eps_rdp, c.eps_prv, c.eps_prv_upper FROM {series.charges} c "
            "WHERE c.block = ? ORDER BY c.id DESC LIMIT 1",
            (block,),
        ).fetchone()
        if row is not None and row[0] == policy.delta:
            # The last row holds the ε of the whole history at this δ.
            stored = Epsilons(rdp=row[1], prv=row[2], prv_upper=row[3])
            return enforced_epsilon(stored, policy.accountant)
        return enforced_epsilon(pricer.now(block, history), policy.accountant)

    @staticmethod
    def _over_reason(
        planned: Sequence[_Planned],
        over: Sequence[str],
        mechanism: Mechanism,
        policy: DevicePolicy,
        budget: float,
    ) -> str:
        parts = []
        accountant = policy.accountant
        for plan in planned:
            if plan.block not in over:
                continue
            total = enforced_epsilon(plan.after, accountant)
            if total > budget or plan.broken_after is None:
                parts.append(
                    f"block {plan.block} has spent ε = {plan.before:.4g} of its budget "
                    f"{budget:g}; this round would cost {total - plan.before:.4g} more, "
                    f"bringing it to {total:.4g}"
                )
            if plan.broken_after is not None:
                broken = enforced_epsilon(plan.broken_after, accountant)
                limit = policy.epsilon_per_day_broken_aggregation
                if broken > limit:
                    spent = plan.broken_before or 0.0
                    parts.append(
                        f"block {plan.block} has spent ε = {spent:.4g} of its budget {limit:g} "
                        f"against a {ASSUMPTION_BROKEN}; this round would cost "
                        f"{broken - spent:.4g} more, bringing it to {broken:.4g}"
                    )
        keys = (
            "epsilon_per_block" if policy.privacy_unit == UNIT_RECORD
            else "epsilon_per_day, epsilon_per_day_broken_aggregation"
        )
        return (
            "refused: " + "; ".join(parts) + f" (σ = {mechanism.noise_multiplier:g}, sample "
            f"rate {mechanism.sample_rate:.4g}, {mechanism.steps} steps, δ = {policy.delta:g}, "
            f"ε bound {accountant_name(accountant)}; budget: {POLICY_FILE} {keys}). Nothing "
            "was trained or charged; ask for more noise or fewer steps, or leave these blocks out"
        )

    # --- accountant state --------------------------------------------------------

    def accountant_state(
        self, block: str, *, broken: bool = False
    ) -> accounting.AccountantState:
        """The block's composed accountant state, rebuilt from its history if need be.

        Read-only: a rebuilt state is stored by the next charge of the block.
        ``broken=True``: the broken-aggregation series' state.
        """
        with self._lock:
            return self._state(block, _BROKEN if broken else _HONEST)

    def _state(self, block: str, series: _Series = _HONEST) -> accounting.AccountantState:
        """The stored state if it is of this version, covers every charge row and verifies.

        The history is the source of truth: a state written by another grid
        or order set, missing rows written without it (an older keystay,
        ``epsilon_fn`` charges), or whose chain tag does not verify (edited,
        or stored before the chain), is recomputed from it (cost: once per
        distinct mechanism, then stored again with the next charge).
        """
        last, count = self._conn.execute(
            f"SELECT coalesce(max(id), 0), count(*) FROM {series.charges} WHERE block = ?",
            (block,),
        ).fetchone()
        if count == 0:
            return accounting.EMPTY_STATE
        row = self._conn.execute(
            f"SELECT version, last_charge, charges, state FROM {series.state} WHERE block = ?",
            (block,),
        ).fetchone()
        if row is not None and (row[0], row[1], row[2]) == (
            accounting.STATE_VERSION, last, count
        ) and self._state_verifies(block, series, int(last), int(count), row[3]):
            try:
                return accounting.state_from_bytes(bytes(row[3]))
            except ValueError:
                pass  # a damaged cache: rebuild it from the history below
        return accounting.state_of(self._history(block, series))

    def _state_verifies(
        self, block: str, series: _Series, last: int, count: int, state: object
    ) -> bool:
        """Whether the stored state of this version, ``last`` and ``count`` has a valid tag."""
        stored = self._conn.execute(
            "SELECT tag FROM state_tags WHERE state_table = ? AND block = ?",
            (series.state, block),
        ).fetchone()
        if stored is None or not isinstance(state, bytes) or not isinstance(stored[0], bytes):
            return False
        expected = self._chain.state_tag(
            series.state, block, accounting.STATE_VERSION, last, count, state
        )
        return hmac.compare_digest(expected, stored[0])

    def _store_state(
        self,
        block: str,
        state: accounting.AccountantState,
        charge_id: int,
        series: _Series = _HONEST,
    ) -> None:
        count = int(self._conn.execute(
            f"SELECT count(*) FROM {series.charges} WHERE block = ?", (block,)
        ).fetchone()[0])
        blob = accounting.state_to_bytes(state)
        self._conn.execute(
            f"INSERT INTO {series.state} (block, version, last_charge, charges, state) "
            "VALUES (?,?,?,?,?) ON CONFLICT(block) DO UPDATE SET version = excluded.version, "
            "last_charge = excluded.last_charge, charges = excluded.charges, "
            "state = excluded.state",
            (block, accounting.STATE_VERSION, charge_id, count, blob),
        )
        self._conn.execute(
            "INSERT INTO state_tags (state_table, block, tag) VALUES (?,?,?) "
            "ON CONFLICT(state_table, block) DO UPDATE SET tag = excluded.tag",
            (series.state, block, self._chain.state_tag(
                series.state, block, accounting.STATE_VERSION, charge_id, count, blob)),
        )

    def mark_answered(self, charge: Charge | int) -> None:
        """Record that the round of ``charge`` was answered. Its ε stays counted."""
        charge_id = charge.id if isinstance(charge, Charge) else int(charge)
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE charges SET answered = 1 WHERE id = ?", (charge_id,)
            )
            if cursor.rowcount == 0:
                raise DeviceLedgerError(f"no charge with id {charge_id} in {self.path}")

    def forget_block_data(self, block: str, *, now: float | None = None) -> bool:
        """Note that the store's data for ``block`` was deleted; keep every ledger row.

        The ledger holds mechanisms and ε figures only (no event, token or
        window), which is exactly what is needed to prove budgets were
        respected, so forgetting a day deletes nothing here. If the same day
        is recorded again later, its block id keeps its history: the new data
        inherits the old charges (conservative, never a refund).

        Returns
        -------
        bool
            Whether the ledger had charged ``block``.
        """
        stamp = time.time() if now is None else float(now)
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.execute(
                    "UPDATE blocks SET forgotten_at = coalesce(forgotten_at, ?) WHERE block = ?",
                    (stamp, block),
                )
                charged = cursor.rowcount > 0
                if charged:
                    self._chain.tag_block(conn, block)  # the row changed: so does its tag
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return charged


# --- pricing a round -------------------------------------------------------------------


def _checked(value: Epsilons, what: str) -> Epsilons:
    """``value`` if every figure is a number >= 0; never admit on an unknown ε."""
    for name in ("rdp", "prv", "prv_upper"):
        x = float(getattr(value, name))
        if math.isnan(x) or x < 0:
            raise DeviceLedgerError(
                f"accountant returned {name} = {x!r} for {what}; nothing was charged"
            )
    return value


class _Pricer(Protocol):
    """What :meth:`Ledger._admit_locked` asks about a round's mechanism ``M``.

    Every method is called inside the admit transaction.
    """

    @property
    def mechanism(self) -> Mechanism:
        """``M``."""

    def now(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        """ε of the block as it stands."""

    def after(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        """ε of the block after ``M``."""

    def again(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        """ε of the block after ``M`` twice (the retirement check)."""

    def alone(self) -> Epsilons:
        """ε of ``M`` alone."""

    def store(self, block: str, charge_id: int) -> None:
        """Persist whatever the block's next charge needs (called after its row is written)."""


class _HistoryPricer:
    """Prices with ``epsilon_fn`` over whole histories (memoised within one admit)."""

    def __init__(self, epsilon_fn: EpsilonFn, mechanism: Mechanism, delta: float) -> None:
        self._fn = epsilon_fn
        self._m = mechanism
        self._delta = delta
        self._cache: dict[tuple[tuple[float, float, int], ...], Epsilons] = {}

    @property
    def mechanism(self) -> Mechanism:
        return self._m

    def _eps(self, history: Sequence[Mechanism]) -> Epsilons:
        key = _key(history)
        if key not in self._cache:
            self._cache[key] = _checked(
                self._fn(list(history), self._delta),
                f"a history of {len(history)} mechanism(s)",
            )
        return self._cache[key]

    def now(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        return self._eps(history)

    def after(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        return self._eps([*history, self._m])

    def again(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        return self._eps([*history, self._m, self._m])

    def alone(self) -> Epsilons:
        return self._eps([self._m])

    def store(self, block: str, charge_id: int) -> None:
        """Nothing: the block's stored state (if any) is now stale and will be rebuilt."""


class _StatePricer:
    """Prices by composing ``M`` into each block's stored accountant state (bounded time)."""

    def __init__(
        self, ledger: Ledger, mechanism: Mechanism, delta: float, series: _Series
    ) -> None:
        self._ledger = ledger
        self._m = mechanism
        self._delta = delta
        self._series = series
        self._states: dict[str, tuple[accounting.AccountantState, ...]] = {}

    @property
    def mechanism(self) -> Mechanism:
        return self._m

    def _chain(self, block: str) -> tuple[accounting.AccountantState, ...]:
        """``(state, state + M, state + M + M)`` of the block, computed once per admit."""
        if block not in self._states:
            state = self._ledger._state(block, self._series)
            self._states[block] = (state, *accounting.compose_state_twice(state, self._m))
        return self._states[block]

    def _eps(self, state: accounting.AccountantState, what: str) -> Epsilons:
        try:
            value = accounting.state_epsilons(state, delta=self._delta)
        except (ValueError, FloatingPointError) as error:
            raise DeviceLedgerError(f"cannot compute ε for {what} ({error}); nothing was charged") \
                from error
        return _checked(value, what)

    def now(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        return self._eps(self._chain(block)[0], f"block {block}")

    def after(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        return self._eps(self._chain(block)[1], f"block {block} after this round")

    def again(self, block: str, history: Sequence[Mechanism]) -> Epsilons:
        return self._eps(self._chain(block)[2], f"block {block} after this round twice")

    def alone(self) -> Epsilons:
        return self._eps(accounting.mechanism_state(self._m), "this round alone")

    def store(self, block: str, charge_id: int) -> None:
        self._ledger._store_state(block, self._chain(block)[1], charge_id, self._series)
