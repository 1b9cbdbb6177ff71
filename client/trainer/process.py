"""The warm trainer: one long-lived child process that holds torch and Opacus.

The device daemon is always on and must stay light, so it never imports
torch. Importing torch and Opacus costs seconds of CPU and a few hundred MB,
which a training round should not pay each time; so the daemon keeps one
child process (``multiprocessing`` *spawn* context: a fresh interpreter that
inherits no threads, locks or sockets from the daemon) that imports them once
and then serves jobs over a ``Pipe``, one at a time::

    trainer = WarmTrainer()
    trainer.start()                    # blocks until the child has imported torch
    outcome = trainer.train(job)       # TrainJob -> TrainOutcome
    eps = trainer.epsilons(history, 1e-5)
    trainer.close()

As with any spawn-context ``multiprocessing``, the program's main module must
be safe to import (the ``if __name__ == "__main__":`` idiom): the child
imports it before running. This module itself imports no torch; check with
``python -c "import keystay.client.trainer.process, sys; assert 'torch' not in sys.modules"``.

Failure handling, per kind:

- The child dies while idle (killed, out of memory): the next call starts a
  new one, transparently (nothing was lost).
- The child runs out of memory during a call (an allocation fails: an
  address-space limit, a cgroup, ``MemoryError``): it is stopped as the OOM
  killer would stop it, the call raises :class:`TrainerOutOfMemoryError`, and
  the next call starts a new one.
- The child dies during a call: that call raises :class:`TrainerCrashedError`
  (the round did not complete; whatever the ledger charged stays charged),
  and the next call starts a new child.
- A call outlives its timeout: the child is killed and the call raises
  :class:`TrainerTimeoutError`; the next call starts a new child.
- The job itself fails in the child (a bad job): the child's exception is
  re-raised in the caller with the child's traceback as its cause; the child
  lives on.
- The daemon dies: the child notices within a second (its parent id changes
  or the pipe closes) and exits.

Warm, but not forever (``idle_timeout``). A resident torch process costs
about 300 MB on an employee's laptop between rounds, which come minutes or
hours apart. With ``idle_timeout`` set, the child is stopped once it has
served no call for that long, and the next call starts a new one, paying the
start-up (torch import and warm-up, a few seconds) once per burst of calls
rather than holding the memory all day. A stop for idleness is not a crash:
it does not count in :attr:`WarmTrainer.restarts`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import TYPE_CHECKING, Any

from keystay.client.trainer.job import TrainJob, TrainOutcome
from keystay.common.errors import KeystayError
from keystay.common.evaluation import Evaluation
from keystay.common.exitcodes import ExitCode

if TYPE_CHECKING:
    import numpy as np

    from keystay.client.ledger.accounting import Epsilons, Mechanism
    from keystay.common.model import ModelConfig

logger = logging.getLogger("keystay.trainer")

#: Seconds the child may take to import torch + Opacus and warm up.
START_TIMEOUT_S = 180.0
#: Seconds one training call may take before the child is killed.
TRAIN_TIMEOUT_S = 1800.0
#: Seconds one accounting or evaluation call may take.
CALL_TIMEOUT_S = 600.0
#: How often the child checks that its parent is still there.
_PARENT_POLL_S = 1.0


class TrainerError(KeystayError, RuntimeError):
    """The warm trainer could not do what was asked."""

    exit_code = ExitCode.DEVICE_TRAINER


class TrainerCrashedError(TrainerError):
    """The trainer process died during a call; the call did not complete."""


class TrainerOutOfMemoryError(TrainerCrashedError):
    """The trainer process ran out of memory during a call; it was stopped and is replaced."""


class TrainerTimeoutError(TrainerError):
    """A call took longer than its timeout; the trainer process was killed."""


class RemoteTraceback(Exception):  # noqa: N818 (a traceback's text, as in concurrent.futures)
    """The traceback of an exception raised in the trainer process (the cause)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nin the trainer process:\n{self.text}"


# ---------------------------------------------------------------------------
# Child side. Everything heavy is imported here, inside the child, only.


def _watch_parent(parent_pid: int) -> None:
    """Exit the child when the daemon that started it is gone (even mid-job)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)  # no cleanup to do: the child holds no state worth saving
        time.sleep(_PARENT_POLL_S)


def _handlers() -> dict[str, Callable[..., Any]]:
    # Import everything a job needs now, once: that is what makes this process warm.
    import opacus
    import opacus.accountants.analysis.prv
    import opacus.accountants.analysis.rdp
    import opacus.data_loader
    import torch

    from keystay.client.ledger import accounting
    from keystay.client.trainer import dpsgd
    from keystay.common.model import NextEventModel, evaluate, set_weights

    def train(job: TrainJob) -> TrainOutcome:
        # Only an employee-day job may skip DP-SGD: its whole update is
        # clipped and noised on the device before it is masked.
        return dpsgd.train_dp(job) if job.record_level_dp else dpsgd.train_nondp(job)

    def evaluate_weights(
        weights: list[np.ndarray], windows: np.ndarray, config: ModelConfig | None
    ) -> Evaluation:
        torch.set_num_threads(dpsgd.TRAIN_THREADS)
        model = NextEventModel(config)
        set_weights(model, weights)
        return Evaluation(*evaluate(model, windows))

    def epsilons(history: Sequence[Mechanism], delta: float) -> Epsilons:
        return accounting.epsilons(history, delta=delta)

    def weight_spec() -> list[tuple[tuple[int, ...], str]]:
        # The daemon checks every request's weights against this before it
        # charges anything; it cannot build the model itself (no torch there).
        from keystay.common.model import ModelConfig, initial_weights

        return [(tuple(w.shape), w.dtype.str) for w in initial_weights(ModelConfig(), seed=0)]

    def ping() -> dict[str, Any]:
        # str(): torch.__version__ is a TorchVersion, which would import torch when unpickled.
        versions = {"torch": str(torch.__version__), "opacus": str(opacus.__version__)}
        return {"pid": os.getpid(), **versions}

    return {
        "train": train,
        "evaluate": evaluate_weights,
        "epsilons": epsilons,
        "ping": ping,
        "weight_spec": weight_spec,
    }


def _warm_up() -> None:
    """Run one tiny DP step so the first real job does not pay torch's first-call costs."""
    import numpy as np

    from keystay.client.trainer.dpsgd import train_dp
    from keystay.common.model import ModelConfig, initial_weights

    config = ModelConfig()
    windows = np.zeros((8, config.window + 1), dtype=np.int64)
    train_dp(
        TrainJob(
            weights=initial_weights(config, seed=0),
            train=windows,
            heldout=windows[:2],
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            steps=1,
            batch_size=4,
            learning_rate=1e-3,
            seed=0,
        )
    )


def _error_reply(error: BaseException) -> tuple[str, Any, str, str, str]:
    text = "".join(traceback.format_exception(error))
    exc: BaseException | None = None
    # Only built-in exception types travel as objects: unpickling one defined in torch or
    # Opacus would import torch into the daemon. Others arrive as a TrainerError.
    if type(error).__module__ == "builtins":
        try:
            exc = pickle.loads(pickle.dumps(error))
        except Exception:  # not every exception pickles; the text still says what happened
            exc = None
    return ("error", exc, type(error).__name__, str(error), text)


def _child_main(conn: Connection, parent_pid: int, warm_up: bool) -> None:
    """Entry point of the trainer process."""
    # Ctrl+C in a terminal reaches the whole process group; the daemon decides
    # when the trainer stops (close()), so the child ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    started = time.perf_counter()
    try:
        handlers = _handlers()
        if warm_up:
            _warm_up()
    except BaseException as error:  # report why we cannot serve, then exit
        conn.send(_error_reply(error))
        return
    conn.send(("ready", {"pid": os.getpid(), "start_seconds": time.perf_counter() - started}))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return  # the daemon closed the pipe or died
        if op == "close":
            conn.send(("ok", None))
            return
        try:
            reply: tuple[Any, ...] = ("ok", handlers[op](*args))
        except Exception as error:
            reply = _error_reply(error)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
        except Exception as error:  # the result did not pickle
            conn.send(_error_reply(error))


# ---------------------------------------------------------------------------
# Parent side (the daemon). No torch here.


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is not answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WarmTrainer:
    """A long-lived torch + Opacus process serving training jobs, one at a time.

    Safe to share between threads: calls are serialised by a lock.

    Parameters
    ----------
    warm_up : bool
        Run one tiny DP step at start, so the first real round is not slowed
        by torch's first-call initialisation.
    start_timeout : float
        Seconds to wait for the child to import torch and Opacus.
    idle_timeout : float or None
        Stop the child after this many seconds without a call (the next call
        starts a new one); ``None`` keeps it for the trainer's lifetime.
    """

    def __init__(
        self,
        *,
        warm_up: bool = True,
        start_timeout: float = START_TIMEOUT_S,
        idle_timeout: float | None = None,
    ) -> None:
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds or None, got {idle_timeout}")
        self._warm_up = warm_up
        self._start_timeout = start_timeout
        self._idle_timeout = idle_timeout
        self._last_used = time.monotonic()
        self._idle_watch: threading.Thread | None = None
        self.idle_stops = 0
        self.last_start_seconds: float | None = None
        self._lock = threading.Lock()
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._hello: dict[str, Any] | None = None
        self._closed = False
        self._closing = False
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------

    def start(self, *, wait: bool = True) -> None:
        """Start the trainer process (if it is not running).

        Parameters
        ----------
        wait : bool
            Block until the child has imported torch and Opacus (and warmed
            up). With ``False``, return at once; :attr:`ready` turns true
            later and the first call waits for it.

        Raises
        ------
        TrainerError
            If the child fails to start (its traceback is the cause).
        """
        with self._lock:
            self._closed = False
            self._closing = False
            if self._proc is None or not self._proc.is_alive():
                self._spawn()
            if wait:
                self._await_hello()

    def _spawn(self) -> None:
        self._discard()
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_child_main,
            args=(child_conn, os.getpid(), self._warm_up),
            name="keystay-trainer",
            # Daemonic: multiprocessing terminates it if the daemon exits normally
            # without close(); the parent watch covers abnormal exits.
            daemon=True,
        )
        proc.start()
        child_conn.close()  # the child's end lives in the child only: EOF means it died
        self._proc, self._conn, self._hello = proc, parent_conn, None
        self._last_used = time.monotonic()
        logger.info("trainer process %s starting", proc.pid)
        if self._idle_timeout is not None and (
            self._idle_watch is None or not self._idle_watch.is_alive()
        ):
            self._idle_watch = threading.Thread(
                target=self._stop_when_idle, name="trainer-idle", daemon=True
            )
            self._idle_watch.start()

    def _stop_when_idle(self) -> None:
        """Stop the child once it has been idle for ``idle_timeout`` (see the module docs)."""
        assert self._idle_timeout is not None
        period = min(5.0, self._idle_timeout / 4)
        while not self._closed:
            time.sleep(period)
            if self._proc is None or time.monotonic() - self._last_used < self._idle_timeout:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # a call is running: not idle
            try:
                idle = time.monotonic() - self._last_used
                proc, conn = self._proc, self._conn
                if proc is None or conn is None or idle < self._idle_timeout:
                    continue
                pid = proc.pid
                with contextlib.suppress(EOFError, OSError):
                    conn.send(("close", ()))
                    if conn.poll(10.0):
                        conn.recv()
                proc.join(10.0)
                self._kill()
                self.idle_stops += 1
                logger.info("trainer process %s stopped after %.0f s idle; the next round "
                            "starts a new one", pid, idle)
            finally:
                self._lock.release()

    def _await_hello(self) -> None:
        assert self._proc is not None and self._conn is not None
        if self._hello is not None:
            return
        reply = self._receive(self._start_timeout, "start")
        if reply[0] == "ready":
            self._hello = reply[1]
            self.last_start_seconds = float(self._hello["start_seconds"])
            logger.info(
                "trainer process %s ready after %.1f s",
                self._hello["pid"],
                self._hello["start_seconds"],
            )
            return
        self._kill()
        cause = self._as_exception(reply, "start")
        error = TrainerError(
            f"the trainer process could not start: {type(cause).__name__}: {cause}; "
            "check that torch and opacus are installed in this environment"
        )
        raise error from cause

    @property
    def ready(self) -> bool:
        """True when the child is alive and has finished importing torch and Opacus."""
        proc = self._proc
        if proc is None or not proc.is_alive():
            return False
        if self._hello is None and self._lock.acquire(blocking=False):
            try:
                conn = self._conn
                if conn is not None and self._hello is None and conn.poll(0):
                    self._await_hello()
            except TrainerError:
                return False
            finally:
                self._lock.release()
        return self._hello is not None

    @property
    def busy(self) -> bool:
        """True while a call (or a start) is in progress."""
        return self._lock.locked()

    @property
    def pid(self) -> int | None:
        """Process id of the current child, if one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child: ask it to exit, then terminate, then kill. Idempotent.

        If a call is running in another thread, it is not waited for longer
        than ``timeout``: the child is stopped and that call raises
        :class:`TrainerError`.
        """
        self._closing = True
        got_lock = self._lock.acquire(timeout=timeout)
        if not got_lock:
            # A call is running: stop the child under it. That call then sees the
            # child die, raises TrainerError ("closed") and releases the lock.
            proc = self._proc
            if proc is not None and proc.is_alive():
                proc.terminate()
                proc.join(5.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5.0)
            got_lock = self._lock.acquire(timeout=timeout)
        try:
            proc, conn = self._proc, self._conn
            if got_lock and proc is not None and proc.is_alive() and conn is not None:
                try:
                    conn.send(("close", ()))
                    if conn.poll(timeout):
                        conn.recv()
                except (EOFError, OSError):
                    pass
                proc.join(timeout)
            if got_lock:
                self._kill()
            self._closed = True
        finally:
            if got_lock:
                self._lock.release()

    def _kill(self) -> None:
        """Make sure the child is gone: terminate, then kill; then forget it."""
        proc = self._proc
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        self._discard()

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None and not self._proc.is_alive():
            self._proc.close()
        self._proc, self._conn, self._hello = None, None, None

    def __enter__(self) -> WarmTrainer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- calls -------------------------------------------------------------

    def train(self, job: TrainJob, *, timeout: float = TRAIN_TIMEOUT_S) -> TrainOutcome:
        """Run :func:`keystay.client.trainer.dpsgd.train_dp` on ``job`` in the child."""
        outcome: TrainOutcome = self._call("train", (job,), timeout)
        return outcome

    def evaluate(
        self,
        weights: list[np.ndarray],
        windows: np.ndarray,
        config: ModelConfig | None = None,
        *,
        timeout: float = CALL_TIMEOUT_S,
    ) -> Evaluation:
        """``Evaluation(loss, accuracy)`` of ``weights`` on ``windows`` (no training)."""
        result: Evaluation = self._call("evaluate", (weights, windows, config), timeout)
        return result

    def epsilons(
        self, history: Sequence[Mechanism], delta: float, *, timeout: float = CALL_TIMEOUT_S
    ) -> Epsilons:
        """:func:`keystay.client.ledger.accounting.epsilons` of ``history``, in the child.

        The daemon no longer charges through this (the ledger prices rounds
        itself, incrementally, without torch); kept for tools and tests.
        """
        result: Epsilons = self._call("epsilons", (list(history), float(delta)), timeout)
        return result

    def weight_spec(self, *, timeout: float = 60.0) -> list[tuple[tuple[int, ...], str]]:
        """Shape and dtype string of each weight array of the shared model, in order."""
        result: list[tuple[tuple[int, ...], str]] = self._call("weight_spec", (), timeout)
        return result

    def ping(self, *, timeout: float = 30.0) -> dict[str, Any]:
        """The child's pid and torch/Opacus versions; starts the child if needed."""
        result: dict[str, Any] = self._call("ping", (), timeout)
        return result

    def _call(self, op: str, args: tuple[Any, ...], timeout: float) -> Any:
        with self._lock:
            if self._closed:
                raise TrainerError(
                    f"the trainer was closed; call start() before asking it to {op}"
                )
            self._last_used = time.monotonic()
            if self._proc is None or not self._proc.is_alive():
                if self._proc is not None:
                    # Died while idle: nothing was lost, start a new one.
                    logger.warning(
                        "trainer process %s %s while idle; starting a new one",
                        self._proc.pid,
                        _describe_exit(self._proc.exitcode),
                    )
                    self.restarts += 1
                self._spawn()
            self._await_hello()
            assert self._conn is not None
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send((op, args))  # if the child is gone, _receive says how
            try:
                reply = self._receive(timeout, op)
            finally:
                self._last_used = time.monotonic()
        if reply[0] == "ok":
            return reply[1]
        if reply[2] == "MemoryError" or "out of memory" in str(reply[3]).lower():
            # Out of memory (an address-space limit, a cgroup): a process whose
            # allocation failed half-way is not trusted with the next job.
            # Stopped as the OOM killer would have, and replaced on the next call.
            with self._lock:
                pid = self._proc.pid if self._proc is not None else None
                self._kill()
                self.restarts += 1
            error = TrainerOutOfMemoryError(
                f"the trainer process (pid {pid}) ran out of memory during '{op}' and was "
                "stopped; the call did not complete; the next call starts a new trainer "
                "process. Free memory, or train with a smaller batch."
            )
            error.__cause__ = RemoteTraceback(reply[4])
            raise error
        raise self._as_exception(reply, op)

    def _receive(self, timeout: float, op: str) -> tuple[Any, ...]:
        """The child's next message, or an exception if it dies or times out first."""
        proc, conn = self._proc, self._conn
        assert proc is not None and conn is not None
        pid = proc.pid
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                raise TrainerTimeoutError(
                    f"the trainer process (pid {pid}) did not finish '{op}' within "
                    f"{timeout:.0f} s and was stopped; the call did not complete; the next "
                    "call starts a new trainer process"
                )
            ready = wait([conn, proc.sentinel], timeout=min(remaining, 1.0))
            if conn in ready or conn.poll(0):
                try:
                    reply: tuple[Any, ...] = conn.recv()
                    return reply
                except (EOFError, OSError):
                    pass  # died after all; fall through
            if proc.sentinel in ready or not proc.is_alive():
                proc.join(1.0)
                code = proc.exitcode
                self._discard()
                if self._closing:
                    raise TrainerError(f"the trainer was closed while running '{op}'")
                self.restarts += 1
                raise TrainerCrashedError(
                    f"the trainer process (pid {pid}) {_describe_exit(code)} while running "
                    f"'{op}'; the call did not complete (nothing was returned); the next call "
                    "starts a new trainer process. If this repeats, look for memory "
                    "pressure (the OOM killer) in the system log."
                )

    @staticmethod
    def _as_exception(reply: tuple[Any, ...], op: str) -> BaseException:
        _, exc, type_name, message, text = reply
        if isinstance(exc, BaseException):
            exc.__cause__ = RemoteTraceback(text)
            return exc
        error = TrainerError(f"'{op}' failed in the trainer process: {type_name}: {message}")
        error.__cause__ = RemoteTraceback(text)
        return error
