"""The ``keystay`` entry point: no traceback reaches a user."""

from __future__ import annotations

import click
import pytest

from keystay.cli import main as cli
from keystay.client.store import StoreError


@click.command()
def _boom() -> None:
    raise RuntimeError("the disk said no")


@click.command()
def _store_boom() -> None:
    raise StoreError("the store at /tmp/x cannot be opened; check the key file")


def _with_boom(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    original = cli.LazyGroup.get_command
    commands = {"boom": _boom, "store-boom": _store_boom}

    def get_command(self: click.Group, ctx: click.Context, name: str) -> click.Command | None:
        if name in commands:
            return commands[name]
        return original(self, ctx, name)  # type: ignore[arg-type]

    monkeypatch.setattr(cli.LazyGroup, "get_command", get_command)
    monkeypatch.setattr("sys.argv", ["keystay", *argv])


def test_an_unexpected_error_is_one_sentence_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KEYSTAY_DEBUG", raising=False)
    _with_boom(monkeypatch, ["boom"])
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == cli.ExitCode.UNEXPECTED == 1
    err = capsys.readouterr().err
    assert "the disk said no" in err and "KEYSTAY_DEBUG=1" in err
    assert "Traceback" not in err


def test_keystay_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYSTAY_DEBUG", "1")
    _with_boom(monkeypatch, ["boom"])
    with pytest.raises(RuntimeError, match="the disk said no"):
        cli.run()


def test_usage_errors_keep_clicks_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["keystay", "no-such-command"])
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 2


def test_an_escaped_keystay_error_is_its_sentence_and_its_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KEYSTAY_DEBUG", raising=False)
    _with_boom(monkeypatch, ["store-boom"])
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == int(cli.ExitCode.DEVICE_STORE) == 11
    err = capsys.readouterr().err
    assert "cannot be opened; check the key file" in err
    assert "bug" not in err and "Traceback" not in err
