"""``keystay sim`` end to end: a tiny population, on a private Ray and on a Ray head.

The cluster path is exercised, not just described: the test starts a Ray
head (``ray start --head --num-cpus 1``) with its own temp folder, runs
``keystay sim --ray-address`` against it, and stops the head by the PIDs of
its processes at the end (never ``ray stop``, which would stop every Ray of
this user on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystay.server.deploy.superlink import executable, flower_env
from keystay.sim.federation.progress import StageTally

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _sim(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    out = tmp_path / "sim.jsonl"
    result = subprocess.run(
        [executable("keystay"), "sim", "--devices", "3", "--rounds", "2", "--days", "2",
         "--out", str(tmp_path / "run"), "--json", str(out),
         "--run-config", "local-steps=3", *extra],
        capture_output=True, text=True, env=flower_env(), timeout=900, check=False,
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return result, lines


def _check(result: subprocess.CompletedProcess[str], lines: list[dict]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["devices_sampled"] == 3  # the whole population, first round included
        assert line["devices_answered"] + line["refused"] == 3
        assert 0.0 <= line["heldout_accuracy"] <= 1.0
    # Every answering device charged its days; ε only grows across rounds.
    first, second = (next(iter(line["epsilon_per_day_mean"].values())) for line in lines)
    assert 0 < first < second
    assert "round sampled" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.parametrize("unit", ["employee-day", "record"])
def test_keystay_sim_runs_the_deployment_server_app_over_in_process_devices(
    tmp_path: Path, unit: str,
) -> None:
    # employee-day (the default): SecAgg+ through each device's daemon stages;
    # record: plain Train rounds with DP-SGD.
    result, lines = _sim(tmp_path, "--privacy-unit", unit)
    _check(result, lines)
    # The reports name their unit: "employee-day", or the record unit's sentence.
    for line in lines:
        assert (line["privacy_unit"] == ["employee-day"]) == (unit == "employee-day"), line
    assumptions = set(lines[-1]["epsilon_per_day_mean"])
    assert ("server that breaks secure aggregation" in assumptions) == (unit == "employee-day")
    # The devices' own ledgers hold the charges the server verified.
    devices = sorted(d for d in (tmp_path / "run" / "devices").iterdir() if d.is_dir())
    assert len(devices) == 3 and all((d / "ledger.v1.sqlite").exists() for d in devices)
    # What the progress line counted: every device's answer to every message.
    stages = (["setup", "share_keys", "collect_masked_vectors", "unmask"]
              if unit == "employee-day" else ["train"])
    tally = StageTally(tmp_path / "run" / "devices", per_round=3)
    for server_round in (1, 2):
        assert tally.counts(server_round) == dict.fromkeys(stages, 3)


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    temp = Path("/tmp") / f"ks-ray-{os.getpid()}"  # Ray's socket paths must stay short
    env = {**flower_env(), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    # Its own session: every process the head starts (GCS, raylet, workers) keeps
    # the session id, which is the PID of `ray start`; they are stopped by PID.
    starter = subprocess.Popen(
        [executable("ray"), "start", "--head", "--port", str(port), "--num-cpus", "1",
         "--include-dashboard=false", "--temp-dir", str(temp), "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    output, _ = starter.communicate(timeout=180)
    assert starter.returncode == 0, output.decode(errors="replace")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _session_pids(starter.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(3)
        assert not _session_pids(starter.pid)


def test_keystay_sim_on_a_ray_head_started_here(tmp_path: Path, ray_head: str) -> None:
    result, lines = _sim(tmp_path, "--ray-address", ray_head)
    _check(result, lines)
