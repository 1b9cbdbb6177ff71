"""``rounds.jsonl`` after a SIGKILL: a torn row is skipped, never glued to the next one.

A ServerApp killed mid-append leaves half a line (docs/faults.md). Before, the
follower in ``keystay round start`` crashed on it, and the next run of the
same name glued its first row onto it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from keystay.server.app import RoundLog, score_and_write
from keystay.server.rounds import complete_rows


def test_the_line_being_written_is_left_for_later() -> None:
    assert complete_rows('{"round": 1}\n{"round": 2, "devi') == [{"round": 1}]
    assert complete_rows("") == []


def test_a_torn_line_is_none_and_later_rows_keep_their_place() -> None:
    rows = complete_rows('{"round": 1}\n{"rou\n{"round": 2}\n[1]\n')
    assert rows == [{"round": 1}, None, {"round": 2}, None]


class _Evaluator:
    population = SimpleNamespace(describe=lambda: {"employees": 1})

    def score(self, weights: Any) -> None:
        raise ValueError("not scored in this test")


def test_the_serverapp_starts_its_row_on_a_fresh_line(tmp_path: Path) -> None:
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text('{"round": 1}\n{"round": 2, "dev')  # killed mid-append
    score_and_write(_Evaluator(), [], RoundLog(server_round=2, started=0.0), rounds)  # type: ignore[arg-type]
    rows = complete_rows(rounds.read_text())
    assert rows[:2] == [{"round": 1}, None]
    assert rows[2] is not None and rows[2]["round"] == 2
    assert json.loads(rounds.read_text().splitlines()[-1])["round"] == 2
