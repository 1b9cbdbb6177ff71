"""``flower-superlink``, a busy database answered "try again": how ``keystay server`` runs it.

Flower 1.39's SuperLink keeps its state in SQLite and answers every Fleet
API call from a pool of threads. Two writers that overlap can fail with
``sqlite3.OperationalError: database is locked`` at once, whatever the busy
timeout: in WAL mode a transaction that has read and then writes, after
another connection committed, gets ``SQLITE_BUSY`` without waiting (its
snapshot is stale; retrying the transaction is the only cure). Flower's
error translator (``flwr.supercore.error.grpc.rpc_error_translator``) turns
that, like any unexpected exception, into gRPC ``INTERNAL``, and the
SuperNode's retry policy gives up on ``INTERNAL`` at once: a device's reply
to a SecAgg+ stage was *dropped* ("Failed to send message"), and the
ServerApp waited the whole stage timeout for it. With 20 devices on one
machine one reply in the first stage was lost that way, and the round sat
in its first stage for the 900 s timeout with 19 answers in hand
(``bench/bench_deployment.py --devices 20``).

The failed transaction was rolled back, so the call is safe to repeat. This
launcher runs Flower's own ``flower-superlink`` entry point unchanged, after
one narrow substitution: the Fleet interceptor's translator answers a busy
database with ``UNAVAILABLE``, which the SuperNode retries with Flower's
back-off (the code gRPC documents for "a transient condition, corrected by
retrying"). Every other error is translated as Flower translates it. As with
the SuperNode's launcher (:mod:`keystay.client.daemon.supernode_launch`), the
substitution is made only on the Flower version it was read against; on any
other it logs why and runs stock Flower, and
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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

#: The Flower release whose error translation this was read against.
FLOWER_VERSION = "1.39.0"

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


def retry_busy_database() -> str | None:
    """Give the Fleet interceptor the busy-aware translator; the reason if it was not."""
    import flwr
    from flwr.supercore.interceptors import rpc_error_translation_interceptor as interceptor

    if flwr.__version__ != FLOWER_VERSION:
        return (f"Flower {flwr.__version__} is not {FLOWER_VERSION}, whose error translation "
                f"keystay read; a busy SuperLink database drops the call it failed")
    # The interceptor looks the name up in its module at each call.
    flowers: Translator = getattr(interceptor, "rpc_error_translator")  # noqa: B009
    setattr(interceptor, "rpc_error_translator", busy_as_unavailable(flowers))  # noqa: B010
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
