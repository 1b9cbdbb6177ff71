"""The recorder: raw events in, encrypted token batches out.

A backend's OS callbacks call :meth:`Recorder.submit`, which only puts the
event on a queue (or drops it at the door while recording is paused). One
writer thread wakes every ``flush_interval`` seconds, takes what is queued,
puts it in time order (input and focus events come from different threads and
connections; events younger than ``REORDER_S`` wait for the next tick in case
an earlier one is still on its way), turns the events into tokens with the
:class:`~keystay.common.tokens.Tokenizer` (which applies the excluded-app list),
groups the tokens by block (the employee-day of their wall-clock time) and
appends them to the :class:`~keystay.client.store.EventStore` in batches of up
to ``batch_size`` records. Tokens reach the store about ``flush_interval +
REORDER_S`` seconds after the event; :meth:`Recorder.stop` writes everything.

Why a queue and a thread: an OS input callback that blocks (on a disk write,
on the store's lock, on AES) delays the user's own input on some platforms and
makes the listener miss events on others; the callback must return in
microseconds whatever the disk is doing.

What happens on each kind of error (the writer never dies of one):

- **The store cannot write** (disk full, I/O error, database locked beyond the
  store's 30 s timeout, store closed): the batch stays in memory and is
  retried with backoff (1 s doubling to 60 s). The recorder has then *stopped
  writing*: it logs that once, as one error line, and says so in its stats
  (``writing_stopped``, shown by ``keystay device status``); when a retry
  succeeds it logs one line that writing resumed. Nothing already in the store
  is touched: each append is its own transaction, so a failed one leaves the
  committed batches as they were. Disks fill up and get cleaned
  (often by keystay's own retention), so dropping at once would lose data
  that could have been kept; but an always-on recorder must not grow without
  bound on the employee's machine, so past ``max_pending_records`` the
  *oldest* records are dropped and counted (``records_dropped``): recent
  behaviour is worth more to the model than old.
- **The store refuses a batch** (``ValueError``: bad block id or token id): a
  bug, and retrying cannot succeed, so the batch is dropped and counted at once
  rather than blocking everything queued behind it.
- **The tokenizer raises on an event**: that event is dropped and counted
  (``events_dropped_error``); one malformed event must not stop capture.
- **The queue is full** (the writer is stuck, e.g. behind a locked store):
  new events are dropped at the door and counted (``events_dropped_overflow``,
  which also counts events submitted before :meth:`start` or after
  :meth:`stop`), so memory stays bounded and the callback never blocks.

Every error sets ``stats.last_error`` (a sentence for a person) and is logged
once per kind of failure, not once per event.
"""

from __future__ import annotations

import bisect
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from keystay.client.store import StoreError, block_for
from keystay.common.events import AppFocus, RawEvent
from keystay.common.tokens import MOVE_GAP_S, Tokenizer, TokenRecord

log = logging.getLogger(__name__)

__all__ = ["REORDER_S", "Recorder", "RecorderStats", "TokenSink"]

REORDER_S = 0.25
"""Events are tokenized in time order once they are this old (see ``_drain``)."""
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0


class TokenSink(Protocol):
    """Where token batches go: an :class:`~keystay.client.store.EventStore`, or
    anything with its ``append`` (the daemon passes its core, which forwards to
    whichever store is current)."""

    def append(self, block: str, records: Sequence[TokenRecord]) -> None: ...


@dataclass(frozen=True, slots=True)
class RecorderStats:
    """A snapshot of the recorder's counters.

    Attributes
    ----------
    events_seen : int
        Events handed to :meth:`Recorder.submit` (including dropped ones).
    events_dropped_paused : int
        Events dropped at the door because recording was paused.
    events_dropped_overflow : int
        Events dropped because the queue held ``max_queue`` events (or the
        recorder was not running).
    events_dropped_error : int
        Events the tokenizer could not handle.
    tokens_written : int
        Token records committed to the store.
    batches_written : int
        Batches committed to the store.
    records_pending : int
        Token records held in memory, waiting for the store (see module doc).
    records_dropped : int
        Token records given up on (store full beyond the cap, or refused).
    queue_depth : int
        Events waiting for the writer thread (queued, or held for ordering).
    last_error : str or None
        The most recent problem, for a person to read.
    writing_stopped : bool
        The store refused the last write (disk full, I/O error, ...): tokens
        are held in memory (``records_pending``) and retried until it accepts.
    store_problem : str or None
        Why writing stopped, for a person; None while writing works.
    """

    events_seen: int
    events_dropped_paused: int
    events_dropped_overflow: int
    events_dropped_error: int
    tokens_written: int
    batches_written: int
    records_pending: int
    records_dropped: int
    queue_depth: int
    last_error: str | None
    writing_stopped: bool = False
    store_problem: str | None = None


def _event_time(item: Any) -> float:
    t: float = item.t
    return t


class _Control:
    """A command for the writer thread, queued in order with the events."""

    __slots__ = ("arg", "kind", "t")

    def __init__(self, kind: str, t: float, arg: Any = None) -> None:
        self.kind = kind  # "pause" | "resume" | "exclude" | "stop"
        self.t = t
        self.arg = arg


class Recorder:
    """Queue raw events, tokenize them on a writer thread, store them in batches.

    Parameters
    ----------
    store
        The open event store (or other :class:`TokenSink`) to append to; the
        recorder never closes it.
    tokenizer
        Owned by the recorder from now on: only the writer thread feeds it.
    batch_size
        Most token records per store batch (a tick's tokens are split into
        batches this size; fewer make one batch).
    flush_interval
        Seconds between the writer's ticks: each tick tokenizes what is queued
        and writes it. Longer ticks mean fewer wake-ups and larger batches.
    block_for
        Maps wall-clock seconds to a block id (an ISO date: the employee-day).
    max_queue
        Events the queue may hold before new ones are dropped.
    max_pending_records
        Token records kept in memory while the store cannot write.

    Examples
    --------
    >>> rec = Recorder(store, Tokenizer())          # doctest: +SKIP
    >>> rec.start(); backend = PynputBackend(rec.submit); backend.start()  # doctest: +SKIP
    >>> ...; backend.stop(); rec.stop()             # doctest: +SKIP
    """

    def __init__(
        self,
        store: TokenSink,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 512,
        flush_interval: float = 0.5,
        block_for: Callable[[float], str] = block_for,
        max_queue: int = 100_000,
        max_pending_records: int = 100_000,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval}")
        if max_queue < 1 or max_pending_records < 1:
            raise ValueError("max_queue and max_pending_records must be >= 1")
        self._store = store
        self._tokenizer = tokenizer
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._block_for = block_for
        self._max_queue = max_queue
        self._max_pending = max_pending_records

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._accepting = False
        # Guards the pause state and the door counters: submit() runs on the
        # backend's threads, pause()/resume() on the daemon's.
        self._lock = threading.Lock()
        self._paused = False
        self._paused_until: float | None = None

        self._events_seen = 0
        self._dropped_paused = 0
        self._dropped_overflow = 0
        # Written by the writer thread only.
        self._dropped_error = 0
        self._tokens_written = 0
        self._batches_written = 0
        self._records_dropped = 0
        self._last_error: str | None = None
        self._last_logged: str | None = None
        # Set by the writer thread while the store refuses writes (see module doc).
        self._store_problem: str | None = None

        # Writer-thread state: tokens not yet handed to the store, and batches
        # the store could not take yet (block, records), oldest first.
        self._buffer: list[TokenRecord] = []
        self._pending: list[Any] = []  # events (and controls) held back for ordering
        self._wake = threading.Event()
        self._retry: deque[tuple[str, list[TokenRecord]]] = deque()
        self._retry_count = 0
        self._retry_at = 0.0
        self._retry_delay = _RETRY_FIRST_S
        self._last_event_t: float | None = None

    # -- the door (called from OS callback threads) --------------------------

    def submit(self, event: RawEvent) -> None:
        """Accept one raw event from a backend callback. Never blocks, never raises.

        While paused, input events are dropped here and never reach the
        tokenizer. Focus changes still go through: the tokenizer records
        nothing for them while paused, but must know which application has the
        focus when recording resumes, or an excluded app focused during the
        pause would be recorded afterwards.
        """
        with self._lock:
            self._events_seen += 1
            if (
                self._paused
                and type(event) is not AppFocus
                and not self._expire_pause_locked()
            ):
                self._dropped_paused += 1
                return
            if not self._accepting or self._queue.qsize() >= self._max_queue:
                self._dropped_overflow += 1
                return
        self._queue.put(event)

    # -- control (called from the daemon) --------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            raise RuntimeError("Recorder.start() called twice")
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="keystay-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting events, write everything queued, end the writer thread.

        Returns
        -------
        bool
            True when every queued event was tokenized and every token written;
            False if the store still refused some (``stats.records_pending``)
            or the writer did not finish within ``timeout`` seconds.
        """
        with self._lock:
            self._accepting = False
        thread = self._thread
        if thread is None:
            return True
        self._queue.put(_Control("stop", time.monotonic()))
        self._wake.set()
        thread.join(timeout)
        if thread.is_alive():
            self._note_error(f"the recorder did not finish writing within {timeout:.0f} s")
            return False
        return not self._retry

    def pause(self, until: float | None = None) -> None:
        """Pause recording until wall-clock time ``until`` (``time.time()``), or until
        :meth:`resume` when ``until`` is None.

        A ``marker:paused`` token is written (in order with the events before
        it); input events are then dropped at the door. Pausing again while
        paused only changes ``until``.
        """
        now_wall = time.time()
        if until is not None and until <= now_wall:
            raise ValueError(
                f"pause until {until:.0f} is not in the future (now {now_wall:.0f}); "
                "pass None to pause until resume()"
            )
        with self._lock:
            was_paused = self._paused
            self._paused = True
            self._paused_until = until
            if not was_paused:
                self._queue.put(_Control("pause", time.monotonic()))

    def resume(self) -> None:
        """Resume recording now (a ``marker:resumed`` token is written)."""
        with self._lock:
            if self._paused:
                self._resume_locked(time.monotonic())

    @property
    def paused(self) -> bool:
        """Whether recording is paused (a timed pause that ran out counts as resumed)."""
        with self._lock:
            return self._paused and not self._expire_pause_locked()

    @property
    def paused_until(self) -> float | None:
        """Wall-clock end of the current pause; None when not paused or paused indefinitely."""
        with self._lock:
            if self._paused and not self._expire_pause_locked():
                return self._paused_until
            return None

    def set_excluded_apps(self, apps: Collection[str]) -> None:
        """Replace the excluded-application list; takes effect in event order."""
        self._queue.put(_Control("exclude", time.monotonic(), tuple(apps)))

    @property
    def stats(self) -> RecorderStats:
        """Counters for the daemon's status page and for tests."""
        return RecorderStats(
            events_seen=self._events_seen,
            events_dropped_paused=self._dropped_paused,
            events_dropped_overflow=self._dropped_overflow,
            events_dropped_error=self._dropped_error,
            tokens_written=self._tokens_written,
            batches_written=self._batches_written,
            records_pending=len(self._buffer) + self._retry_count,
            records_dropped=self._records_dropped,
            queue_depth=self._queue.qsize() + len(self._pending),
            last_error=self._last_error,
            writing_stopped=self._store_problem is not None,
            store_problem=self._store_problem,
        )

    def _expire_pause_locked(self) -> bool:
        """End a timed pause whose time has come; True if it just ended. Lock held."""
        until = self._paused_until
        if until is None:
            return False
        now_wall = time.time()
        if now_wall < until:
            return False
        # Stamp the marker when the pause ended, not when we noticed.
        self._resume_locked(time.monotonic() - (now_wall - until))
        return True

    def _resume_locked(self, t: float) -> None:
        self._paused = False
        self._paused_until = None
        self._queue.put(_Control("resume", t))

    # -- the writer thread ------------------------------------------------------

    def _run(self) -> None:
        wake = self._wake
        while True:
            # Sleep a whole tick and then drain everything, rather than block
            # in queue.get() and wake for every event: one wake-up per tick
            # instead of one per event is most of the recorder's idle-typing
            # CPU (bench/bench_recorder.py), and tokens are written per tick anyway.
            wake.wait(self._flush_interval)
            wake.clear()
            if self._drain():
                self._finish()
                return
            self._idle_tick()
            if self._buffer:
                self._write_buffer()
            elif self._retry and time.monotonic() >= self._retry_at:
                self._write_retries()

    def _drain(self, *, final: bool = False) -> bool:
        """Tokenize queued events in time order; write full batches as they fill.

        Returns True when the "stop" command was reached (everything before it
        is then processed, whatever its time).
        """
        get = self._queue.get_nowait
        pending = self._pending
        stop = final
        # qsize() is exact here: this thread is the only consumer.
        for _ in range(self._queue.qsize()):
            item = get()
            if type(item) is _Control and item.kind == "stop":
                stop = True
                break
            pending.append(item)
        if not pending:
            return stop
        # Input and focus come from different threads and connections, and
        # the input listener reads in bursts (its events carry the X server's
        # time): the queue's order is not quite the order things happened. A
        # key typed in an excluded app just before switching away must meet
        # the tokenizer before the focus change, so sort by time and hold back
        # the last REORDER_S seconds, in which a late event could still arrive.
        pending.sort(key=_event_time)
        if stop:
            ready, self._pending = pending, []
        else:
            cut = bisect.bisect_right(pending, time.monotonic() - REORDER_S, key=_event_time)
            ready, self._pending = pending[:cut], pending[cut:]
        feed = self._tokenizer.feed
        buffer = self._buffer
        batch_size = self._batch_size
        last = None
        for item in ready:
            if type(item) is _Control:
                self._control(item)
                continue
            last = item
            try:
                records = feed(item)
            except Exception as exc:  # see module doc: drop the event
                self._dropped_error += 1
                self._note_error(f"could not tokenize a {type(item).__name__}: {exc!r}")
                continue
            if records:
                buffer.extend(records)
                if len(buffer) >= batch_size:
                    self._write_buffer()
        if last is not None:
            self._last_event_t = last.t
        return stop

    def _control(self, item: _Control) -> None:
        tok = self._tokenizer
        if item.kind == "pause":
            records = tok.pause(item.t)
        elif item.kind == "resume":
            records = tok.resume(item.t)
        elif item.kind == "exclude":
            records = tok.set_excluded_apps(item.arg, item.t)
        else:  # pragma: no cover - internal misuse
            raise ValueError(f"unknown recorder control {item.kind!r}")
        self._buffer.extend(records)

    def _idle_tick(self) -> None:
        """Work that must happen without new events: timed resume, pending moves."""
        if self._paused_until is not None:
            with self._lock:
                if self._paused:
                    self._expire_pause_locked()
        # A pointer movement is only tokenized when something follows it. The
        # tokenizer itself closes a movement after MOVE_GAP_S without samples,
        # so flushing once that much time has passed (and nothing is queued)
        # changes no token; it just stops the last movement before a break
        # from waiting for the next event.
        last = self._last_event_t
        if (
            last is not None
            and time.monotonic() - last > MOVE_GAP_S
            and not self._pending
            and self._queue.qsize() == 0
        ):
            self._last_event_t = None
            self._buffer.extend(self._tokenizer.flush())

    def _finish(self) -> None:
        """Stop: tokenize everything still held or queued (in time order), write all."""
        self._drain(final=True)
        self._buffer.extend(self._tokenizer.flush())
        if self._buffer:
            self._write_buffer()
        if self._retry:
            self._write_retries()

    def _write_buffer(self) -> None:
        records = self._buffer[:]
        self._buffer.clear()
        # Token times are monotonic; the block is the wall-clock day. Convert
        # with the current offset, so a clock change moves only later batches.
        offset = time.time() - time.monotonic()
        to_block = self._block_for
        first = to_block(records[0].t + offset)
        if first == to_block(records[-1].t + offset):
            groups = [(first, records)]
        else:  # the batch straddles midnight: split it record by record
            by_block: dict[str, list[TokenRecord]] = {}
            for r in records:
                by_block.setdefault(to_block(r.t + offset), []).append(r)
            groups = list(by_block.items())
        if self._retry:
            # Keep block order: older batches the store refused go first.
            for block, recs in groups:
                self._hold(block, recs)
            if time.monotonic() >= self._retry_at:
                self._write_retries()
            return
        for i, (block, recs) in enumerate(groups):
            if not self._append(block, recs):
                for later_block, later in groups[i:]:
                    self._hold(later_block, later)
                return

    def _write_retries(self) -> None:
        while self._retry:
            block, recs = self._retry[0]
            if not self._append(block, recs):
                return
            self._retry.popleft()
            self._retry_count -= len(recs)
        self._retry_delay = _RETRY_FIRST_S

    def _append(self, block: str, records: list[TokenRecord]) -> bool:
        """Write one batch; on failure apply the module doc's policy. True if written."""
        try:
            self._store.append(block, records)
        except ValueError as exc:
            self._records_dropped += len(records)
            self._note_error(f"the store refused {len(records)} tokens for {block}: {exc}")
            return True  # dropped for good: do not retry
        except (StoreError, sqlite3.Error, OSError) as exc:
            message = (
                f"could not write to the event store ({exc}); keeping up to "
                f"{self._max_pending} tokens in memory and retrying"
            )
            self._last_error = message
            if self._store_problem is None:
                # One line when writing stops, one when it resumes: a full
                # disk retried every minute for a day must not flood the log.
                log.error(
                    "recorder stopped writing: %s; tokens already stored are kept",
                    message,
                )
            self._store_problem = f"{exc}"
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX_S)
            return False
        if self._store_problem is not None:
            self._store_problem = None
            log.warning(
                "recorder resumed writing: the event store accepts batches again "
                "(%d tokens dropped while it did not)", self._records_dropped,
            )
        self._tokens_written += len(records)
        self._batches_written += 1
        return True

    def _hold(self, block: str, records: list[TokenRecord]) -> None:
        if self._retry and self._retry[-1][0] == block:
            self._retry[-1][1].extend(records)
        else:
            self._retry.append((block, list(records)))
        self._retry_count += len(records)
        excess = self._retry_count - self._max_pending
        while excess > 0:
            _, oldest = self._retry[0]
            cut = min(excess, len(oldest))
            del oldest[:cut]
            if not oldest:
                self._retry.popleft()
            self._retry_count -= cut
            self._records_dropped += cut
            excess -= cut

    def _note_error(self, message: str) -> None:
        self._last_error = message
        kind = message.split("(", 1)[0]
        if kind != self._last_logged:  # log each kind once, not once per event
            self._last_logged = kind
            log.warning("%s", message)
