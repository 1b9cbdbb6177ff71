"""The SuperNode command line the daemon supervises: TLS and node-auth flags, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keystay.client import enroll as ce
from keystay.client.daemon.supernode import SuperNodeConfig


def _config(tmp_path: Path, **kw: object) -> SuperNodeConfig:
    return SuperNodeConfig(superlink="fl.example.test:9092", socket=tmp_path / "federation.sock",
                           runtime_port=9094, flwr_home=tmp_path / "flwr",
                           log_file=tmp_path / "supernode.log", **kw)  # type: ignore[arg-type]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    ce.load_or_create_supernode_key(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return ca, tmp_path / ce.SUPERNODE_KEY


def test_tls_with_node_auth(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    ca, key = keys
    cmd = _config(tmp_path, root_certificates=ca, auth_private_key=key).command()
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key)
    assert cmd[cmd.index("--superlink") + 1] == "fl.example.test:9092"


def test_insecure_cannot_carry_a_ca_or_key(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    ca, key = keys
    with pytest.raises(ValueError, match="insecure"):
        _config(tmp_path, insecure=True, auth_private_key=key)
    with pytest.raises(ValueError, match="insecure"):
        _config(tmp_path, insecure=True, root_certificates=ca)
    assert "--insecure" in _config(tmp_path, insecure=True).command()


def test_a_readable_or_missing_key_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    ca, key = keys
    os.chmod(key, 0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        _config(tmp_path, root_certificates=ca, auth_private_key=key)
    with pytest.raises(ValueError, match="not found"):
        _config(tmp_path, root_certificates=ca, auth_private_key=tmp_path / "nope.key")
    with pytest.raises(ValueError, match="not found"):
        _config(tmp_path, root_certificates=tmp_path / "nope.pem")
