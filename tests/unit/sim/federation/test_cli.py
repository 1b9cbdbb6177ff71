"""``keystay sim --help`` teaches the command; a bad run config exits 20 without a traceback."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from keystay.cli.main import main
from keystay.sim.federation.cli import reasons_line, summary_line


def test_help_names_the_example_and_exit_codes() -> None:
    result = CliRunner().invoke(main, ["sim", "--help"])
    assert result.exit_code == 0
    for words in ("--devices", "--fraction", "--json", "--ray-address", "Exit codes", "50"):
        assert words in result.output


def test_sim_is_listed_at_the_top_level() -> None:
    assert "sim" in CliRunner().invoke(main, ["--help"]).output


def test_a_bad_run_config_key_exits_20(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["sim", "--devices", "3", "--out", str(tmp_path),
                                       "--run-config", "nosie=1"])
    assert result.exit_code == 20, result.output
    assert "nosie" in result.output


def test_an_employee_day_run_below_t_devices_exits_20(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["sim", "--devices", "2", "--out", str(tmp_path)])
    assert result.exit_code == 20, result.output
    assert "at least 3 devices" in result.output
    assert "Traceback" not in result.output


def test_summary_line_names_each_assumption() -> None:
    line = summary_line({"seconds": 2.0, "days_charged": 4,
                         "epsilon_per_day_mean": {"honest-but-curious server": 1.5}})
    assert "honest-but-curious server: 1.500" in line and "4 days" in line


def test_reasons_are_counted_for_a_population_too_large_to_list() -> None:
    row = {"refusals": [{"node": n, "reason": "refused by device policy: no-data"}
                        for n in range(85)]
           + [{"node": 99, "reason": "refused by device policy: secagg-protocol"}],
           "unavailable": [{"node": 7, "reason": "no reply"}], "failed": []}
    assert reasons_line(row) == ("       refused: no-data 85, secagg-protocol 1; "
                                 "unavailable: no reply 1")
    assert reasons_line({"refusals": [], "unavailable": []}) is None
