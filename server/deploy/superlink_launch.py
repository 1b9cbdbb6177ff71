"""``flower-superlink``, a busy database answered "try again": how ``keystay server`` runs it.

Flower 1.39's SuperLink keeps its state in SQLite and answers every Fleet
API call from a pool of threads. Under load a call can fail with
``sqlite3.OperationalError: database is locked`` (why, below). Flower's
error translator (``flwr.supercore.error.grpc.rpc_error_translator``) turns
that, like any unexpected exception, into gRPC ``INTERNAL``, and the
SuperNode's retry policy gives up on ``INTERNAL`` at once: a device's reply
to a SecAgg+ stage was *dropped* ("Failed to send message"), and the
ServerApp waited the whole stage timeout for it. With 20 devices on one
machine one reply in the first stage was lost that way, and the round sat
in its first stage for the 900 s timeout with 19 answers in hand
(``bench/bench_deployment.py --devices 20``).

The same error on the SuperLink's HTTP side (the Runtime API its own
SuperExec polls: ``/v1/runtime/acquire-task``) became a 500, which Flower's
HTTP retry does not repeat either: the SuperExec exited with the traceback,
``keystay server start`` restarted the SuperLink as it must when its
SuperExec is gone, and the run in progress was lost with it.

A third way to lose a reply the same way: storing an uploaded object
(``SqlCoreState.put_object``) catches the busy error itself and answers
``stored=False``; the SuperNode then drops the reply ("Failed to push
object ... The push session may have expired"), and the next 20-device run
sat in its unmask stage with 19 of 20 answers.

Each failure came about 5 s after its statement began (the ``now()`` bound
in the failed statement's parameters is 5.3–6 s older than the error): not a
conflict but Flower's ``busy_timeout`` of 5 s running out while another
thread of the same SuperLink held the write lock. At a load average of
10–50 a thread that holds SQLite's lock waits that long for the GIL and a
core. So the cause is addressed first: **the SuperLink's SQLite connections
wait up to** :data:`BUSY_TIMEOUT_MS` **for the lock** (Flower's pragmas
otherwise unchanged), and the translation stays as the second line.

The failed transaction was rolled back, so the call is safe to repeat. This
launcher runs Flower's own ``flower-superlink`` entry point unchanged, after
that and two more narrow substitutions: the Fleet interceptor's translator
answers a busy database with gRPC ``UNAVAILABLE`` and the HTTP error
middleware with ``503 Service Unavailable``, which Flower's SuperNode,
SuperExec and Grid retry with their back-off (the codes gRPC and HTTP
document for "a transient condition, corrected by retrying"). Every other
error is translated as Flower translates it. As with the SuperNode's
launcher (:mod:`keystay.client.daemon.supernode_launch`), the substitutions
are made only on the Flower version they were read against; on any other
the launcher logs why and runs stock Flower, and
``tests/unit/server/deploy/test_superlink_launch.py`` fails when the
installed Flower moves. The upstream report is in ``docs/faults.md``.

Usage (what :meth:`keystay.server.deploy.superlink.ServerConfig.superlink_command`
builds)::

    python -m keystay.server.deploy.superlink_launch /path/to/flower-superlink ARGS...

The path of ``flower-superlink`` stays in the command line, so the process
is still found by that name.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

#: The Flower release whose error translation this was read against.
FLOWER_VERSION = "1.39.0"

#: How long a SuperLink connection waits for SQLite's lock (Flower's is 5,000 ms).
BUSY_TIMEOUT_MS = 60_000

#: What SQLite says when a lock could not be had (``SQLITE_BUSY``, ``SQLITE_LOCKED``).
BUSY_MESSAGES = ("database is locked", "database table is locked", "database is busy")

#: The details the SuperNode sees (it logs them before it retries).
BUSY_DETAILS = "SuperLink database busy; retry"


def is_busy_database(err: BaseException) -> bool:
    """Whether ``err`` is SQLite's "could not get the lock", bare or wrapped by SQLAlchemy."""
    for candidate in (err, getattr(err, "orig", None)):
        if isinstance(candidate, sqlite3.OperationalError) and any(
            m in str(candidate) for m in BUSY_MESSAGES
        ):
            return True
    return False


Translator = Callable[[Any, str], AbstractContextManager[None]]


def busy_as_unavailable(original: Translator) -> Translator:
    """Flower's ``rpc_error_translator``, except that a busy database aborts with UNAVAILABLE."""
    from grpc import StatusCode

    @contextmanager
    def translator(context: Any, rpc_name: str) -> Iterator[None]:
        with original(context, rpc_name):
            try:
                yield
            except Exception as err:
                if not is_busy_database(err):
                    raise
                # Aborting raises; Flower's translator sees an aborted
                # context and lets it through untouched.
                context.abort(StatusCode.UNAVAILABLE, BUSY_DETAILS)

    return translator


HttpTranslator = Callable[[Any, Callable[[Any], Awaitable[Any]]], Awaitable[Any]]


def busy_as_503(original: HttpTranslator) -> HttpTranslator:
    """Flower's ``http_error_translator``, except that a busy database answers 503."""
    from starlette.responses import JSONResponse

    async def translator(request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        async def guarded(inner: Any) -> Any:
            try:
                return await call_next(inner)
            except Exception as err:
                if not is_busy_database(err):
                    raise
                return JSONResponse(status_code=503, content={"detail": BUSY_DETAILS})

        return await original(request, guarded)

    return translator


def patient_pragmas(pragmas: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Flower's SQLite pragmas with ``busy_timeout`` raised to :data:`BUSY_TIMEOUT_MS`."""
    return tuple((name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
                 for name, value in pragmas)


def retry_busy_database() -> str | None:
    """A patient lock wait, and both translators' busy-aware answer; else the reason."""
    import flwr
    import flwr.supercore.sql_mixin as sql_mixin
    import flwr.superlink.main as http_app
    from flwr.supercore.interceptors import rpc_error_translation_interceptor as interceptor

    if flwr.__version__ != FLOWER_VERSION:
        return (f"Flower {flwr.__version__} is not {FLOWER_VERSION}, whose error translation "
                f"keystay read; a busy SuperLink database drops the call it failed")
    # Each new connection reads the pragmas from SqlMixin's module, the
    # interceptor its translator at each call, the HTTP app its middleware
    # when it is built: all after this.
    setattr(sql_mixin, "SQLITE_PRAGMAS",  # noqa: B010
            patient_pragmas(getattr(sql_mixin, "SQLITE_PRAGMAS")))  # noqa: B009
    flowers: Translator = getattr(interceptor, "rpc_error_translator")  # noqa: B009
    setattr(interceptor, "rpc_error_translator", busy_as_unavailable(flowers))  # noqa: B010
    flowers_http: HttpTranslator = getattr(http_app, "http_error_translator")  # noqa: B009
    setattr(http_app, "http_error_translator", busy_as_503(flowers_http))  # noqa: B010
    return None


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-superlink`` (``argv[0]``, its path) with ``argv[1:]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.exit("usage: python -m keystay.server.deploy.superlink_launch "
                 "/path/to/flower-superlink ARGS...")
    if (reason := retry_busy_database()) is not None:
        print(f"keystay: {reason}", file=sys.stderr, flush=True)
    sys.argv = list(args)
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


if __name__ == "__main__":
    main()
