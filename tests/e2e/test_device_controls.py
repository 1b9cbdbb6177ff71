"""The employee's controls against a real running daemon, through the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest

from keystay.server.deploy.superlink import executable, flower_env
from tests.e2e.running_daemon import simulated_daemon

pytestmark = pytest.mark.e2e

YESTERDAY = (date.today() - timedelta(days=1)).isoformat()


def keystay(*args: str, check: bool = True,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([executable("keystay"), *args], capture_output=True, text=True,
                          env=flower_env(), check=check, input=stdin, timeout=120)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "device"
    with simulated_daemon(data, tmp_path / "daemon.log", seed=7) as process:
        yield data
    assert process.returncode == 0, (tmp_path / "daemon.log").read_text()[-2000:]


def status(data: Path) -> dict:
    reply = json.loads(keystay("device", "status", "--data", str(data), "--json").stdout)
    # protobuf's JSON mapping writes 64-bit integers as strings
    reply["eventsToday"] = int(reply.get("eventsToday", 0))
    return reply


def test_pause_resume_show_export_forget(daemon: Path, tmp_path: Path) -> None:
    first = status(daemon)
    assert first["recording"] is True
    assert first["source"] == "simulated"
    assert {b["block"] for b in first["blocks"]} >= {YESTERDAY}

    # The live simulated employee keeps typing into today's block.
    deadline = time.monotonic() + 30
    while status(daemon)["eventsToday"] == 0:
        assert time.monotonic() < deadline, "no live events reached today's block"
        time.sleep(0.5)

    out = keystay("device", "pause", "--data", str(daemon), "--for", "30m").stdout
    assert "paused until" in out
    paused = status(daemon)
    assert paused["recording"] is False and paused["pausedUntil"]
    time.sleep(1.5)  # let the writer flush what was queued before the pause
    frozen = status(daemon)["eventsToday"]
    time.sleep(2.0)
    assert status(daemon)["eventsToday"] == frozen, "events were kept while paused"

    keystay("device", "resume", "--data", str(daemon))
    assert status(daemon)["recording"] is True

    shown = json.loads(keystay("device", "show", "--data", str(daemon), "--day", YESTERDAY,
                               "--json").stdout)
    block = shown["blocks"][0]
    assert block["block"] == YESTERDAY and block["events"] == 1500
    assert sum(block["tokens_by_kind"].values()) == 1500
    assert "text" not in json.dumps(shown)

    out_file = tmp_path / "export.json"
    keystay("device", "export", "--data", str(daemon), "--day", YESTERDAY, "--out", str(out_file))
    exported = json.loads(out_file.read_text())
    assert exported["format"] == "keystay-export/1"
    assert len(exported["events"]) == 1500
    assert all("text" not in e for e in exported["events"])  # raw text is off by default
    assert out_file.stat().st_mode & 0o077 == 0

    missing = keystay("device", "show", "--data", str(daemon), "--day", "1999-01-01", check=False)
    assert missing.returncode != 0 and "no block for day 1999-01-01" in missing.stderr

    keystay("device", "forget", "--data", str(daemon), "--day", YESTERDAY, "--yes")
    assert YESTERDAY not in {b["block"] for b in status(daemon)["blocks"]}

    key = daemon / "store.key"
    old_key = key.read_bytes()
    out = keystay("device", "forget", "--data", str(daemon), "--all", "--yes").stdout
    assert "key destroyed" in out
    assert key.read_bytes() != old_key  # a fresh key; the old one is gone
    assert all(b["block"] == date.today().isoformat() for b in status(daemon)["blocks"])


def test_no_display_is_explained(tmp_path: Path) -> None:
    env = flower_env()
    env.pop("DISPLAY", None)
    result = subprocess.run(
        [executable("keystay"), "device", "run", "--data", str(tmp_path / "d"),
         "--source", "pynput"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert result.returncode == 12, result.stderr
    assert "DISPLAY" in result.stderr and "Traceback" not in result.stderr


def test_kill_9_mid_write_leaves_a_store_that_opens(tmp_path: Path) -> None:
    """SIGKILL the daemon while its recorder writes; the store opens and reads whole."""
    from keystay.client.store import EventStore

    data = tmp_path / "device"
    log = (tmp_path / "daemon.log").open("wb")
    process = subprocess.Popen(
        [executable("keystay"), "device", "run", "--data", str(data), "--source", "simulated",
         "--employee-seed", "3"],
        stdout=log, stderr=subprocess.STDOUT, env=flower_env(), start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (data / "federation.sock").exists() or status(data)["eventsToday"] < 200:
            assert process.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the live source wrote nothing"
            time.sleep(0.3)
        written = status(data)["eventsToday"]
        process.kill()  # SIGKILL to the daemon alone, mid-recording
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        # The trainer child notices its parent is gone; clean up the group regardless.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    with EventStore.open(data) as store:
        today = date.today().isoformat()
        records = store.read_block(today)  # authenticates every batch; raises if torn
        assert len(records) >= written
