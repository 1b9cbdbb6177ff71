"""A Grid that collects replies as soon as they land, not up to 3 s later.

Flower 1.39's ``HttpGrid.send_and_receive`` (the Grid a deployed ServerApp is
given) pushes the round's messages, then pulls replies and sleeps a fixed
3 s between pulls. A round therefore ends on the next multiple of 3 s after
its last reply: up to 3 s per round of nothing, and Flower has no option or
environment variable for it.

:func:`prompt_grid` wraps that Grid (and only that one: the simulation's
``InMemoryGrid`` has its own ``pull_interval``, and the tests' in-process
Grid answers at once) in a :class:`PromptGrid`, which replaces only
``send_and_receive``, with the same contract written over the Grid's own
public ``push_messages`` / ``pull_messages`` and a short pull interval
(:data:`PULL_INTERVAL`). Everything else is forwarded unchanged. This is a
wrapper, not a patch of Flower: it holds for any Grid that keeps the public
``Grid`` interface, and ``tests/unit/server/test_grid_poll.py`` fails if that
interface (its abstract methods) changes. Each pull is one loopback request
from the ServerApp to its SuperLink, on the server: no device pays for it.
A pull the SuperLink answers with a server error (its SQLite store locked
under load) is retried at the next tick, up to :data:`MAX_PULL_FAILURES` in a
row, instead of ending the run: pulling more often than Flower meets that
error more often.

A reply that is half uploaded must not hold the others back. The SuperLink
hands the ServerApp a reply as soon as its sender has announced it, before
its objects have arrived, and ``HttpGrid.pull_messages`` then waits for the
missing objects with back-off until Flower's object-push session expires
(180 s), one reply after another. A ClientApp killed between announcing its
reply and uploading it (the fault-matrix cell "ClientApp killed after the
reply is sent") therefore held a 30 s SecAgg+ stage for 189 s, after which
the other devices' replies had expired as well: every device dropped out.
While :meth:`PromptGrid.send_and_receive` waits with a deadline, the object
pulls inside its ``pull_messages`` calls stop at that deadline instead
(:func:`_pull_objects_by_the_deadline`, put in place of the one name
``http_grid.pull_objects``): the half-uploaded reply comes back as Flower's
own "objects are unavailable" error reply, a dropout, and the complete
replies of the same pull are kept. Replies that reached the SuperLink while
that pull waited arrived in time too: a pull that began before the deadline
and ended after it is followed by one last pull (a CI run lost two of three
unmask replies that way, and with them the round). ``test_grid_poll.py`` runs the real
``HttpGrid.pull_messages`` over a fake SuperLink and fails if Flower moves
the name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from logging import WARNING
from typing import Any

import httpx
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.superlink.grid import HttpGrid, http_grid

#: Seconds between two pulls for replies (Flower's HttpGrid: 3 s). Each pull
#: is a write to the SuperLink's SQLite store, which SuperNodes write too.
PULL_INTERVAL = 0.5
#: Consecutive failed pulls (the SuperLink answering 5xx) before giving up.
MAX_PULL_FAILURES = 20
#: Back-off between two tries of an object not yet uploaded, while a deadline
#: holds (Flower's: 1 s doubling to 10 s, which could overshoot it by 10 s).
OBJECT_RETRY_SECONDS = (0.1, 1.0)

#: The deadline (time.monotonic()) of the send_and_receive running in this thread.
_pull_deadline = threading.local()
#: The name HttpGrid.pull_messages calls, in its module (imported there, not exported).
PULL_OBJECTS = "pull_objects"
#: Flower's own function, called with a bound when a deadline holds.
_flower_pull_objects: Callable[..., dict[str, bytes]] = getattr(http_grid, PULL_OBJECTS)


def _pull_objects_by_the_deadline(*args: Any, **kwargs: Any) -> dict[str, bytes]:
    """Flower's ``pull_objects``, giving up at the current send_and_receive's deadline."""
    deadline: float | None = getattr(_pull_deadline, "at", None)
    if deadline is not None:
        kwargs["max_time"] = max(0.0, deadline - time.monotonic())
        kwargs["initial_backoff"], kwargs["backoff_cap"] = OBJECT_RETRY_SECONDS
    return _flower_pull_objects(*args, **kwargs)


@contextmanager
def _pulls_end_at(deadline: float | None) -> Iterator[None]:
    _pull_deadline.at = deadline
    try:
        yield
    finally:
        _pull_deadline.at = None


def _bound_object_pulls() -> None:
    """Put :func:`_pull_objects_by_the_deadline` where ``HttpGrid.pull_messages`` finds it."""
    current = getattr(http_grid, PULL_OBJECTS)
    if current is not _pull_objects_by_the_deadline:
        if current is not _flower_pull_objects:
            raise RuntimeError("flwr.superlink.grid.http_grid.pull_objects was replaced by "
                               "something else; keystay's bounded pull needs Flower 1.39's")
        setattr(http_grid, PULL_OBJECTS, _pull_objects_by_the_deadline)


def prompt_grid(grid: Grid) -> Grid:
    """``grid`` wrapped in a :class:`PromptGrid` if it is Flower's polling ``HttpGrid``."""
    if not isinstance(grid, HttpGrid):
        return grid
    _bound_object_pulls()
    return PromptGrid(grid)


class PromptGrid(Grid):
    """``grid`` with a prompt ``send_and_receive``; every other call forwarded.

    Parameters
    ----------
    grid : Grid
        The Grid Flower gave the ServerApp.
    pull_interval : float
        Seconds between pulls while replies are outstanding.
    """

    def __init__(self, grid: Grid, pull_interval: float = PULL_INTERVAL) -> None:
        if not pull_interval > 0:
            raise ValueError(f"pull_interval must be > 0 s, got {pull_interval!r}")
        self._grid = grid
        self._pull_interval = pull_interval

    # The abstract interface, forwarded as is.
    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the interface (e.g. HttpGrid.close) reaches the real Grid.
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull until every one has a reply or ``timeout`` passes.

        Flower's contract: ``timeout=None`` waits for every reply; the replies
        received so far are returned when the time is up.
        """
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        failures = 0
        while waiting:
            started = time.monotonic()
            try:
                with _pulls_end_at(deadline):
                    pulled = list(self._grid.pull_messages(waiting))
                failures = 0
            except httpx.HTTPStatusError as error:
                # A loaded SuperLink answers 500 when its SQLite store is locked
                # ("database is locked", seen with 10 devices on 2 busy cores):
                # the replies are still there at the next pull, so one busy
                # moment must not end the run. Anything else, or a SuperLink
                # that keeps failing, ends it as Flower's own Grid would.
                failures += 1
                if error.response.status_code < 500 or failures >= MAX_PULL_FAILURES:
                    raise
                log(WARNING, "pulling replies failed (%s); retrying", error)
                pulled = []
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            if deadline is not None:
                if started >= deadline:
                    break  # this pull saw every reply that arrived in time
                left = deadline - time.monotonic()
                if left > 0:
                    time.sleep(min(self._pull_interval, left))
                # else: the pull began in time and ended after the deadline (it
                # waited for a half-uploaded reply); replies that arrived during
                # it arrived in time, so one more pull, objects tried once.
            else:
                time.sleep(self._pull_interval)
        return replies
