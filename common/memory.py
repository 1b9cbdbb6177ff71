"""Freed memory handed back to the system after a round, not kept by the allocator.

A device daemon runs for months. Each round it decodes weights, reads a
day's tokens, talks to its trainer and (employee-day) masks a vector: tens
of MiB allocated and freed, much of it in many small pieces across the gRPC
server's threads. glibc's malloc keeps freed pieces for reuse and returns a
heap's memory to the system only from its top, so after a round the
daemon's RSS stays at its high-water mark, and with each round's pieces
landing in different places that mark creeps up. In the 70-minute soak at
1,000 events/s (``bench/bench_soak.py``) the daemon went from 111 to
121 MiB over seven rounds; ``malloc_trim(0)``, called into the live daemon
with gdb, brought it back to 113 MiB: most of the growth was free memory
the allocator held, not live objects.

:class:`MemoryReturner` calls ``malloc_trim(0)`` shortly after the round's
last call, once its reply has been sent and freed (one call per quiet
moment, however many RPCs a round makes). Measured once here: 8 ms to give
back about 100 MiB freed in 4 KB pieces, 0.3 ms when there is nothing to
give back. Where libc has no ``malloc_trim`` (another C library, another
OS) it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

#: Seconds after the last call of a burst before memory is returned: long
#: enough for gRPC to send and free the reply, short enough to follow a round.
SETTLE_SECONDS = 2.0


def _malloc_trim() -> Callable[[], object] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The process's own symbols hold libc's: no find_library, which runs ldconfig.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryReturner:
    """Returns free memory :data:`SETTLE_SECONDS` after the last of a burst of calls.

    Parameters
    ----------
    settle : float
        Seconds of quiet after :meth:`soon` before memory is returned.
    trim : Callable[[], object] | None
        What returns it (``malloc_trim(0)``); None where the platform has none.
    """

    def __init__(self, settle: float = SETTLE_SECONDS,
                 trim: Callable[[], object] | None = None) -> None:
        self._settle = settle
        self._trim = trim if trim is not None else _malloc_trim()
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def soon(self) -> None:
        """Return free memory once no further call has come for the settle time."""
        if self._trim is None:
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self._settle, self._run)
            self._timer.daemon = True
            self._timer.start()

    def _run(self) -> None:
        with self._lock:
            self._timer = None
        assert self._trim is not None
        self._trim()

    def cancel(self) -> None:
        """Drop a pending return (the daemon is stopping)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
