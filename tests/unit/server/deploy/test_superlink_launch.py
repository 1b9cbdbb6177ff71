"""The SuperLink launcher: a busy SQLite state is answered "retry", not a dropped call."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Any

import flwr
import flwr.supercore.sql_mixin as sql_mixin
import flwr.superlink.main as http_app
import grpc
import httpx
import pytest
import sqlalchemy
from flwr.supercore.error import http_error_translator as flowers_http_translator
from flwr.supercore.error import rpc_error_translator as flowers_translator
from flwr.supercore.interceptors import rpc_error_translation_interceptor as interceptor
from flwr.supercore.retry.grpc_retry import make_simple_grpc_retry_invoker
from flwr.supercore.retry.http_retry import make_simple_http_retry_invoker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from keystay.server.deploy.superlink import ServerConfig
from keystay.server.deploy.superlink_launch import (
    BUSY_DETAILS,
    BUSY_TIMEOUT_MS,
    FLOWER_VERSION,
    busy_as_503,
    busy_as_unavailable,
    is_busy_database,
    retry_busy_database,
)


class AbortedError(Exception):
    """What a FakeContext's abort raises (grpc raises its own)."""


class FakeContext:
    """The part of grpc.ServicerContext a translator uses: abort raises, code() tells."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise AbortedError

    def code(self) -> grpc.StatusCode | None:
        return None if self.aborted is None else self.aborted[0]


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return ""


@pytest.fixture
def restored_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """The three names the launcher substitutes in Flower, put back after the test."""
    for module, name in ((interceptor, "rpc_error_translator"),
                         (http_app, "http_error_translator"),
                         (sql_mixin, "SQLITE_PRAGMAS")):
        monkeypatch.setattr(module, name, getattr(module, name))


def _locked(tmp_path: Path) -> sqlite3.OperationalError:
    """A real 'database is locked' from SQLite: a write while another connection holds it."""
    db = tmp_path / "state.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(db, timeout=0)
    try:
        other.execute("INSERT INTO t VALUES (1)")
    except sqlite3.OperationalError as err:
        return err
    finally:
        other.close()
        holder.close()
    raise AssertionError("the second writer was not refused")


def test_flower_is_the_release_the_launcher_was_read_against() -> None:
    assert flwr.__version__ == FLOWER_VERSION, (
        f"installed Flower {flwr.__version__}, keystay's SuperLink launcher read "
        f"{FLOWER_VERSION}. Re-read flwr/supercore/error/grpc.py (rpc_error_translator), "
        "flwr/supercore/interceptors/rpc_error_translation_interceptor.py and the "
        "SuperNode's retry policy (flwr/supercore/retry/grpc_retry.py), then update "
        "keystay.server.deploy.superlink_launch")


def test_the_supernode_retries_unavailable_and_gives_up_on_internal() -> None:
    # Why the translation matters: Flower's SuperNode drops a call that
    # failed with INTERNAL and retries one that failed with UNAVAILABLE.
    giveup = make_simple_grpc_retry_invoker().should_giveup
    assert giveup is not None
    assert giveup(RpcError(grpc.StatusCode.INTERNAL)) is True
    assert giveup(RpcError(grpc.StatusCode.UNAVAILABLE)) is False


def test_flowers_http_clients_retry_503_and_give_up_on_500() -> None:
    giveup = make_simple_http_retry_invoker().should_giveup
    assert giveup is not None
    for code, expected in ((500, True), (503, False)):
        response = httpx.Response(code, request=httpx.Request("POST", "https://superlink/x"))
        error = httpx.HTTPStatusError("x", request=response.request, response=response)
        assert giveup(error) is expected, code


def test_sqlites_lock_errors_are_recognised_bare_and_wrapped(tmp_path: Path) -> None:
    locked = _locked(tmp_path)
    assert is_busy_database(locked)
    wrapped = sqlalchemy.exc.OperationalError("UPDATE task SET ...", {}, locked)
    assert is_busy_database(wrapped)
    assert not is_busy_database(sqlite3.OperationalError("no such table: task"))
    assert not is_busy_database(sqlite3.OperationalError("database or disk is full"))
    assert not is_busy_database(ValueError("database is locked"))


def _translate(translator: Any, err: Exception) -> tuple[grpc.StatusCode, str] | None:
    context = FakeContext()
    with pytest.raises(AbortedError), translator(context, "/flwr.proto.Fleet/PushMessages"):
        raise err
    return context.aborted


def test_a_busy_database_is_unavailable_and_anything_else_as_flower_has_it(
    tmp_path: Path,
) -> None:
    translator = busy_as_unavailable(flowers_translator)
    busy = sqlalchemy.exc.OperationalError("UPDATE task ...", {}, _locked(tmp_path))
    assert _translate(translator, busy) == (grpc.StatusCode.UNAVAILABLE, BUSY_DETAILS)
    # Flower's own answer for the same error, and for any other, is INTERNAL.
    assert _translate(flowers_translator, busy)[0] == grpc.StatusCode.INTERNAL  # type: ignore[index]
    other = RuntimeError("something else")
    assert _translate(translator, other) == _translate(flowers_translator, other)


def _http_status(translator: Any, err: Exception | None) -> int:
    async def endpoint(request: Request) -> Any:
        if err is not None:
            raise err
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/runtime/acquire-task", endpoint, methods=["POST"])],
                    middleware=[Middleware(BaseHTTPMiddleware, dispatch=translator)])
    with TestClient(app, raise_server_exceptions=False) as client:
        return client.post("/v1/runtime/acquire-task").status_code


def test_a_busy_database_answers_503_over_http_and_anything_else_as_flower_has_it(
    tmp_path: Path,
) -> None:
    translator = busy_as_503(flowers_http_translator)
    busy = sqlalchemy.exc.OperationalError("UPDATE task ...", {}, _locked(tmp_path))
    assert _http_status(translator, busy) == 503
    assert _http_status(flowers_http_translator, busy) == 500
    assert _http_status(translator, RuntimeError("else")) == 500
    assert _http_status(translator, None) == 200


def test_the_superlinks_connections_wait_longer_for_the_lock(
    restored_flower: None, tmp_path: Path,
) -> None:
    # The busy errors came 5.3-6 s after their statements began: Flower's
    # 5 s busy_timeout running out under load, not a conflict.
    assert ("busy_timeout", "5000") in sql_mixin.SQLITE_PRAGMAS
    flowers = dict(sql_mixin.SQLITE_PRAGMAS)
    assert retry_busy_database() is None
    assert dict(sql_mixin.SQLITE_PRAGMAS) == {**flowers, "busy_timeout": str(BUSY_TIMEOUT_MS)}
    connection = sqlite3.connect(tmp_path / "superlink.db")
    try:
        sql_mixin._set_sqlite_pragmas(connection, None)
        assert connection.execute("PRAGMA busy_timeout").fetchone() == (BUSY_TIMEOUT_MS,)
    finally:
        connection.close()


def test_a_call_that_succeeds_is_untouched() -> None:
    translator = busy_as_unavailable(flowers_translator)
    context = FakeContext()
    with translator(context, "/flwr.proto.Fleet/PullMessages"):
        pass
    assert context.aborted is None


def test_the_substitutions_reach_the_fleet_interceptor_and_the_http_app_only(
    restored_flower: None,
) -> None:
    assert retry_busy_database() is None
    assert interceptor.rpc_error_translator is not flowers_translator
    assert http_app.http_error_translator is not flowers_http_translator
    import flwr.supercore.error as errors

    assert errors.rpc_error_translator is flowers_translator


def test_another_flower_release_keeps_flowers_translation(
    restored_flower: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    reason = retry_busy_database()
    assert reason is not None and "9.9.9" in reason
    assert interceptor.rpc_error_translator is flowers_translator
    assert http_app.http_error_translator is flowers_http_translator
    assert ("busy_timeout", "5000") in sql_mixin.SQLITE_PRAGMAS


def test_keystay_starts_flowers_superlink_through_the_launcher(tmp_path: Path) -> None:
    cmd = ServerConfig().superlink_command(tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "keystay.server.deploy.superlink_launch"]
    assert Path(cmd[3]).name == "flower-superlink"
