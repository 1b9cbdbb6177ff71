"""The server ledger's verdict rules, without a database."""

from __future__ import annotations

from typing import Any

from keystay.server.ledger.records import FLAG_CONTRADICTION, FLAG_OVER_BUDGET
from keystay.server.ledger.rules import bigger, check_fields, history_findings


def _payload(total: float, *blocks: tuple[str, float, float]) -> dict[str, Any]:
    return {
        "epsilon_total": total,
        "blocks": [{"block": b, "epsilon": e, "budget": budget} for b, e, budget in blocks],
    }


def _flags(payload: dict[str, Any], **history: Any) -> list[tuple[str, str | None]]:
    facts = {"earlier_report": None, "best_previous": None, "block_history": {}, **history}
    return [(f.flag, f.block) for f in history_findings("dev-a", "run", 3, payload, **facts)]


def test_a_clean_first_report_has_no_findings() -> None:
    assert _flags(_payload(1.0, ("d1", 1.0, 2.0))) == []


def test_each_rule_fires_on_its_own_fact() -> None:
    payload = _payload(1.0, ("d1", 1.0, 2.0))
    assert _flags(payload, earlier_report=4) == [(FLAG_CONTRADICTION, None)]
    assert _flags(payload, best_previous=(2, 1.5)) == [(FLAG_CONTRADICTION, None)]
    assert _flags(payload, block_history={"d1": (1.2, False)}) == [(FLAG_CONTRADICTION, "d1")]
    assert _flags(payload, block_history={"d1": (0.5, True)}) == [(FLAG_CONTRADICTION, "d1")]
    assert _flags(_payload(3.0, ("d1", 3.0, 2.0))) == [(FLAG_OVER_BUDGET, "d1")]
    assert _flags(_payload(1.0, ("d1", 2.0, 5.0))) == [(FLAG_CONTRADICTION, "d1")]


def test_recomputation_noise_is_not_a_contradiction() -> None:
    payload = _payload(1.0, ("d1", 1.0, 2.0))
    assert _flags(payload, best_previous=(2, 1.0 + 1e-12),
                  block_history={"d1": (1.0 + 1e-12, False)}) == []
    assert not bigger(1.0 + 1e-12, 1.0) and bigger(1.0 + 1e-6, 1.0)


def test_shape_problems_are_sentences() -> None:
    problems = check_fields({"device_id": "dev-a", "blocks": [{"block": "d1"}, 3]})
    assert any("has no 'run_id'" in p for p in problems)
    assert any("blocks[1] is not an object" in p for p in problems)
    assert any("blocks[0] has no valid 'epsilon'" in p for p in problems)
