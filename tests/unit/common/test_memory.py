"""MemoryReturner: one malloc_trim per quiet moment, and what it gives back."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from keystay.client.daemon.core import DeviceCore
from keystay.client.daemon.service import FederationServicer
from keystay.common.memory import MemoryReturner, _malloc_trim
from keystay.v1 import device_pb2


class Counting:
    def __init__(self) -> None:
        self.calls = 0
        self.done = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.done.set()


def test_a_burst_of_calls_returns_memory_once_after_it() -> None:
    trim = Counting()
    returner = MemoryReturner(settle=0.2, trim=trim)
    for _ in range(5):  # a round's calls: setup, share keys, masking, unmask...
        returner.soon()
        time.sleep(0.02)
    assert trim.calls == 0  # not while the round goes on
    assert trim.done.wait(5.0)
    time.sleep(0.3)
    assert trim.calls == 1


def test_a_cancelled_return_does_not_happen() -> None:
    trim = Counting()
    returner = MemoryReturner(settle=0.1, trim=trim)
    returner.soon()
    returner.cancel()
    time.sleep(0.3)
    assert trim.calls == 0


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_malloc_trim_gives_back_what_the_allocator_kept() -> None:
    """Why the daemon calls it: freed pieces between live ones stay in RSS until trimmed."""
    trim = _malloc_trim()
    if trim is None:
        pytest.skip("this C library has no malloc_trim")
    trim()
    pieces = [bytes(4000) for _ in range(40_000)]  # ~160 MiB in malloc'd pieces
    kept = pieces[::64]  # a live piece every 256 KiB: the heap cannot shrink from its top
    del pieces
    held = _rss_mib()
    trim()
    given_back = held - _rss_mib()
    assert given_back > 50, f"malloc_trim gave back only {given_back:.1f} MiB"
    assert len(kept) == 625


class _AbortedError(Exception):
    pass


class _Context:
    def abort(self, code: Any, message: str) -> None:
        raise _AbortedError(message)


def test_the_federation_servicer_returns_memory_after_every_call_even_a_refused_one() -> None:
    calls: list[str] = []

    class Recording(MemoryReturner):
        def soon(self) -> None:
            calls.append("soon")

    servicer = FederationServicer(cast(DeviceCore, object()), Recording(trim=lambda: None))
    with pytest.raises(_AbortedError):
        servicer.Train(device_pb2.TrainRequest(), _Context())  # type: ignore[arg-type]
    with pytest.raises(_AbortedError):
        servicer.SecAggStage(device_pb2.SecAggStageRequest(), _Context())  # type: ignore[arg-type]
    assert calls == ["soon", "soon"]
