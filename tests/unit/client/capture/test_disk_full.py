"""The device's disk fills for real: the recorder stops writing, keeps what is stored, resumes.

A 2 MB tmpfs is mounted under the test's tmp dir and filled with a filler file
while the recorder writes to an :class:`EventStore` on it. Needs root (to
mount); CI runs as root, elsewhere that test is skipped with that reason.
The status flag and its line in ``keystay device status`` are checked
without a mount.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from keystay.client.capture.recorder import Recorder
from keystay.client.store import EventStore
from keystay.common.events import KeyEvent
from keystay.common.tokens import Tokenizer
from tests.e2e.full_disk import fill, needs_root, small_tmpfs


def type_keys(rec: Recorder, n: int) -> None:
    t0 = time.monotonic()
    for i in range(n):
        rec.submit(KeyEvent(t0 + i * 1e-4, True, 38, "a"))
        rec.submit(KeyEvent(t0 + i * 1e-4 + 5e-5, False, 38, "a"))


def wait_for(predicate: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@needs_root
def test_full_disk_stops_writing_keeps_store_and_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keystay.client.capture.recorder")
    with small_tmpfs(tmp_path / "disk") as disk:
        store = EventStore.open(disk)
        rec = Recorder(store, Tokenizer(), flush_interval=0.05, batch_size=256)
        rec.start()
        try:
            type_keys(rec, 200)
            assert wait_for(lambda: rec.stats.tokens_written > 0 and rec.stats.queue_depth == 0)
            filler = fill(disk)
            # Keep typing until the store refuses (SQLite may still have room
            # in pages it already holds).
            for _ in range(200):
                type_keys(rec, 500)
                if wait_for(lambda: rec.stats.writing_stopped, timeout=0.3):
                    break
            stats = rec.stats
            assert stats.writing_stopped, "the store never refused a write on a full disk"
            assert stats.store_problem
            assert stats.records_pending > 0
            # What was committed before the disk filled is intact and readable.
            stored_before = sum(b.events for b in store.blocks())
            assert stored_before == stats.tokens_written
            for info in store.blocks():
                assert len(store.block_tokens(info.block)) == info.events

            stopped = [r for r in caplog.records if "stopped writing" in r.getMessage()]
            type_keys(rec, 200)  # more refused retries must not log again
            time.sleep(1.5)
            stopped = [r for r in caplog.records if "stopped writing" in r.getMessage()]
            assert len(stopped) == 1, [r.getMessage() for r in caplog.records]
            assert stopped[0].levelno == logging.ERROR

            filler.unlink()  # space returns
            assert wait_for(lambda: not rec.stats.writing_stopped, timeout=30.0)
            assert rec.stop()
            final = rec.stats
            assert final.records_pending == 0
            assert final.records_dropped == 0
            assert sum(b.events for b in store.blocks()) == final.tokens_written
            assert final.tokens_written > stored_before
            resumed = [r for r in caplog.records if "resumed writing" in r.getMessage()]
            assert len(resumed) == 1
        finally:
            rec.stop()
            store.close()


# --- the status flag (no mount needed) ------------------------------------------------


class _FullDisk:
    def append(self, block: str, records: object) -> None:
        import sqlite3

        raise sqlite3.OperationalError("database or disk is full")


def test_status_says_the_store_is_not_writing(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from keystay.client import device_cli
    from keystay.client.daemon.controls import Controls
    from tests.unit.client.daemon.test_core import make_core

    core, _ = make_core(tmp_path / "d")
    rec = Recorder(_FullDisk(), Tokenizer(), flush_interval=0.05)  # type: ignore[arg-type]
    controls = Controls(core, rec, "simulated", "test")
    assert not controls.status().store_writing_stopped
    rec.start()
    try:
        type_keys(rec, 20)
        assert wait_for(lambda: rec.stats.writing_stopped, timeout=10.0)
        reply = controls.status()
    finally:
        rec.stop(timeout=1.0)
    assert reply.store_writing_stopped
    assert "disk is full" in reply.store_problem

    monkeypatch.setattr(device_cli, "_call", lambda *_a, **_k: reply)
    out = CliRunner().invoke(device_cli.device, ["status", "--data", str(tmp_path / "d")])
    assert out.exit_code == 0, out.output
    assert "not writing: database or disk is full" in out.output
