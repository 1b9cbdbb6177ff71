"""The SuperNode launcher: Flower's loop with a 1 s idle poll, and only that.

The launcher rests on one line of Flower's code (the SuperNode loop's
``time.sleep(3)`` when the SuperLink had no message). These tests fail
loudly when the installed Flower is not the release that line was read in,
or the line changed: re-read ``flwr.supernode.start_client_internal`` and
update ``keystay.client.daemon.supernode_launch``.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flwr
import grpc
import pytest
from flwr.supernode import start_client_internal

from keystay.client.daemon import supernode_launch
from keystay.client.daemon.supernode import SuperNodeConfig
from keystay.client.daemon.supernode_launch import (
    FLOWER_IDLE_SLEEP,
    FLOWER_VERSION,
    IDLE_POLL,
    IdlePollTime,
    PatientStore,
    give_up_stalled_uploads,
    shorten_idle_poll,
)


@pytest.fixture
def restore_time() -> Iterator[None]:
    yield
    start_client_internal.time = time  # type: ignore[assignment]


def test_flower_is_the_release_the_launcher_was_read_against() -> None:
    assert flwr.__version__ == FLOWER_VERSION, (
        f"Flower is {flwr.__version__}; keystay's SuperNode launcher was written against "
        f"{FLOWER_VERSION}. Re-read flwr/supernode/start_client_internal.py's main loop and "
        "update keystay.client.daemon.supernode_launch (FLOWER_VERSION, FLOWER_IDLE_SLEEP)")


def test_the_idle_sleep_is_the_only_sleep_of_that_length_in_the_loop() -> None:
    source = inspect.getsource(start_client_internal)
    assert source.count(f"time.sleep({FLOWER_IDLE_SLEEP})") == 1
    # ...and it is the one after an empty pull, not a wait inside a round.
    loop = inspect.getsource(start_client_internal.start_client_internal)
    empty_pull = loop.index("if run_id is None:")
    assert loop.index(f"time.sleep({FLOWER_IDLE_SLEEP})", empty_pull) - empty_pull < 200


def test_only_the_idle_sleep_is_shortened() -> None:
    slept: list[float] = []

    class Clock:
        @staticmethod
        def sleep(seconds: float) -> None:
            slept.append(seconds)

        @staticmethod
        def monotonic() -> float:
            return 42.0

    proxy = IdlePollTime(0.25, real=Clock)  # type: ignore[arg-type]
    proxy.sleep(FLOWER_IDLE_SLEEP)
    proxy.sleep(0.5)
    proxy.sleep(10)
    assert slept == [0.25, 0.5, 10]
    assert proxy.monotonic() == 42.0  # everything else is the real module's


@pytest.mark.usefixtures("restore_time")
def test_the_substitution_reaches_that_module_only() -> None:
    assert shorten_idle_poll() is None
    assert isinstance(start_client_internal.time, IdlePollTime)
    assert time.sleep is not start_client_internal.time.sleep
    assert IDLE_POLL < FLOWER_IDLE_SLEEP


@pytest.mark.usefixtures("restore_time")
def test_another_flower_release_keeps_flowers_own_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    reason = shorten_idle_poll()
    assert reason is not None and "9.9.9" in reason
    assert start_client_internal.time is time


def test_the_daemon_starts_flowers_supernode_through_the_launcher(tmp_path: Path) -> None:
    config = SuperNodeConfig(superlink="fl.example.test:9092", socket=tmp_path / "f.sock",
                             runtime_port=9094, flwr_home=tmp_path / "flwr",
                             log_file=tmp_path / "supernode.log", insecure=True)
    cmd = config.command()
    assert cmd[:3] == [sys.executable, "-m", supernode_launch.__name__]
    assert Path(cmd[3]).name == "flower-supernode"  # still found by that name


def test_the_launcher_runs_flowers_entry_point() -> None:
    flower = Path(sys.executable).parent / "flower-supernode"
    result = subprocess.run(
        [sys.executable, "-m", supernode_launch.__name__, str(flower), "--help"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "flower-supernode" in result.stdout and "--superlink" in result.stdout


# ----------------------------------------------------------------- the heartbeat


class _Unknown(grpc.RpcError):
    """What a SuperLink whose SQLite write failed (disk full) answers a heartbeat with."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNKNOWN


def test_flowers_heartbeat_still_reraises_what_its_sender_cannot_retry() -> None:
    # Why the launcher wraps it: Flower's heartbeat returns False (retried)
    # for UNAVAILABLE and DEADLINE_EXCEEDED only and re-raises the rest,
    # while its HeartbeatSender retries HeartbeatFailure only.
    from flwr.client.grpc_rere_client import connection
    from flwr.supercore import heartbeat

    source = inspect.getsource(connection.grpc_request_response)
    body = source[source.index("def send_node_heartbeat"):source.index("heartbeat_sender =")]
    assert "grpc.StatusCode.UNAVAILABLE" in body and body.rstrip().count("raise") >= 1
    assert "HeartbeatFailure,  # The only exception we want to retry on" in \
        inspect.getsource(heartbeat.HeartbeatSender)


def test_a_grpc_error_is_a_failed_heartbeat_and_anything_else_stops_the_supernode() -> None:
    fatal: list[bool] = []
    answers: list[object] = [_Unknown(), RuntimeError("SuperLink does not recognize it"), True]

    def heartbeat() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)

    wrapped = supernode_launch.surviving(heartbeat, fatal=lambda: fatal.append(True))
    assert wrapped() is False and not fatal  # retried by Flower's back-off
    assert wrapped() is False and fatal == [True]  # stops itself: the daemon restarts it
    assert wrapped() is True


@pytest.fixture
def restore_heartbeat() -> Iterator[None]:
    from flwr.client.grpc_rere_client import connection

    original = connection.HeartbeatSender
    yield
    connection.HeartbeatSender = original  # type: ignore[attr-defined]


@pytest.mark.usefixtures("restore_heartbeat")
def test_the_supernodes_heartbeat_thread_survives_a_superlink_error() -> None:
    """Flower's own sender thread, given the launcher's: an UNKNOWN error, then beats again."""
    from flwr.client.grpc_rere_client import connection

    assert supernode_launch.keep_heartbeat_alive() is None
    calls: list[float] = []

    def heartbeat() -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise _Unknown()
        return True

    sender = connection.HeartbeatSender(heartbeat)
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 2 and sender.is_running  # retried; stock Flower's thread died
    finally:
        sender.stop()


def test_flowers_supernode_waits_for_an_announced_object_without_end() -> None:
    """What PatientStore is for: fails when Flower's upload wait or its store factory moves."""
    source = inspect.getsource(start_client_internal._push_messages)
    assert 'while (content := object_store.get(tree.object_id)) == b"":' in source, (
        "flwr's SuperNode no longer waits for announced objects this way; re-read "
        "_push_messages and keystay.client.daemon.supernode_launch.PatientStore")
    from flwr.supernode.cli import flower_supernode as entry

    assert "ObjectStoreFactory()" in inspect.getsource(sys.modules[entry.__module__])


def test_an_announced_object_never_uploaded_reads_as_absent_after_the_patience(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flwr.app import MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

    now = [0.0]
    flower = InMemoryObjectStore()
    store = PatientStore(flower, patience=30.0, clock=lambda: now[0])
    message = RecordDict({"m": MetricRecord({"x": 1})})  # a reply's content, say
    flower.preregister(7, get_object_tree(message))
    assert store.get(message.object_id) == b""  # announced, not uploaded
    now[0] = 29.0
    assert store.get(message.object_id) == b""
    now[0] = 30.5
    assert store.get(message.object_id) is None  # the SuperNode's wait ends
    assert store.get(message.object_id) is None
    assert capsys.readouterr().err.count("announced and not uploaded") == 1  # said once
    assert store.get("not-announced") is None
    # Everything else is Flower's own store; an object uploaded in time is served.
    other = RecordDict({"m": MetricRecord({"x": 2})})
    flower.preregister(7, get_object_tree(other))
    assert store.get(other.object_id) == b""
    now[0] = 100.0
    store.put(other.object_id, other.deflate())
    assert store.get(other.object_id) == other.deflate()


def test_the_supernode_gets_patient_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.cli import flower_supernode as entry

    module = sys.modules[entry.__module__]
    monkeypatch.setattr(module, "ObjectStoreFactory", module.ObjectStoreFactory)
    assert give_up_stalled_uploads() is None
    factory = module.ObjectStoreFactory()
    assert isinstance(factory.store(), PatientStore)
    assert factory.store() is factory.store()  # one store, shared with the node state
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    assert "9.9.9" in (give_up_stalled_uploads() or "")


def _claimed(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, int, str, Any]:
    """A SuperNode state with one ClientApp task claimed; (state, id, token, claim time)."""
    from flwr.supercore.corestate import in_memory_corestate
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    state = InMemoryNodeState(InMemoryObjectStore())
    task_id = state.create_task("clientapp", run_id=1)
    assert task_id is not None
    claimed_at = in_memory_corestate.now()
    token = state.claim_task(task_id)
    assert token is not None
    return state, task_id, token, claimed_at


def _at(monkeypatch: pytest.MonkeyPatch, when: Any) -> None:
    from flwr.supercore.corestate import in_memory_corestate

    monkeypatch.setattr(in_memory_corestate, "now", lambda: when)


def test_flower_gives_a_starting_clientapp_30_s(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the substitution is for: 31 s after the claim, the token of a
    # ClientApp still importing Flower is refused.
    from datetime import timedelta

    state, _, token, claimed_at = _claimed(monkeypatch)
    _at(monkeypatch, claimed_at + timedelta(seconds=31))
    assert state.get_task_by_token(token) is None


def test_a_starting_clientapp_has_the_launchers_window_then_flowers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import timedelta

    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
    from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState

    monkeypatch.setattr(InMemoryCoreState, "claim_task", InMemoryCoreState.claim_task)
    assert supernode_launch.give_clientapps_time_to_start(90.0) is None
    state, task_id, token, claimed_at = _claimed(monkeypatch)
    _at(monkeypatch, claimed_at + timedelta(seconds=85))
    assert state.get_task_by_token(token) is not None, "refused inside the start window"
    # Checked in: Flower's own heartbeat window from then on, unchanged.
    assert state.activate_task(task_id)
    running = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
    _at(monkeypatch, claimed_at + timedelta(seconds=85 + running + 1))
    assert state.get_task_by_token(token) is None


def test_a_clientapp_that_never_starts_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState

    monkeypatch.setattr(InMemoryCoreState, "claim_task", InMemoryCoreState.claim_task)
    assert supernode_launch.give_clientapps_time_to_start(90.0) is None
    state, _, token, claimed_at = _claimed(monkeypatch)
    _at(monkeypatch, claimed_at + timedelta(seconds=91))
    assert state.get_task_by_token(token) is None


def test_the_daemons_supernode_gives_clientapps_two_minutes_to_start() -> None:
    assert supernode_launch.START_PATIENCE == 120.0
    main_source = inspect.getsource(supernode_launch.main)
    assert "give_clientapps_time_to_start()" in main_source
