"""Recorder error policy and pause, without X (candidate for tests/unit/client/capture/)."""
from __future__ import annotations

import time

from keystay.client.capture.recorder import Recorder
from keystay.client.store import StoreError
from keystay.common.events import AppFocus, KeyEvent
from keystay.common.tokens import Tokenizer, TokenRecord, token_name


class FlakyStore:
    def __init__(self, fail_times: int) -> None:
        self.fail_times = fail_times
        self.batches: list[tuple[str, list[TokenRecord]]] = []

    def append(self, block: str, records: list[TokenRecord]) -> None:
        if self.fail_times > 0:
            self.fail_times -= 1
            raise StoreError("database or disk is full")
        self.batches.append((block, list(records)))


def keys(n: int, t0: float) -> list[KeyEvent]:
    out = []
    for i in range(n):
        out.append(KeyEvent(t0 + i * 0.01, True, 38, "a"))
        out.append(KeyEvent(t0 + i * 0.01 + 0.005, False, 38, "a"))
    return out


def test_store_failure_keeps_tokens_and_retries() -> None:
    store = FlakyStore(fail_times=1)
    rec = Recorder(store, Tokenizer(), flush_interval=0.05)  # type: ignore[arg-type]
    rec.start()
    t0 = time.monotonic()
    for e in keys(5, t0):
        rec.submit(e)
    assert rec.stop()
    written = [r for _, b in store.batches for r in b]
    assert len(written) == 15  # flight + key + dwell per key
    assert rec.stats.records_dropped == 0
    assert "disk is full" in (rec.stats.last_error or "")


def test_store_full_beyond_cap_drops_oldest() -> None:
    store = FlakyStore(fail_times=10**9)
    rec = Recorder(store, Tokenizer(), flush_interval=0.05, max_pending_records=6)  # type: ignore[arg-type]
    rec.start()
    t0 = time.monotonic()
    for e in keys(4, t0):
        rec.submit(e)
    assert not rec.stop()
    assert rec.stats.records_pending == 6
    assert rec.stats.records_dropped == 12 - 6
    store.fail_times = 0
    rec._write_retries()  # the kept ones are the newest
    kept = [r for _, b in store.batches for r in b]
    assert [r.t for r in kept] == sorted(r.t for r in kept)
    assert kept[-1].t == t0 + 3 * 0.01 + 0.005


def test_pause_drops_input_but_not_focus_and_writes_markers() -> None:
    store = FlakyStore(fail_times=0)
    rec = Recorder(store, Tokenizer(excluded_apps=["vault"]), flush_interval=0.05)  # type: ignore[arg-type]
    rec.start()
    t0 = time.monotonic()
    rec.submit(AppFocus(t0, "editor"))
    rec.pause()
    rec.submit(AppFocus(time.monotonic(), "vault"))
    for e in keys(2, time.monotonic()):
        rec.submit(e)
    rec.resume()  # vault still focused: nothing may be recorded after this
    for e in keys(2, time.monotonic()):
        rec.submit(e)
    assert rec.stop()
    names = [token_name(r.token) for _, b in store.batches for r in b]
    assert names == ["app:other", "marker:paused"]
    assert rec.stats.events_dropped_paused == 4


def test_timed_pause_resumes_by_itself() -> None:
    store = FlakyStore(fail_times=0)
    rec = Recorder(store, Tokenizer(), flush_interval=0.05)  # type: ignore[arg-type]
    rec.start()
    rec.pause(until=time.time() + 0.2)
    assert rec.paused and rec.paused_until is not None
    deadline = time.monotonic() + 5
    while rec.paused and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not rec.paused
    rec.submit(KeyEvent(time.monotonic(), True, 38, "a"))
    assert rec.stop()
    names = [token_name(r.token) for _, b in store.batches for r in b]
    assert names[:2] == ["marker:paused", "marker:resumed"]
    assert names[-1] == "key:letter"
