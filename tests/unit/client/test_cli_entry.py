"""The ``keystay`` entry point: no traceback reaches a user."""

from __future__ import annotations

import click
import pytest

from keystay.cli import main as cli


@click.command()
def _boom() -> None:
    raise RuntimeError("the disk said no")


def _with_boom(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    original = cli.LazyGroup.get_command

    def get_command(self: click.Group, ctx: click.Context, name: str) -> click.Command | None:
        return _boom if name == "boom" else original(self, ctx, name)  # type: ignore[arg-type]

    monkeypatch.setattr(cli.LazyGroup, "get_command", get_command)
    monkeypatch.setattr("sys.argv", ["keystay", *argv])


def test_an_unexpected_error_is_one_sentence_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KEYSTAY_DEBUG", raising=False)
    _with_boom(monkeypatch, ["boom"])
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == cli.EXIT_UNEXPECTED == 1
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
