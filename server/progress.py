"""What ``keystay round start`` shows while it waits: devices, round n of N, replies, time.

Design note
-----------
Two faces of one object, :class:`RoundProgress`, chosen by whether stdout
is a terminal:

* a terminal gets a live ``rich`` progress bar (round n of N, devices
  connected, replies in the last round, time elapsed) that redraws itself
  on rich's own refresh thread, with each round's table lines printed above
  it as they land;
* anything else (a pipe, a CI log, a file) gets plain lines: each round's
  lines as they land and, while nothing happens, one ``waiting:`` line at
  most every ``heartbeat`` seconds, so a log shows the run is alive without
  terminal control codes.

"Devices connected" comes from a callable (the CLI passes the SuperLink's
node list via ``flwr supernode list``) polled on a background thread every
``poll`` seconds; when it fails or there is none the figure is shown as
unknown rather than guessed. "Replies" is the last round's
``devices_reported`` of ``devices_sampled``. A run that can see inside a
round (``keystay sim`` counts the stages its virtual devices answered,
:mod:`keystay.sim.federation.progress`) passes ``activity``, polled on the
same thread with the round in progress; its text takes the place of the
device count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class RoundProgress:
    """Progress of one run, live in a terminal and as plain lines elsewhere.

    Parameters
    ----------
    total_rounds : int
    stream : TextIO
        Where to write (stdout).
    connected : callable, optional
        Returns the number of devices connected now; may raise.
    activity : callable, optional
        Given the round in progress, returns what has happened in it so far
        (e.g. ``setup 1000/1000, masked vectors 412/1000``); may raise.
    live : bool, optional
        Force the terminal face on or off (default: ``stream.isatty()``).
    poll, heartbeat : float
        Seconds between device-count polls, and between plain ``waiting:`` lines.
    """

    def __init__(
        self,
        total_rounds: int,
        stream: TextIO,
        connected: Callable[[], int] | None = None,
        *,
        activity: Callable[[int], str] | None = None,
        live: bool | None = None,
        poll: float = 5.0,
        heartbeat: float = 30.0,
    ) -> None:
        self.total = total_rounds
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._connected_fn = connected
        self.connected: int | None = None
        self._activity_fn = activity
        self.activity = ""
        self.rounds_done = 0
        self.replies = ""
        self._poll = poll
        self._heartbeat = heartbeat
        self._started = time.monotonic()
        self._last_line = self._started
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._progress: Progress | None = None
        self._task: Any = None

    # -- lifecycle --------------------------------------------------------------

    def __enter__(self) -> RoundProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]rounds done {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[devices]}  {task.fields[replies]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("rounds", total=self.total, completed=0,
                                                 devices=self._devices_text(), replies="")
        if self._connected_fn is not None or self._activity_fn is not None:
            self._threads.append(threading.Thread(target=self._poll_devices,
                                                  name="devices", daemon=True))
        if not self.live:
            self._threads.append(threading.Thread(target=self._beat, name="heartbeat",
                                                  daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        if self._progress is not None:
            self._progress.stop()

    # -- updates ------------------------------------------------------------------

    def round_done(self, row: Mapping[str, Any], lines: Sequence[str]) -> None:
        """A round's row landed: print its lines and move the bar."""
        with self._lock:
            self.rounds_done = int(row.get("round", self.rounds_done + 1))
            reported, sampled = row.get("devices_reported"), row.get("devices_sampled")
            if reported is not None and sampled is not None:
                self.replies = f"replies {reported}/{sampled}"
            self._last_line = time.monotonic()
        if self._progress is not None:
            for line in lines:
                self._progress.console.print(line, markup=False, highlight=False)
            self._update()
        else:
            self._write("\n".join(lines))

    def waiting_line(self) -> str:
        """The plain heartbeat: where the run is and for how long."""
        elapsed = time.monotonic() - self._started
        return (f"waiting: round {self._in_progress()} of {self.total}, "
                f"{self._devices_text()}"
                + (f", last round {self.replies}" if self.replies else "")
                + f", {elapsed:.0f} s elapsed")

    def _devices_text(self) -> str:
        if self._activity_fn is not None and self._connected_fn is None:
            return self.activity or "starting"
        return ("devices connected ?" if self.connected is None
                else f"devices connected {self.connected}")

    def _in_progress(self) -> int:
        return min(self.rounds_done + 1, self.total)

    def _update(self) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=self.rounds_done,
                                  devices=self._devices_text(), replies=self.replies)

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _poll_devices(self) -> None:
        while not self._stop.is_set():
            count: int | None = None
            if self._connected_fn is not None:
                try:
                    count = int(self._connected_fn())
                except Exception:
                    count = None
            activity = ""
            if self._activity_fn is not None:
                try:
                    activity = self._activity_fn(self._in_progress())
                except Exception:
                    activity = ""
            with self._lock:
                self.connected = count
                self.activity = activity
            self._update()
            self._stop.wait(self._poll)

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self._last_line >= self._heartbeat:
                self._write(self.waiting_line())
                with self._lock:
                    self._last_line = time.monotonic()
