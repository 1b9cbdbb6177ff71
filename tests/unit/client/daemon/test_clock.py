"""Wall-clock jumps, daylight saving and time-zone changes while recording.

The recorder takes a block (employee-day) from the wall clock; the core
(``DeviceCore.append``) keeps blocks in day order so that no day is reopened
after it was charged or retired. The clock is injected through the
recorder's ``block_for``; the core is real (store, ledger) with a fake
trainer, as in test_core.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from keystay.client.capture.recorder import Recorder
from keystay.client.store import block_for
from keystay.common.events import KeyEvent
from keystay.common.tokens import Tokenizer, TokenRecord

from .test_core import DAY, YESTERDAY, make_core, request, weights

TODAY = date.today().isoformat()
TOMORROW = (date.today() + timedelta(days=1)).isoformat()
BEFORE = (YESTERDAY - timedelta(days=1)).isoformat()


def recs(n: int = 5) -> list[TokenRecord]:
    return [TokenRecord(t=float(i), token=10) for i in range(n)]


def events_by_block(core: object) -> dict[str, int]:
    return {b.block: b.events for b in core.store.blocks()}  # type: ignore[attr-defined]


def test_clock_back_a_day_never_reopens_a_charged_day(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path / "d")
    core.train(request(), weights())  # charges the held days, DAY among them
    before = events_by_block(core)
    core.append(TODAY, recs())
    core.append(DAY, recs())  # the clock jumped back a day
    core.append(BEFORE, recs())  # and another
    after = events_by_block(core)
    assert after[DAY] == before[DAY]
    assert after.get(BEFORE) == before.get(BEFORE)
    assert after[TODAY] == 15


def test_charged_newest_day_sends_tokens_to_the_next_day(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path / "d")
    core.train(request(), weights())
    # Nothing written today yet, clock back to yesterday (charged): the next day.
    assert core.block_to_write(DAY) == TODAY
    assert events_by_block(core).get(TODAY) is None  # block_to_write writes nothing


def test_retired_day_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    core, _ = make_core(tmp_path / "d")
    monkeypatch.setattr(core.ledger, "retired_blocks", lambda: {DAY})
    assert core.block_to_write(DAY) == TODAY


def test_clock_forward_then_back_keeps_day_order(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path / "d")
    core.append(TODAY, recs())
    core.append(TOMORROW, recs())  # jumped forward a day
    core.append(TODAY, recs())  # and back: stays in the later day
    blocks = events_by_block(core)
    assert blocks[TODAY] == 5
    assert blocks[TOMORROW] == 10


def test_restart_after_a_clock_jump_remembers_the_newest_day(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path / "d")
    core.append(TOMORROW, recs())
    core.store.close()
    again, _ = make_core(tmp_path / "d", days=0)
    again.append(TODAY, recs())
    assert events_by_block(again)[TOMORROW] == 10
    assert TODAY not in events_by_block(again)


class Clock:
    """An injectable wall clock for the recorder's block_for."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def block_for(self, t: float) -> str:
        return block_for(t + self.offset)


def type_keys(rec: Recorder, n: int) -> None:
    t0 = time.monotonic()
    for i in range(n):
        rec.submit(KeyEvent(t0 + i * 1e-3, True, 38, "a"))
        rec.submit(KeyEvent(t0 + i * 1e-3 + 5e-4, False, 38, "a"))


def wait_written(rec: Recorder, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = rec.stats
        if s.queue_depth == 0 and s.records_pending == 0 and s.tokens_written:
            time.sleep(0.3)  # the reorder hold and one more tick
            return
        time.sleep(0.05)


def test_recorder_with_jumping_clock_keeps_blocks_in_order(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path / "d")
    core.train(request(), weights())
    before = events_by_block(core)
    clock = Clock()
    rec = Recorder(core, Tokenizer(), flush_interval=0.05, block_for=clock.block_for)
    rec.start()
    try:
        type_keys(rec, 20)
        wait_written(rec)
        clock.offset = -86400.0  # back a day: yesterday is charged
        type_keys(rec, 20)
        wait_written(rec)
        clock.offset = +86400.0  # forward a day
        type_keys(rec, 20)
        wait_written(rec)
        clock.offset = 0.0  # and back to now
        type_keys(rec, 20)
    finally:
        assert rec.stop()
    after = events_by_block(core)
    assert after[DAY] == before[DAY], "a charged day got new tokens"
    assert rec.stats.records_dropped == 0
    assert sum(after.values()) - sum(before.values()) == rec.stats.tokens_written
    assert set(after) - set(before) <= {TODAY, TOMORROW}
    assert after.get(TOMORROW, 0) > 0


@pytest.fixture
def tz() -> Iterator[None]:
    saved = os.environ.get("TZ")
    yield
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


def test_block_follows_local_midnight_across_dst(tz: None) -> None:
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    # 2026-03-29: clocks go 02:00 -> 03:00; the day is 23 hours long.
    start = datetime(2026, 3, 29, 0, 30).timestamp()
    end = datetime(2026, 3, 29, 23, 30).timestamp()
    assert end - start == 22 * 3600
    assert block_for(start) == block_for(end) == "2026-03-29"
    assert block_for(end + 3600) == "2026-03-30"
    # 2026-10-25: 03:00 -> 02:00; 02:30 happens twice, both on the same day.
    first = datetime(2026, 10, 25, 2, 30, fold=0).timestamp()
    second = datetime(2026, 10, 25, 2, 30, fold=1).timestamp()
    assert second - first == 3600
    assert block_for(first) == block_for(second) == "2026-10-25"


def test_time_zone_change_between_days_reopens_nothing(tmp_path: Path, tz: None) -> None:
    """Flying west moves midnight later: the same instant is 'yesterday' there."""
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    core, _ = make_core(tmp_path / "d")
    core.train(request(), weights())
    now = time.time()
    written = core.block_to_write(block_for(now))
    os.environ["TZ"] = "America/Los_Angeles"  # 17 hours behind Tokyo
    time.tzset()
    later = core.block_to_write(block_for(now + 60))
    assert later >= written
    assert later not in {t.block for t in core.ledger.totals()}
