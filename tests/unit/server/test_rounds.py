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


FAKE_FLWR = r'''#!{python}
import json, os, sys
from pathlib import Path
state = Path(os.environ["FAKE_FLWR_STATE"])
if sys.argv[1] == "run":
    # The log stream ends at once, while the run goes on (seen at 20 devices).
    print("Successfully started run 42")
    sys.exit(0)
if sys.argv[1] == "ls":
    assert sys.argv[2:5] == ["keystay", "--run-id", "42"], sys.argv
    calls = int(state.read_text()) if state.exists() else 0
    state.write_text(str(calls + 1))
    if calls == 0:  # the ServerApp writes its row while the run is still running
        rounds = Path(os.environ["FAKE_FLWR_ROUNDS"])
        rounds.parent.mkdir(parents=True, exist_ok=True)
        rounds.write_text(json.dumps({{"round": 1}}) + "\n")
    status = "running" if calls == 0 else "finished:completed"
    print(json.dumps({{"success": True, "runs": [{{"run-id": "42", "status": status}}]}}))
    sys.exit(0)
sys.exit(2)
'''


def test_a_log_stream_that_ends_early_does_not_end_the_run(tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    import sys

    from keystay.server import rounds as rounds_module
    from keystay.server.deploy import enrollment
    from keystay.server.settings import RunSettings

    fake = tmp_path / "flwr"
    fake.write_text(FAKE_FLWR.format(python=sys.executable))
    fake.chmod(0o755)
    settings = RunSettings(server_dir=tmp_path / "server", run_name="r", num_server_rounds=1)
    monkeypatch.setenv("FAKE_FLWR_STATE", str(tmp_path / "calls"))
    monkeypatch.setenv("FAKE_FLWR_ROUNDS", str(settings.run_dir / "rounds.jsonl"))
    monkeypatch.setattr(rounds_module, "executable", lambda name: str(fake))
    monkeypatch.setattr(enrollment, "executable", lambda name: str(fake))
    config = SimpleNamespace(write_flwr_home=lambda d: tmp_path, control_address="x")
    monkeypatch.setattr(rounds_module.ServerConfig, "load", classmethod(lambda cls, d: config))
    outcome = rounds_module.start_run(settings.server_dir, settings, poll=0.05)
    # Before: the outcome had 0 rounds as soon as `flwr run` ended.
    assert [row["round"] for row in outcome.rounds] == [1] and outcome.ok
    assert (tmp_path / "calls").read_text() == "2"
    assert "log stream ended while run 42 is running" in outcome.log_file.read_text()


def test_the_last_lines_shown_on_a_full_disk_leave_tracebacks_out(tmp_path: Path) -> None:
    """``keystay round start`` shows these when the run's log could not keep them.

    A CI run showed Flower's traceback of the ServerApp stopped by the full
    disk there; a person gets the raised error's own line instead.
    """
    from keystay.server.rounds import _RunLog

    log = _RunLog(tmp_path / "flwr-run.log")
    lines = [
        "INFO :      [ROUND 1]",
        '    raise RoundsFileError(',  # the tail can start mid-traceback
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "Traceback (most recent call last):",
        '  File "/srv/.venv/lib/python3.11/site-packages/flwr/server/run_serverapp.py", line 60',
        "    server_app(grid=grid, context=context)",
        "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
        "keystay.server.runlog.RoundsFileError: round 1's row was not appended: the server's "
        "disk is full",
        "ERROR :     Exit Code: 201",
    ]
    for line in lines:
        log.write(line.encode() + b"\n")
    shown = "\n".join(log.tail)
    assert "Traceback" not in shown and "File " not in shown and "^^^" not in shown
    assert "RoundsFileError: round 1's row was not appended" in shown
    assert shown.startswith("INFO :      [ROUND 1]") and shown.endswith("Exit Code: 201")
    assert (tmp_path / "flwr-run.log").read_text().count("\n") == len(lines)  # the file has all
