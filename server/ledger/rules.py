"""The verdict rules of the server ledger, as pure functions.

Design
------
Whether a report is well-formed and whether it contradicts what the device
reported before are rules over values, not over storage: they live here as
functions of the payload and of the facts the ledger looked up (like Opacus's
``accountants/analysis``), so each rule is testable without a database and
the ledger (:mod:`keystay.server.ledger.ledger`) only gathers facts and
stores the outcome. The rules themselves are stated in the ledger's module
docstring ("Verdict rules").

ε figures are compared with a relative slack (:func:`bigger`): the same
history recomputed after a device restart may differ in the last bits.

>>> bigger(1.0 + 1e-12, 1.0), bigger(1.1, 1.0)
(False, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeGuard

from keystay.server.ledger.records import (
    FLAG_CONTRADICTION,
    FLAG_OVER_BUDGET,
    REQUIRED_BLOCK_FIELDS,
    REQUIRED_FIELDS,
    Finding,
)

# Relative slack when comparing ε figures: the same history recomputed after
# a device restart may differ in the last bits; anything larger is real.
_REL_TOL = 1e-9


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bigger(a: float, b: float) -> bool:
    """``a > b`` beyond recomputation noise."""
    return a > b + _REL_TOL * max(1.0, abs(b))


def _finite(value: int | float) -> bool:
    """Finite as a float. JSON integers are unbounded: one past float range in a
    signed payload is a malformed report, not an OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_fields(payload: Mapping[str, Any]) -> list[str]:
    """Problems with the payload's shape, as sentences (empty when well-formed)."""
    problems = []
    for name, types in REQUIRED_FIELDS.items():
        if name not in payload:
            problems.append(f"payload has no '{name}'")
            continue
        value = payload[name]
        if isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"payload '{name}' = {value!r} is not a {types[0].__name__}")
    for name in ("epsilon_total", "epsilon_round", "noise_multiplier", "delta", "sample_rate",
                 "max_grad_norm"):
        value = payload.get(name)
        if _is_number(value) and not (_finite(value) and value >= 0):
            problems.append(f"payload '{name}' = {value!r} is not a finite number >= 0")
    blocks = payload.get("blocks")
    if isinstance(blocks, list):
        seen: set[str] = set()
        for index, entry in enumerate(blocks):
            if not isinstance(entry, dict):
                problems.append(f"payload blocks[{index}] is not an object")
                continue
            for name, types in REQUIRED_BLOCK_FIELDS.items():
                value = entry.get(name)
                wrong_bool = isinstance(value, bool) and bool not in types
                if name not in entry or wrong_bool or not isinstance(value, types):
                    problems.append(f"payload blocks[{index}] has no valid '{name}'")
            eps, budget = entry.get("epsilon"), entry.get("budget")
            if _is_number(eps) and not (_finite(eps) and eps >= 0):
                problems.append(f"payload blocks[{index}] epsilon {eps!r} is not finite >= 0")
            if _is_number(budget) and not (_finite(budget) and budget > 0):
                problems.append(f"payload blocks[{index}] budget {budget!r} is not finite > 0")
            block = entry.get("block")
            if isinstance(block, str):
                if block in seen:
                    problems.append(f"payload lists block {block} twice")
                seen.add(block)
    return problems


def history_findings(
    device_id: str,
    run_id: str,
    server_round: int,
    payload: Mapping[str, Any],
    *,
    earlier_report: int | None,
    best_previous: tuple[int, float] | None,
    block_history: Mapping[str, tuple[float, bool]],
) -> list[Finding]:
    """Contradiction and over-budget findings of an authentic report, given its history.

    Parameters
    ----------
    device_id, run_id, server_round : str, str, int
        Who reported, for which run and round.
    payload : Mapping
        The verified, well-formed payload (:func:`check_fields` found nothing).
    earlier_report : int or None
        A verified report of the same device for the same run and round.
    best_previous : (int, float) or None
        The device's verified report with the largest total ε: (id, total).
    block_history : Mapping
        For each block of the payload seen before: (largest ε, ever retired).

    Returns
    -------
    list of Finding
        In a fixed order: a second report for the round, a total below an
        earlier one, then per block: above the total, over budget, below an
        earlier figure, charged after it retired.

    Examples
    --------
    >>> payload = {"epsilon_total": 2.0, "blocks": [
    ...     {"block": "2026-03-01", "epsilon": 2.0, "budget": 1.0}]}
    >>> [f.flag for f in history_findings("dev-1", "r", 1, payload, earlier_report=None,
    ...                                   best_previous=(7, 3.0), block_history={})]
    ['contradiction', 'over-budget']
    """
    findings: list[Finding] = []
    if earlier_report is not None:
        findings.append(
            Finding(
                FLAG_CONTRADICTION,
                f"device {device_id} already reported for run {run_id} round "
                f"{int(server_round)} (report #{earlier_report}); a device charges one report "
                "per round, so this one is a replay or a second charge",
            )
        )
    total = float(payload["epsilon_total"])
    if best_previous is not None and bigger(best_previous[1], total):
        best_id, best_total = best_previous
        findings.append(
            Finding(
                FLAG_CONTRADICTION,
                f"device {device_id} reports total ε {total:.6g}, below the {best_total:.6g} "
                f"it reported in report #{best_id}; budgets are never refunded",
            )
        )
    for entry in payload["blocks"]:
        block, eps, budget = entry["block"], float(entry["epsilon"]), float(entry["budget"])
        if bigger(eps, total):
            findings.append(
                Finding(
                    FLAG_CONTRADICTION,
                    f"block {block} ε {eps:.6g} exceeds the device total {total:.6g} in the "
                    "same report (the total is the largest block ε)",
                    block,
                )
            )
        if bigger(eps, budget):
            findings.append(
                Finding(
                    FLAG_OVER_BUDGET,
                    f"block {block} of device {device_id} has spent ε {eps:.6g}, over its "
                    f"budget {budget:.6g}",
                    block,
                )
            )
        if block not in block_history:
            continue
        before, was_retired = block_history[block]
        if bigger(before, eps):
            findings.append(
                Finding(
                    FLAG_CONTRADICTION,
                    f"block {block} of device {device_id} reports ε {eps:.6g}, below the "
                    f"{before:.6g} reported earlier; a block's ε never goes down",
                    block,
                )
            )
        if was_retired:
            findings.append(
                Finding(
                    FLAG_CONTRADICTION,
                    f"block {block} of device {device_id} retired in an earlier report "
                    "and was charged again; retired blocks are never trained on",
                    block,
                )
            )
    return findings
