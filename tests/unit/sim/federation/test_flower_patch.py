"""The replaced Flower extractor: pinned to the release it was written for, and equivalent."""

from __future__ import annotations

import threading
from queue import Queue

import flwr
import pytest
from flwr.server.superlink.fleet.vce import vce_api

from keystay.sim.federation import flower_patch


def test_the_installed_flower_is_the_release_the_patch_was_written_for() -> None:
    # Fails loudly on a Flower upgrade: re-read vce_api.add_messages_to_queue,
    # re-validate the one-pass replacement, then update both pins.
    assert flwr.__version__.startswith(flower_patch.FLOWER_VERSION + "."), flwr.__version__
    assert flower_patch.source_sha256(flower_patch._ORIGINAL) == flower_patch.ORIGINAL_SHA256


def test_check_refuses_another_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "1.40.0")
    with pytest.raises(flower_patch.FlowerPatchError, match=r"1\.40\.0"):
        flower_patch.check()


def test_check_refuses_a_changed_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flower_patch, "ORIGINAL_SHA256", "0" * 64)
    with pytest.raises(flower_patch.FlowerPatchError, match="source SHA-256"):
        flower_patch.check()


def test_install_replaces_the_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vce_api, "add_messages_to_queue", flower_patch._ORIGINAL)
    flower_patch.install()
    assert vce_api.add_messages_to_queue is flower_patch.add_messages_to_queue


class _Meta:
    def __init__(self, node: int) -> None:
        self.dst_node_id = node
        self.delivered_at = ""


class _Msg:
    def __init__(self, node: int) -> None:
        self.metadata = _Meta(node)


class _State:
    """The parts of InMemoryLinkState the one-pass extractor reads."""

    def __init__(self, messages: dict[str, _Msg]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = messages
        self.checked: list[str] = []

    def _check_stored_messages(self, ids: set[str]) -> None:
        self.checked.extend(ids)


def test_one_pass_takes_at_most_one_pending_message_per_node_of_this_simulation() -> None:
    messages = {"a": _Msg(1), "b": _Msg(1), "c": _Msg(2), "d": _Msg(9)}
    messages["c"].metadata.delivered_at = "earlier"
    state = _State(messages)
    taken = flower_patch._take_pending(state, {1: 0, 2: 1})  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in taken] == [1]
    assert taken[0] is messages["a"] and messages["a"].metadata.delivered_at != ""
    assert messages["b"].metadata.delivered_at == ""  # node 1's next message: next tick
    again = flower_patch._take_pending(state, {1: 0, 2: 1})  # type: ignore[arg-type]
    assert again == [messages["b"]]
    assert messages["d"].metadata.delivered_at == ""  # not a node of this simulation


def test_a_message_the_expiry_check_deletes_is_not_queued() -> None:
    messages = {"a": _Msg(1)}
    state = _State(messages)
    state._check_stored_messages = lambda ids: messages.clear()  # type: ignore[method-assign]
    assert flower_patch._take_pending(state, {1: 0}) == []  # type: ignore[arg-type]


def test_the_extractor_stops_with_the_simulation() -> None:
    stop = threading.Event()
    stop.set()
    queue: Queue[object] = Queue()
    flower_patch.add_messages_to_queue(_State({}), queue, {}, stop)  # type: ignore[arg-type]
    assert queue.empty()
