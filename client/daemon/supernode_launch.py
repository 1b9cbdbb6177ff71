"""``flower-supernode``, idle poll shortened and heartbeat kept alive: how the daemon runs it.

Flower 1.39's SuperNode asks the SuperLink for a message, and when there is
none sleeps a fixed 3 s (``time.sleep(3)`` in
``flwr.supernode.start_client_internal``'s main loop) before asking again. A
round's message therefore waits up to 3 s on every device before it is even
seen, and Flower has no option or environment variable for that interval.

This launcher runs Flower's own ``flower-supernode`` entry point unchanged,
after one narrow substitution: the ``time`` that *that one module* sees is a
proxy whose ``sleep(3)`` sleeps :data:`IDLE_POLL` seconds instead; every
other call (its 0.5 s waits, ``time.time``) and every other module get the
real ``time``. The substitution is made only on the Flower version it was
read against (:data:`FLOWER_VERSION`); on any other it logs why and runs
stock Flower. ``tests/unit/client/test_supernode_launch.py`` fails loudly
when the installed Flower is not that version or its loop no longer holds
exactly one ``time.sleep(3)``: re-read the loop, then update both.

Why 1 s and not less: an idle SuperNode pulls over TLS at this interval all
day on the employee's laptop. At 1 s a round's message is picked up 1 s
later at worst (was 3 s), for a pull a second on a machine that is otherwise
idle.

A second substitution keeps the SuperNode's heartbeat alive. Flower's
``HeartbeatSender`` retries a heartbeat that returns False, and its docstring
asks the heartbeat function to handle gRPC errors itself; the SuperNode's
(in ``flwr.client.grpc_rere_client.connection``) returns False only for
UNAVAILABLE and DEADLINE_EXCEEDED and re-raises every other error, which
ends the heartbeat thread for good while the SuperNode process goes on
pulling messages. An error from the SuperLink's side (its disk full: SQLite
cannot record the heartbeat) thus leaves the device's node *offline* in the
SuperLink 2 heartbeat intervals (60 s) later, and offline it stays, with a
healthy-looking SuperNode, until something restarts that process: after the
fault matrix filled the server's disk, both devices stayed offline. The
launcher gives that module a ``HeartbeatSender`` whose heartbeat function
turns a gRPC error into False (retried with Flower's back-off, at most 20 s
apart, so the node is online again one heartbeat after the SuperLink
recovers), and ends the SuperNode on any other error (SIGTERM to itself:
Flower's clean exit), so that the daemon restarts it (see
:mod:`keystay.client.daemon.supernode`) instead of leaving it deaf.

A third substitution frees a SuperNode whose ClientApp died mid-upload.
Flower's ClientApp announces its reply to the SuperNode (the message and the
ids of its objects), then uploads the objects. The SuperNode forwards the
reply to the SuperLink at once and waits for each object with
``while object_store.get(id) == b"": time.sleep(0.5)``; Flower expires an
upload only when something asks the node state for that object, which
nothing does here. A ClientApp killed between the two steps (the fault
matrix's "after the reply is sent") thus held the SuperNode's only loop for
good: the device served no further message until its daemon was restarted,
and every later round counted it out. The launcher gives the SuperNode an
object store (:class:`PatientStore`, through
``flower_supernode.ObjectStoreFactory``) in which an object announced and
not uploaded for :data:`UPLOAD_PATIENCE` seconds reads as absent (None, as
Flower's own expiry leaves it): the loop's send fails, Flower logs "Failed to
send message", deletes that reply and goes on to the next message. The
ServerApp, for its part, stops waiting for the half-uploaded reply at the
stage's deadline (:mod:`keystay.server.grid_poll`).

A fourth gives a ClientApp time to start. The SuperNode hands each message's
task to a new ClientApp process with a token, and Flower revokes the token
if the process has not checked in within ``HEARTBEAT_DEFAULT_INTERVAL``
(30 s) of the claim (``InMemoryCoreState.claim_task``). Starting that
process means importing Flower, 0.5 CPU-s on a quiet core; on a loaded
machine (20 devices on two cores: load average 50 while every device
started its ClientApp for the same stage) some took longer, were refused
("Runtime task-token authentication failed"), and their devices dropped out
of the round. An employee's laptop under a build or a video call is in the
same place. The launcher extends a *starting* task's window to
:data:`START_PATIENCE`; once the ClientApp has checked in, Flower's own
heartbeat window applies unchanged. The cost: a ClientApp that never
starts is given up 120 s after its claim instead of 30 s.

Usage (what :class:`keystay.client.daemon.supernode.SuperNodeConfig` builds)::

    python -m keystay.client.daemon.supernode_launch /path/to/flower-supernode ARGS...

The path of ``flower-supernode`` stays in the command line, so the process is
still found by that name (``ps``, the tests), and Flower's argument parser
sees it as its program name.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: The Flower release whose SuperNode loop this was read against.
FLOWER_VERSION = "1.39.0"
#: The loop's idle sleep in that release, in seconds.
FLOWER_IDLE_SLEEP = 3
#: What keystay's SuperNode sleeps instead when the SuperLink had no message.
IDLE_POLL = 1.0


def _another_flower(what: str, consequence: str) -> str | None:
    """Why a substitution is not made (the installed Flower is not the one read), or None."""
    import flwr

    if flwr.__version__ == FLOWER_VERSION:
        return None
    return (f"Flower {flwr.__version__} is not {FLOWER_VERSION}, whose {what} keystay read; "
            f"{consequence}")


class IdlePollTime:
    """``time``, except that ``sleep(FLOWER_IDLE_SLEEP)`` sleeps ``idle_poll``."""

    def __init__(self, idle_poll: float, real: ModuleType = time) -> None:
        self._real = real
        self._idle_poll = idle_poll

    def sleep(self, seconds: float) -> None:
        self._real.sleep(self._idle_poll if seconds == FLOWER_IDLE_SLEEP else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def shorten_idle_poll(idle_poll: float = IDLE_POLL) -> str | None:
    """Give Flower's SuperNode loop the shorter idle sleep; the reason if it was not.

    Returns
    -------
    str | None
        None when the substitution was made, else a sentence saying why not
        (another Flower version), for the log.
    """
    from flwr.supernode import start_client_internal

    if (reason := _another_flower("SuperNode loop", "the SuperNode keeps Flower's own idle "
                                  "poll")) is not None:
        return reason
    start_client_internal.time = IdlePollTime(idle_poll)  # type: ignore[assignment,attr-defined]
    return None


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def surviving(heartbeat_fn: Callable[[], bool],
              fatal: Callable[[], None] = _terminate_self) -> Callable[[], bool]:
    """``heartbeat_fn`` as Flower's ``HeartbeatSender`` documents it: errors become False.

    A gRPC error (any status) is a failed heartbeat, retried with back-off.
    Any other error (the SuperLink answered that it does not know this node)
    is said on stderr and ``fatal`` is called: by default the SuperNode
    stops itself, to be restarted by the daemon.
    """
    import grpc

    def heartbeat() -> bool:
        try:
            return heartbeat_fn()
        except grpc.RpcError as error:
            code = getattr(error, "code", lambda: None)()
            print(f"keystay: SuperNode heartbeat failed ({code}); retrying", file=sys.stderr,
                  flush=True)
            return False
        except Exception as error:  # the thread would die silently
            print(f"keystay: SuperNode heartbeat cannot go on ({error}); stopping the SuperNode "
                  "so that the daemon restarts it", file=sys.stderr, flush=True)
            fatal()
            return False

    return heartbeat


def keep_heartbeat_alive() -> str | None:
    """Give the SuperNode's connection a heartbeat that survives SuperLink errors.

    Returns
    -------
    str | None
        None when the substitution was made, else why not (another Flower).
    """
    from flwr.client.grpc_rere_client import connection
    from flwr.supercore.heartbeat import HeartbeatSender

    if (reason := _another_flower("SuperNode heartbeat", "a SuperLink error can stop the "
                                  "heartbeat for good")) is not None:
        return reason

    class SurvivingHeartbeatSender(HeartbeatSender):
        """Flower's sender, with :func:`surviving` around its heartbeat function."""

        def __init__(self, heartbeat_fn: Callable[[], bool]) -> None:
            super().__init__(surviving(heartbeat_fn))

    connection.HeartbeatSender = SurvivingHeartbeatSender  # type: ignore[attr-defined]
    return None


#: Seconds an object may stay announced and not uploaded before the SuperNode
#: reads it as absent. A ClientApp uploads its reply over loopback right after
#: announcing it, in well under a second even on a loaded laptop; Flower's own
#: upload session would wait 180 s, and in the SuperNode's loop forever.
UPLOAD_PATIENCE = 30.0


class PatientStore:
    """Flower's object store, except that an upload stalled too long reads as absent.

    Parameters
    ----------
    store : ObjectStore
        The store Flower created; every call but ``get`` is forwarded to it.
    patience : float
        Seconds an object may read as announced-but-empty (``b""``) before
        ``get`` answers None for it.
    clock : Callable[[], float]
        ``time.monotonic``, replaceable in tests.
    """

    def __init__(self, store: Any, patience: float = UPLOAD_PATIENCE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._patience = patience
        self._clock = clock
        self._empty_since: dict[str, float] = {}
        self._given_up: set[str] = set()

    def get(self, object_id: str) -> bytes | None:
        content: bytes | None = self._store.get(object_id)
        if content != b"":
            self._empty_since.pop(object_id, None)
            return content
        since = self._empty_since.setdefault(object_id, self._clock())
        if self._clock() - since < self._patience:
            return content
        if object_id not in self._given_up:  # said once, however often it is asked for
            self._given_up.add(object_id)
            print(f"keystay: object {object_id} was announced and not uploaded for "
                  f"{self._patience:.0f} s (its ClientApp died?); the SuperNode drops that "
                  "reply", file=sys.stderr, flush=True)
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def give_up_stalled_uploads(patience: float = UPLOAD_PATIENCE) -> str | None:
    """Give the SuperNode a :class:`PatientStore`; the reason if it was not.

    Returns
    -------
    str | None
        None when the substitution was made, else why not (another Flower).
    """
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.cli import flower_supernode

    if (reason := _another_flower("SuperNode upload wait", "a ClientApp that dies mid-upload "
                                  "can stall the SuperNode")) is not None:
        return reason

    class PatientStoreFactory(ObjectStoreFactory):
        """Flower's factory, its one store wrapped in a :class:`PatientStore`."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._patient: Any = None

        def store(self) -> Any:
            if self._patient is None:
                self._patient = PatientStore(super().store(), patience)
            return self._patient

    module = sys.modules[flower_supernode.__module__]
    module.ObjectStoreFactory = PatientStoreFactory  # type: ignore[attr-defined]
    return None


#: Seconds a claimed task's ClientApp has to check in with the SuperNode.
START_PATIENCE = 120.0


def give_clientapps_time_to_start(patience: float = START_PATIENCE) -> str | None:
    """Extend a starting task's token window to ``patience``; the reason if it was not.

    Returns
    -------
    str | None
        None when the substitution was made, else why not (another Flower).
    """
    from datetime import timedelta

    from flwr.supercore.corestate.in_memory_corestate import InMemoryCoreState
    from flwr.supercore.date import now

    if (reason := _another_flower("ClientApp start window", "a ClientApp slower than 30 s "
                                  "to start loses its task")) is not None:
        return reason
    flowers_claim = InMemoryCoreState.claim_task

    def claim_task(self: Any, task_id: int) -> str | None:
        token = flowers_claim(self, task_id)
        if token is not None:
            with self.lock_task_store:
                record = self.task_token_store.get(task_id)
                until = now() + timedelta(seconds=patience)
                if record is not None and record.active_until < until:
                    record.active_until = until
        return token

    InMemoryCoreState.claim_task = claim_task  # type: ignore[method-assign]
    return None


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-supernode`` (``argv[0]``, its path) with ``argv[1:]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.exit("usage: python -m keystay.client.daemon.supernode_launch "
                 "/path/to/flower-supernode ARGS...")
    for reason in (shorten_idle_poll(), keep_heartbeat_alive(), give_up_stalled_uploads(),
                   give_clientapps_time_to_start()):
        if reason is not None:
            print(f"keystay: {reason}", file=sys.stderr, flush=True)
    sys.argv = list(args)
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
