"""Single-user federation is refused unless the employee accepts it by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from keystay.client.daemon.main import DaemonError, DaemonOptions, run_daemon
from keystay.client.device_cli import device
from keystay.common.exitcodes import ExitCode


def test_daemon_refuses_superlink_without_acceptance(tmp_path: Path) -> None:
    data = tmp_path / "device"
    with pytest.raises(DaemonError) as refused:
        run_daemon(DaemonOptions(data_dir=data, superlink="127.0.0.1:9"))
    assert refused.value.code == ExitCode.DEVICE_SERVER_CODE_ACCESS
    assert "--accept-server-code-access" in str(refused.value)
    assert not data.exists()  # refused before anything was created


def test_cli_refuses_with_exit_15_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "device"
    result = CliRunner().invoke(
        device, ["run", "--data", str(data), "--source", "none", "--superlink", "127.0.0.1:9"]
    )
    assert result.exit_code == 15, result.output
    assert "--accept-server-code-access" in result.output
    assert "Traceback" not in result.output
    assert not data.exists()


def test_enrolled_single_user_settings_are_refused_too(tmp_path: Path) -> None:
    from keystay.client.enroll import FederationSettings

    data = tmp_path / "device"
    data.mkdir()
    FederationSettings("127.0.0.1:9", data / "tls" / "ca.pem", data / "supernode.key").save(data)
    before = sorted(p.name for p in data.iterdir())
    result = CliRunner().invoke(device, ["run", "--data", str(data), "--source", "none"])
    assert result.exit_code == 15, result.output
    assert sorted(p.name for p in data.iterdir()) == before
