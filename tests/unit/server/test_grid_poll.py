"""PromptGrid: Flower's send_and_receive contract, without the 3 s pull tick.

A fake Grid answers each pushed message after a set number of pulls, so the
tests see exactly how many pulls a round took and how long it waited. One
test pins the Grid interface PromptGrid forwards: if a Flower upgrade adds or
renames an abstract method, it fails and names it. A half-uploaded reply is
played through Flower's own ``HttpGrid.pull_messages`` over a fake SuperLink.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import httpx
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid, InMemoryGrid

from keystay.server import grid_poll
from keystay.server.grid_poll import PromptGrid, prompt_grid


class SlowGrid(Grid):
    """Replies to message ``i`` on the ``answer_after[i]``-th pull after its push."""

    def __init__(self, answer_after: list[int]) -> None:
        self.answer_after = answer_after
        self.pushed: list[Message] = []
        self.pulls = 0

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = list(messages)
        for message in self.pushed:  # what the SuperLink does on push
            message.metadata.__dict__["_message_id"] = message.object_id
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        return [Message(RecordDict(), reply_to=m) for i, m in enumerate(self.pushed)
                if m.metadata.message_id in wanted and self.answer_after[i] == self.pulls]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("PromptGrid must not call the wrapped send_and_receive")


def _messages(count: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train")
            for i in range(count)]


@pytest.mark.usefixtures("task_identity")
def test_every_reply_is_collected_at_the_short_interval() -> None:
    grid = SlowGrid(answer_after=[1, 3, 5])
    prompt = PromptGrid(grid, pull_interval=0.01)
    started = time.monotonic()
    replies = list(prompt.send_and_receive(_messages(3), timeout=10.0))
    elapsed = time.monotonic() - started
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        m.metadata.message_id for m in grid.pushed)
    assert grid.pulls == 5  # stops at the pull that brought the last reply
    assert elapsed < 1.0  # Flower's HttpGrid: 4 sleeps of 3 s = 12 s


@pytest.mark.usefixtures("task_identity")
def test_the_timeout_returns_what_arrived() -> None:
    grid = SlowGrid(answer_after=[1, 10**9])
    prompt = PromptGrid(grid, pull_interval=0.01)
    started = time.monotonic()
    replies = list(prompt.send_and_receive(_messages(2), timeout=0.2))
    assert 0.15 < time.monotonic() - started < 2.0
    assert [r.metadata.reply_to_message_id for r in replies] == [grid.pushed[0].metadata.message_id]


def test_no_messages_no_wait() -> None:
    grid = SlowGrid(answer_after=[])
    assert list(PromptGrid(grid).send_and_receive([])) == []
    assert grid.pulls == 0


def test_a_zero_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="pull_interval"):
        PromptGrid(SlowGrid([]), pull_interval=0)


def test_only_flowers_polling_grid_is_wrapped() -> None:
    slow = SlowGrid([])
    assert prompt_grid(slow) is slow
    assert isinstance(prompt_grid(object.__new__(HttpGrid)), PromptGrid)
    assert not isinstance(prompt_grid(object.__new__(InMemoryGrid)), PromptGrid)


def test_the_grid_interface_is_the_one_promptgrid_forwards() -> None:
    """Fails on a Flower upgrade that changes the Grid ABC: re-read grid_poll.py then."""
    forwarded = {"set_run", "run", "create_message", "get_node_ids", "push_messages",
                 "pull_messages", "send_and_receive"}
    assert set(Grid.__abstractmethods__) == forwarded, (
        "flwr's Grid interface changed; update keystay.server.grid_poll.PromptGrid")
    # And HttpGrid still sleeps a fixed 3 s between pulls (what PromptGrid is for).
    import inspect

    assert "time.sleep(3)" in inspect.getsource(HttpGrid.send_and_receive), (
        "flwr's HttpGrid no longer sleeps 3 s between pulls; PromptGrid may be unneeded")


class LockedOnceGrid(SlowGrid):
    """The SuperLink answers 500 to the first ``fail`` pulls (its store locked)."""

    def __init__(self, answer_after: list[int], fail: int, status: int = 500) -> None:
        super().__init__(answer_after)
        self.fail = fail
        self.status = status

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        if self.fail > 0:
            self.fail -= 1
            request = httpx.Request("POST", "https://127.0.0.1/v1/runtime/pull-messages")
            raise httpx.HTTPStatusError("locked", request=request,
                                        response=httpx.Response(self.status, request=request))
        return super().pull_messages(message_ids)


@pytest.mark.usefixtures("task_identity")
def test_a_busy_superlink_does_not_end_the_round() -> None:
    grid = LockedOnceGrid(answer_after=[1, 1], fail=3)
    replies = list(PromptGrid(grid, pull_interval=0.01).send_and_receive(_messages(2),
                                                                         timeout=10.0))
    assert len(replies) == 2


@pytest.mark.usefixtures("task_identity")
def test_a_client_error_or_a_superlink_that_keeps_failing_ends_it() -> None:
    with pytest.raises(httpx.HTTPStatusError):
        list(PromptGrid(LockedOnceGrid([1], fail=1, status=403), pull_interval=0.01)
             .send_and_receive(_messages(1), timeout=10.0))
    with pytest.raises(httpx.HTTPStatusError):
        list(PromptGrid(LockedOnceGrid([1], fail=10**6), pull_interval=0.01)
             .send_and_receive(_messages(1), timeout=10.0))


class HalfUploadedReplies(HttpGrid):
    """Flower's HttpGrid, its ``pull_messages`` unchanged, over a fake SuperLink.

    Every pushed message gets a reply; the reply to the first one was announced
    by a ClientApp that died before uploading its top object (found, never
    available: what the SuperLink serves until Flower's 180 s push session
    expires), the others are complete.
    """

    def __init__(self, others_later: bool = False) -> None:
        super().__init__(token="test")
        self.set_run(Run.create_empty(7))
        self.pushed: list[Message] = []
        self.contents: dict[str, bytes] = {}
        self.never_uploaded: set[str] = set()
        self.replies: list[Message] = []
        #: The complete replies reach the SuperLink only after the first pull
        #: (while the ServerApp waits for the half-uploaded one).
        self.others_later = others_later

    @property
    def _runtime_client(self) -> Any:
        return self

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = list(messages)
        for index, message in enumerate(self.pushed):
            message.metadata.__dict__["_message_id"] = message.object_id
            reply = Message(RecordDict({"answer": MetricRecord({"device": index})}),
                            reply_to=message)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.contents.update({object_id: nested.deflate() for object_id, nested
                                  in get_all_nested_objects(reply).items()})
            if index == 0:
                self.never_uploaded.add(reply.object_id)
            self.replies.append(reply)
        return [m.metadata.message_id for m in self.pushed]

    # The three Runtime API calls HttpGrid.pull_messages makes.
    def PullMessages(self, request: Any) -> PullAppMessagesResponse:  # noqa: N802
        if self.others_later:
            self.others_later = False
            replies, self.replies = self.replies[:1], self.replies[1:]
        else:
            replies, self.replies = self.replies, []
        return PullAppMessagesResponse(messages_list=[message_to_proto(r) for r in replies],
                                       message_object_trees=[get_object_tree(r) for r in replies])

    def PullObject(self, request: Any) -> PullObjectResponse:  # noqa: N802
        available = request.object_id not in self.never_uploaded
        return PullObjectResponse(object_found=True, object_available=available,
                                  object_content=self.contents[request.object_id]
                                  if available else b"")

    def ConfirmMessageReceived(self, request: Any) -> None:  # noqa: N802
        return None


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("others_later", [False, True], ids=["same-pull", "arrive-meanwhile"])
def test_a_half_uploaded_reply_ends_at_the_deadline_and_keeps_the_others(
    others_later: bool,
) -> None:
    """The fault-matrix cell "ClientApp killed after announcing its reply".

    Flower alone waits for the missing object with back-off up to 10 s until
    its push session expires (180 s), holding the complete replies of the same
    pull back meanwhile; with the bound, the stage's deadline ends the wait.
    The complete replies are kept whether they came in the same pull or
    reached the SuperLink while that pull waited (a CI run lost those).
    """
    grid = HalfUploadedReplies(others_later)
    prompt = prompt_grid(grid)
    outcome: list[list[Message]] = []
    started = time.monotonic()
    worker = threading.Thread(
        target=lambda: outcome.append(list(prompt.send_and_receive(_messages(3), timeout=1.0))),
        daemon=True)
    worker.start()
    worker.join(30.0)
    assert outcome, "a half-uploaded reply held send_and_receive past its deadline"
    assert time.monotonic() - started < 5.0
    (replies,) = outcome
    by_request = {r.metadata.reply_to_message_id: r for r in replies}
    assert set(by_request) == {m.metadata.message_id for m in grid.pushed}
    dead = by_request[grid.pushed[0].metadata.message_id]
    assert dead.has_error() and dead.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    for index, message in enumerate(grid.pushed[1:], start=1):
        reply = by_request[message.metadata.message_id]
        assert not reply.has_error()
        assert reply.content["answer"]["device"] == index


def test_flowers_pull_is_bounded_only_inside_a_deadline() -> None:
    """Outside send_and_receive the name is Flower's behaviour; Flower moving it fails here."""
    import inspect

    from flwr.superlink.grid import http_grid

    prompt_grid(object.__new__(HttpGrid))
    pull_objects = getattr(http_grid, grid_poll.PULL_OBJECTS)
    assert pull_objects is grid_poll._pull_objects_by_the_deadline
    assert "pull_objects(" in inspect.getsource(HttpGrid.pull_messages), (
        "flwr's HttpGrid.pull_messages no longer calls pull_objects; re-read grid_poll.py")
    calls: list[dict[str, Any]] = []
    original = grid_poll._flower_pull_objects
    try:
        def record(*args: Any, **kwargs: Any) -> dict[str, bytes]:
            calls.append(kwargs)
            return {}

        grid_poll._flower_pull_objects = record
        pull_objects(object_ids=[], pull_object_fn=str)
        with grid_poll._pulls_end_at(time.monotonic() + 2.0):
            pull_objects(object_ids=[], pull_object_fn=str)
    finally:
        grid_poll._flower_pull_objects = original
    assert "max_time" not in calls[0]
    assert 1.0 < calls[1]["max_time"] <= 2.0
