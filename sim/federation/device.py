"""A simulated employee's device, in-process: the daemon's own core without the daemon.

The seam
--------
The daemon serves :class:`~keystay.client.daemon.core.DeviceCore` over its
federation socket through :class:`~keystay.client.daemon.service.FederationServicer`
(protobuf in, a decision of the core out). A virtual node of the simulation
calls **that same servicer** with the same ``TrainRequest`` the ClientApp
would send over the socket, and gets the same ``TrainReply`` or the same
refusal (as a :class:`grpc.RpcError` with the servicer's status and public
sentence, which :func:`keystay.client.requests.error_reply` files exactly as
it files a socket error). Policy, ledger, the encrypted store, the trainer
job, the noise and the report signing are the device's own code; nothing
here re-implements them. What differs is only the plumbing:

* no daemon, no socket, no SuperNode: one object per simulated employee;
* :class:`InProcessTrainer` instead of the warm trainer's child process: a
  :class:`~keystay.client.trainer.process.WarmTrainer` whose calls run the
  child's own handlers (``dpsgd.train_dp`` and the rest) in this process,
  because a Ray actor already is a long-lived process holding torch, and a
  child per virtual node would cost ~300 MB each.

Cheap and lazy
--------------
A virtual node is a folder (``devices/<n>/``: signing key, store, ledger,
refusal log) and a few numbers. :meth:`SimulatedDevice.prepare` creates the
identity (the server must enroll its public key before the run);
the store is filled with the employee's simulated days on the first round
that reaches the device, and the core is opened for one round and closed
after it, so a thousand devices hold no open files between rounds.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, NoReturn

import grpc

from keystay.client.daemon.core import DeviceCore
from keystay.client.daemon.secagg_stages import SessionKey
from keystay.client.daemon.service import FederationServicer
from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy
from keystay.client.store import EventStore
from keystay.client.trainer.process import WarmTrainer, _handlers
from keystay.sim.employees import fill_store, role_named
from keystay.v1 import device_pb2

#: The file in a device folder that says its store holds its simulated days.
FILLED_MARK = "simulated-days.done"
#: Per call of a virtual device: the call, round, wall seconds and the seconds
#: of it spent training (the simulation's own measurement; see docs/scale.md).
TIMINGS_FILE = "sim-timings.jsonl"


class InProcessTrainer(WarmTrainer):
    """A :class:`WarmTrainer` whose calls run in this process (for virtual nodes only).

    The handlers are the trainer child's own (:func:`keystay.client.trainer.process._handlers`),
    imported once per process and shared by every device in it. A job's
    seed is the core's: ``None`` (fresh OS entropy) unless a test seeds the
    device (:class:`SimulatedDevice`'s ``seed``).
    """

    _shared: dict[str, Callable[..., Any]] | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__(warm_up=False)
        #: Seconds spent in the trainer's handlers (training), for the timings file.
        self.busy_seconds = 0.0

    @classmethod
    def handlers(cls) -> dict[str, Callable[..., Any]]:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = _handlers()
            return cls._shared

    def start(self, *, wait: bool = True) -> None:
        self.handlers()

    def close(self, timeout: float = 10.0) -> None:
        """Nothing to stop: the handlers belong to the process."""

    @property
    def ready(self) -> bool:
        return True

    def _call(self, op: str, args: tuple[Any, ...], timeout: float) -> Any:
        with self._lock:
            started = time.perf_counter()
            try:
                return self.handlers()[op](*args)
            finally:
                self.busy_seconds += time.perf_counter() - started


@dataclass(frozen=True)
class EmployeeData:
    """What a simulated employee's store holds: who, and how busy each day was.

    ``day_events[i]`` token records on day ``i`` (the last day is ``end_day``),
    so that days differ in volume (see :mod:`keystay.sim.employees`).
    """

    seed: int
    role: str
    day_events: tuple[int, ...]
    end_day: date


class RoundAborted(grpc.RpcError):  # type: ignore[misc]  # grpc ships no stubs
    """The servicer ended the call: its status and public sentence, as a socket would carry."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _CallContext:
    """The part of :class:`grpc.ServicerContext` the federation servicer uses."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise RoundAborted(code, details)


class SimulatedDevice:
    """One simulated employee's device folder, served in-process.

    Parameters
    ----------
    data_dir : Path
        The device's folder (created on :meth:`prepare`).
    employee : EmployeeData
        The simulated employee whose days fill the store on first use.
    policy : DevicePolicy
        The device's policy (the employee's; the built-in defaults unless given).
    trainer : WarmTrainer or None
        ``None``: an :class:`InProcessTrainer`.
    seed : int or None
        Tests only: the core's test seed (see :class:`DeviceCore`), so a
        simulated device and a seeded real daemon draw the same randomness.
        ``None`` (fresh OS entropy) in every run.
    """

    def __init__(
        self,
        data_dir: Path,
        employee: EmployeeData,
        policy: DevicePolicy | None = None,
        trainer: WarmTrainer | None = None,
        seed: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.employee = employee
        self.policy = policy or DevicePolicy()
        self.trainer = trainer or InProcessTrainer()
        self.seed = seed

    def prepare(self) -> DeviceIdentity:
        """Create the folder and the signing key; return the identity to enroll."""
        return DeviceIdentity.open(self.data_dir)

    def _fill(self, store: EventStore) -> None:
        mark = self.data_dir / FILLED_MARK
        if mark.exists():
            return
        e = self.employee
        days = len(e.day_events)
        for i, events in enumerate(e.day_events):
            day = e.end_day - timedelta(days=days - 1 - i)
            if events > 0:
                fill_store(store, seed=e.seed, days=1, events_per_day=events, end_day=day,
                           role=role_named(e.role))
        mark.touch()

    @contextlib.contextmanager
    def _timed(self, call: str, server_round: int) -> Iterator[None]:
        """Append the call's wall and training seconds to the device's timings file."""
        started = time.perf_counter()
        trained = getattr(self.trainer, "busy_seconds", 0.0)
        try:
            yield
        finally:
            line = {"call": call, "round": int(server_round),
                    "seconds": time.perf_counter() - started,
                    "training_seconds": getattr(self.trainer, "busy_seconds", 0.0) - trained}
            with contextlib.suppress(OSError), (self.data_dir / TIMINGS_FILE).open("a") as out:
                out.write(json.dumps(line) + "\n")

    @contextlib.contextmanager
    def core(self) -> Iterator[DeviceCore]:
        """The device's core for one round: opened, filled on first use, closed after."""
        store = EventStore.open(self.data_dir)
        ledger = Ledger.open(self.data_dir)
        try:
            self._fill(store)
            yield DeviceCore(self.data_dir, store, self.policy, ledger,
                             DeviceIdentity.open(self.data_dir), self.trainer, seed=self.seed)
        finally:
            ledger.close()
            store.close()

    def train(self, request: device_pb2.TrainRequest) -> device_pb2.TrainReply:
        """``Federation.Train``, in-process: the daemon's servicer on this device's core.

        Raises
        ------
        RoundAborted
            Where the daemon would end the call: a refusal, a ledger or
            trainer failure, with the servicer's status and public sentence.
        """
        with self._timed("train", request.server_round), self.core() as core:
            reply: device_pb2.TrainReply = FederationServicer(core).Train(
                request, _CallContext()
            )
            return reply

    def secagg_stage(
        self, request: device_pb2.SecAggStageRequest, sessions: MutableMapping[str, bytes]
    ) -> device_pb2.SecAggStageReply:
        """``Federation.SecAggStage``, in-process: the daemon's servicer on this device's core.

        ``sessions`` is where this device's SecAgg+ session waits between
        stages (the daemon keeps it in memory; a virtual node's four stages may
        run in different Ray actors, so the simulation keeps it in the node's
        Flower context, see :func:`keystay.sim.federation.clientapp.client_app`).
        It is restored into the core before the stage and taken back after it,
        refusal or not, exactly as the daemon's memory would hold it.

        Raises
        ------
        RoundAborted
            Where the daemon would end the call (see :meth:`train`).
        """
        key = SessionKey(request.run_id, int(request.server_round), int(request.node_id))
        name = session_name(key)
        with self._timed("secagg", request.server_round), self.core() as core:
            held = sessions.pop(name, None)
            if held is not None:
                core.secagg.import_session(key, pickle.loads(held))
            try:
                reply: device_pb2.SecAggStageReply = FederationServicer(core).SecAggStage(
                    request, _CallContext()
                )
                return reply
            finally:
                kept = core.secagg.export_session(key)
                if kept is not None:
                    sessions[name] = pickle.dumps(kept)


def session_name(key: SessionKey) -> str:
    """Where a session waits in a virtual node's context: run, round and node."""
    return f"{key.run_id}/{key.server_round}/{key.node_id}"
