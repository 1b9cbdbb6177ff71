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

import functools
import math
from collections.abc import Mapping
from typing import Any, TypeGuard

from keystay.server.ledger.records import (
    DAY_ASSUMPTIONS,
    FLAG_CONTRADICTION,
    FLAG_OVER_BUDGET,
    REQUIRED_BLOCK_FIELDS,
    REQUIRED_DAY_BLOCK_FIELDS,
    REQUIRED_DAY_FIELDS,
    REQUIRED_FIELDS,
    UNIT_DAY,
    Finding,
)
from keystay.server.ledger.verify import REPORT_FORMAT_DAY

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


#: RDP orders the server recomputes a round's ε over: the device's own grid
#: (client/ledger/accounting.py RDP_ORDERS), so the same maths gives the same
#: figure; the server never imports the device's code.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 257)]
)
#: Relative slack between a device's RDP figure of one round and the server's
#: recomputation (two implementations of the same series; they agree to ~1e-10).
_RECOMPUTE_REL_TOL = 1e-6


@functools.lru_cache(maxsize=1024)
def round_epsilon_rdp(noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
    """RDP ε of one Poisson-subsampled Gaussian mechanism, as the device computes it.

    Opacus's RDP of the sampled Gaussian (Mironov, Talwar, Zhang 2019) over
    :data:`RDP_ORDERS`, converted with Balle et al. 2020, Thm. 21 (the
    device's conversion).

    Cached: every device of a round reports the same mechanism, and the
    recomputation (about 0.2 s of Opacus series per call) ran twice per report,
    so at 100 devices it was most of the ServerApp's round (issue 11,
    docs/scale.md). A pure function of its four numbers.

    >>> round(round_epsilon_rdp(4.0, 0.01, 10_000, 1e-5), 2)
    1.04
    """
    import numpy as np
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = np.asarray(RDP_ORDERS)
    curve = np.asarray(opacus_rdp.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=list(RDP_ORDERS)
    ))
    eps = curve + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    if np.isnan(eps).all():
        return math.inf
    return max(0.0, float(np.nanmin(eps)))


def _matches(reported: float, recomputed: float) -> bool:
    return abs(reported - recomputed) <= _RECOMPUTE_REL_TOL * max(1.0, abs(recomputed))


def check_day_fields(payload: Mapping[str, Any]) -> list[str]:
    """Problems with an employee-day report (format v2), as sentences.

    Shape: every v2 field, the unit ``employee-day``, the two assumption
    names. Figures: the round's mechanisms are one term per day
    (``steps == 1``) at the day rate; the broken-aggregation σ is at most
    σ/√t; and both series' ε of the round alone are **recomputed** from the
    report's (σ, q, 1, δ) and must match the device's RDP figures, with each
    enforced figure at or below its RDP figure (the device enforces
    ``min(rdp, pld)``). A report whose figures do not follow from its own
    mechanism is not accepted.
    """
    if payload.get("format") != REPORT_FORMAT_DAY:
        return []
    problems = []
    for name, types in REQUIRED_DAY_FIELDS.items():
        value = payload.get(name)
        if name not in payload or isinstance(value, bool) or not isinstance(value, types):
            problems.append(f"payload has no valid '{name}'")
    for index, entry in enumerate(payload.get("blocks") or []):
        if not isinstance(entry, dict):
            continue
        for name, types in REQUIRED_DAY_BLOCK_FIELDS.items():
            value = entry.get(name)
            if name not in entry or isinstance(value, bool) or not isinstance(value, types):
                problems.append(f"payload blocks[{index}] has no valid '{name}'")
    if problems:
        return problems
    if payload.get("unit") != UNIT_DAY:
        problems.append(f"a v2 report's unit must be {UNIT_DAY!r}, got {payload.get('unit')!r}")
    if payload["assumptions"] != DAY_ASSUMPTIONS:
        problems.append(f"a v2 report names the assumptions {DAY_ASSUMPTIONS}")
    numbers = ("noise_multiplier", "sample_rate", "delta", "noise_multiplier_broken",
               "epsilon_round_broken", "epsilon_round_broken_rdp", "epsilon_total_broken",
               "update_clip", "day_sample_rate", "epsilon_round_rdp", "epsilon_round")
    for name in numbers:
        value = payload.get(name)
        if not (_is_number(value) and _finite(value) and value >= 0):
            problems.append(f"payload '{name}' = {value!r} is not a finite number >= 0")
    t = payload["min_summed_devices"]
    if t < 1:
        problems.append(f"payload 'min_summed_devices' = {t!r} is below 1")
    if problems:
        return problems
    sigma, q, delta = (float(payload[k]) for k in ("noise_multiplier", "sample_rate", "delta"))
    broken = float(payload["noise_multiplier_broken"])
    if payload["steps"] != 1 or q != float(payload["day_sample_rate"]):
        problems.append("an employee-day round charges one term per day at the day rate: "
                        "steps must be 1 and sample_rate the day_sample_rate")
    if not (sigma > 0 and 0 < q <= 1 and 0 < delta < 1 and broken > 0):
        return [*problems, "mechanism out of range: need σ > 0, 0 < q <= 1, 0 < δ < 1"]
    if broken > sigma / math.sqrt(t) * (1 + 1e-12):
        problems.append(
            f"the device's own share σ {broken:.6g} is larger than σ/√t = "
            f"{sigma / math.sqrt(t):.6g}: the report overstates its noise"
        )
    for label, noise, rdp_key, enforced_key in (
        ("honest-but-curious", sigma, "epsilon_round_rdp", "epsilon_round"),
        ("broken-aggregation", broken, "epsilon_round_broken_rdp", "epsilon_round_broken"),
    ):
        recomputed = round_epsilon_rdp(noise, q, 1, delta)
        reported = float(payload[rdp_key])
        if not _matches(reported, recomputed):
            problems.append(
                f"{label} ε of the round is reported as {reported:.9g} (RDP) but its mechanism "
                f"(σ = {noise:.6g}, q = {q:.6g}, 1 step, δ = {delta:g}) gives {recomputed:.9g}"
            )
        if bigger(float(payload[enforced_key]), reported):
            problems.append(
                f"{label} enforced ε of the round {payload[enforced_key]!r} exceeds its RDP "
                f"bound {reported!r} (the device enforces min(rdp, pld))"
            )
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
        broken, broken_budget = entry.get("epsilon_broken"), entry.get("budget_broken")
        if _is_number(broken) and _is_number(broken_budget) and bigger(
            float(broken), float(broken_budget)
        ):
            findings.append(
                Finding(
                    FLAG_OVER_BUDGET,
                    f"block {block} of device {device_id} has spent ε {float(broken):.6g} "
                    "against a server that breaks secure aggregation, over its budget "
                    f"{float(broken_budget):.6g}",
                    block,
                )
            )
        broken_total = payload.get("epsilon_total_broken")
        if _is_number(broken) and _is_number(broken_total) and bigger(
            float(broken), float(broken_total)
        ):
            findings.append(
                Finding(
                    FLAG_CONTRADICTION,
                    f"block {block} broken-aggregation ε {float(broken):.6g} exceeds the "
                    f"device's broken-aggregation total {float(broken_total):.6g}",
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
