"""Both ε series of verified privacy reports, read in one place.

Design note
-----------
A device signs one of two report formats (see :mod:`keystay.server.ledger.verify`):

* ``keystay.privacy-report.v1`` (record level): one ε per block, per
  *record* (33 events); it holds against anyone who sees the device's
  update, the server included.
* ``keystay.privacy-report.v2`` (employee-day): two ε per day, per
  *employee-day*, each with its own budget: against an **honest-but-curious
  server**, which sees only the sum of at least ``t`` devices' updates
  (``epsilon``, ``budget``), and against a **server that breaks secure
  aggregation** and sees this device's share alone (``epsilon_broken``,
  ``budget_broken``).

The budget report (:mod:`keystay.server.report.budget`) and the round table
read the figures through this module, so the v2 keys are named once on the
server side. It reads payloads the ledger has already verified
(:meth:`~keystay.server.ledger.ledger.ServerLedger.record_report`); it never
verifies anything itself, and a caller must not pass unverified payloads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from keystay.server.ledger.records import DAY_ASSUMPTIONS, UNIT_DAY

__all__ = [
    "ASSUMPTION_BROKEN", "ASSUMPTION_HONEST", "UNIT_DAY", "UNIT_RECORD", "DayFigures",
    "day_figures", "mean_epsilons", "report_unit",
]

#: What a record-level report's ε is per, in the product's short word.
UNIT_RECORD = "record"
ASSUMPTION_HONEST, ASSUMPTION_BROKEN = DAY_ASSUMPTIONS


@dataclass(frozen=True, slots=True)
class DayFigures:
    """One block's figures in one verified report.

    Attributes
    ----------
    block : str
    unit : str
        ``"employee-day"`` (v2) or ``"record"`` (v1).
    epsilon, budget : float
        Employee-day: against an honest-but-curious server. Record: the
        record-level ε and budget.
    epsilon_broken, budget_broken : float or None
        Employee-day: against a server that breaks secure aggregation; None
        in a record-level report.
    retired : bool
    """

    block: str
    unit: str
    epsilon: float
    budget: float
    retired: bool
    epsilon_broken: float | None = None
    budget_broken: float | None = None


def report_unit(payload: Mapping[str, Any]) -> str:
    """``"employee-day"`` for an employee-day report, else ``"record"``."""
    return UNIT_DAY if payload.get("unit") == UNIT_DAY else UNIT_RECORD


def day_figures(payload: Mapping[str, Any]) -> list[DayFigures]:
    """Every block of a verified report, with its broken-aggregation figures when it has them."""
    unit = report_unit(payload)
    out = []
    for entry in payload.get("blocks") or []:
        broken = entry.get("epsilon_broken") if unit == UNIT_DAY else None
        broken_budget = entry.get("budget_broken") if unit == UNIT_DAY else None
        out.append(
            DayFigures(
                block=str(entry["block"]),
                unit=unit,
                epsilon=float(entry["epsilon"]),
                budget=float(entry["budget"]),
                retired=bool(entry["retired"]),
                epsilon_broken=None if broken is None else float(broken),
                budget_broken=None if broken_budget is None else float(broken_budget),
            )
        )
    return out


def mean_epsilons(reports: Iterable[Mapping[str, Any]]) -> tuple[float, float | None]:
    """Mean device ε of a round's verified reports: ``(honest_mean, broken_mean | None)``.

    Each report contributes its device total (the ε of the device's most
    spent day or block after the round): ``epsilon_total`` to the first
    mean, and, when it is an employee-day report, ``epsilon_total_broken``
    to the second. The first mean is against an honest-but-curious server
    (or record-level, for v1 reports); the second is against a server that
    breaks secure aggregation, over the employee-day reports only, and is
    ``None`` when no report has that series.

    Parameters
    ----------
    reports : iterable of mapping
        Payloads of reports the server ledger verified (parsed JSON).

    Returns
    -------
    tuple of (float, float or None)
        ``nan`` for the first when there is no report (the mean of nothing).

    >>> mean_epsilons([{"epsilon_total": 1.0}, {"epsilon_total": 2.0}])
    (1.5, None)
    >>> mean_epsilons([{"unit": "employee-day", "epsilon_total": 1.0,
    ...                 "epsilon_total_broken": 4.0}])
    (1.0, 4.0)
    """
    honest: list[float] = []
    broken: list[float] = []
    for payload in reports:
        honest.append(float(payload["epsilon_total"]))
        if report_unit(payload) == UNIT_DAY:
            broken.append(float(payload["epsilon_total_broken"]))
    honest_mean = math.fsum(honest) / len(honest) if honest else math.nan
    return honest_mean, (math.fsum(broken) / len(broken) if broken else None)
