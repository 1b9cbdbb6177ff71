"""The server's CA and TLS certificate, server.toml's TLS settings, and `keystay server init/start`.

TLS handshakes here run in memory (``ssl.MemoryBIO``) between the stdlib's
client and server, so they check what a real client checks (chain, name,
expiry) without sockets.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from keystay.server.cli import server
from keystay.server.deploy import pki
from keystay.server.deploy.superlink import ServerConfig, ServerConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _handshake(tls: Path, ca_pem: Path, server_hostname: str) -> None:
    """A TLS 1.2+ handshake in memory; raises ssl.SSLCertVerificationError if the client refuses."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls / pki.SERVER_CERT, tls / pki.SERVER_KEY)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cafile=str(ca_pem))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", srv)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                if name == "c":
                    raise
                # The server fails after the client's alert; the client's error is the point.
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    tls_dir = tmp_path / "tls"
    pki.create_ca(tls_dir, "test")
    pki.issue_server_cert(tls_dir, pki.collect_hosts(["fl.example.test", "10.20.30.40"]))
    return tls_dir


# --------------------------------------------------------------------------- hosts


@pytest.mark.parametrize("text", ["0.0.0.0", "::", "[::]", "", "https://fl.example.test",
                                  "fl.example.test:9092", "bad_name.example", "-x.example",
                                  "a/b"])
def test_parse_host_refuses_what_nobody_can_dial(text: str) -> None:
    with pytest.raises(pki.PKIError):
        pki.parse_host(text)


def test_parse_host_kinds() -> None:
    assert pki.parse_host("10.0.0.5") == x509.IPAddress(ipaddress.ip_address("10.0.0.5"))
    assert pki.parse_host("[fd00::1]") == x509.IPAddress(ipaddress.ip_address("fd00::1"))
    assert pki.parse_host("FL.Example.Test.") == x509.DNSName("fl.example.test")


def test_collect_hosts_puts_given_first_adds_defaults_once() -> None:
    sans = pki.collect_hosts(["fl.example.test", "127.0.0.1"], "10.1.1.1", None)
    values = [str(s.value) for s in sans]
    assert values[0] == "fl.example.test"
    assert values.count("127.0.0.1") == 1
    assert {"localhost", "127.0.0.1", "::1", "10.1.1.1"} <= set(values)


def test_host_of_ignores_bind_all() -> None:
    assert pki.host_of("0.0.0.0:9092") is None
    assert pki.host_of("[::]:9092") is None
    assert pki.host_of("10.0.0.5:9092") == "10.0.0.5"
    assert pki.host_of("[fd00::1]:9092") == "fd00::1"


# --------------------------------------------------------------------------- CA + cert


def test_ca_key_is_private_and_ca_is_a_ca(tls: Path) -> None:
    assert _mode(tls / pki.CA_KEY) == 0o600
    assert _mode(tls / pki.SERVER_KEY) == 0o600
    assert _mode(tls) == 0o700
    info = pki.cert_info(tls / pki.CA_CERT)
    assert info.is_ca
    cert = pki.load_cert(tls / pki.CA_CERT)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def test_ca_is_never_replaced(tls: Path) -> None:
    before = (tls / pki.CA_CERT).read_bytes()
    with pytest.raises(pki.PKIError, match="never replaced"):
        pki.create_ca(tls, "again")
    assert (tls / pki.CA_CERT).read_bytes() == before


def test_server_cert_names_every_host_and_chains_to_the_ca(tls: Path) -> None:
    info = pki.cert_info(tls / pki.SERVER_CERT)
    assert set(info.dns_names) == {"fl.example.test", "localhost"}
    assert set(info.ip_addresses) == {"10.20.30.40", "127.0.0.1", "::1"}
    assert not info.is_ca
    assert "fl.example.test" in info.subject
    pki.verify_chain(tls / pki.SERVER_CERT, tls / pki.CA_CERT)
    cert = pki.load_cert(tls / pki.SERVER_CERT)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert 300 < info.days_left() <= pki.SERVER_DAYS


@pytest.mark.parametrize("name", ["fl.example.test", "10.20.30.40", "127.0.0.1", "localhost"])
def test_a_tls_client_accepts_every_name_in_the_certificate(tls: Path, name: str) -> None:
    _handshake(tls, tls / pki.CA_CERT, name)


def test_a_tls_client_refuses_a_name_not_in_the_certificate(tls: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(tls, tls / pki.CA_CERT, "10.20.30.41")


def test_a_tls_client_refuses_a_certificate_from_another_ca(tls: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.create_ca(other, "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls, other / pki.CA_CERT, "127.0.0.1")
    with pytest.raises(pki.PKIError, match="not issued by"):
        pki.verify_chain(tls / pki.SERVER_CERT, other / pki.CA_CERT)


def test_reissue_keeps_ca_changes_key(tls: Path) -> None:
    ca_before = (tls / pki.CA_CERT).read_bytes()
    key_before = (tls / pki.SERVER_KEY).read_bytes()
    pki.issue_server_cert(tls, pki.collect_hosts(["new.example.test"]))
    assert (tls / pki.CA_CERT).read_bytes() == ca_before
    assert (tls / pki.SERVER_KEY).read_bytes() != key_before
    assert "new.example.test" in pki.cert_info(tls / pki.SERVER_CERT).dns_names
    _handshake(tls, tls / pki.CA_CERT, "new.example.test")


def test_issue_needs_the_ca_key(tls: Path) -> None:
    (tls / pki.CA_KEY).unlink()
    with pytest.raises(pki.PKIError, match="CA key is needed"):
        pki.issue_server_cert(tls, pki.collect_hosts([]))


def test_expired_certificate_is_reported(tmp_path: Path) -> None:
    tls_dir = tmp_path / "tls"
    long_ago = datetime.now(UTC) - timedelta(days=30)
    pki.create_ca(tls_dir, "t")
    pki.issue_server_cert(tls_dir, pki.collect_hosts([]), days=2, now=long_ago)
    with pytest.raises(pki.PKIError, match="expired"):
        pki.verify_chain(tls_dir / pki.SERVER_CERT, tls_dir / pki.CA_CERT)


# --------------------------------------------------------------------------- server.toml


def test_config_round_trip_and_defaults(tmp_path: Path) -> None:
    config = ServerConfig(fleet_address="0.0.0.0:9092", tls_hosts=("fl.example.test", 'q"x'))
    config.save(tmp_path)
    loaded = ServerConfig.load(tmp_path)
    assert loaded == config
    assert loaded.supernode_auth and not loaded.insecure


def test_config_refuses_node_auth_without_tls(tmp_path: Path) -> None:
    ServerConfig(insecure=True, supernode_auth=True).save(tmp_path)
    with pytest.raises(ServerConfigError, match="only over TLS"):
        ServerConfig.load(tmp_path)


def test_superlink_command_is_tls_with_node_auth_by_default(tmp_path: Path) -> None:
    cmd = ServerConfig().superlink_command(tmp_path)
    assert "--insecure" not in cmd
    assert "--enable-supernode-auth" in cmd
    for flag, name in (("--ssl-certfile", "server.pem"), ("--ssl-keyfile", "server.key"),
                       ("--ssl-ca-certfile", "ca.pem")):
        assert cmd[cmd.index(flag) + 1] == str(tmp_path / "tls" / name)
    insecure = ServerConfig(insecure=True, supernode_auth=False).superlink_command(tmp_path)
    assert "--insecure" in insecure
    assert "--enable-supernode-auth" not in insecure
    assert not any(a.startswith("--ssl") for a in insecure)


def test_flwr_home_uses_tls_and_loopback(tmp_path: Path) -> None:
    home = ServerConfig(control_host="0.0.0.0", control_port=8123).write_flwr_home(tmp_path)
    text = (home / "config.toml").read_text()
    assert 'address = "127.0.0.1:8123"' in text
    assert f'root-certificates = "{tmp_path / "tls" / "ca.pem"}"' in text
    assert "insecure" not in text
    home = ServerConfig(insecure=True, supernode_auth=False).write_flwr_home(tmp_path)
    assert "insecure = true" in (home / "config.toml").read_text()


def test_tls_problems(tmp_path: Path, tls: Path) -> None:
    config = ServerConfig(fleet_address="10.20.30.40:9092")
    assert config.tls_problems(tmp_path) == ([], [])
    os.chmod(tls / pki.SERVER_KEY, 0o644)
    errors, _ = config.tls_problems(tmp_path)
    assert any("chmod 600" in e for e in errors)
    os.chmod(tls / pki.SERVER_KEY, 0o600)
    errors, warnings = ServerConfig(fleet_address="10.9.9.9:9092").tls_problems(tmp_path)
    assert not errors
    assert any("does not name 10.9.9.9" in w for w in warnings)
    (tls / pki.SERVER_CERT).unlink()
    errors, _ = config.tls_problems(tmp_path)
    assert any("missing TLS file" in e for e in errors)


def test_tls_problems_warns_before_expiry(tmp_path: Path, tls: Path) -> None:
    pki.issue_server_cert(tls, pki.collect_hosts([]), days=10)
    _, warnings = ServerConfig().tls_problems(tmp_path)
    assert any("expires in" in w for w in warnings)


# --------------------------------------------------------------------------- CLI


def test_cli_init_creates_tls_and_rerun_keeps_the_ca(tmp_path: Path) -> None:
    runner = CliRunner()
    srv = tmp_path / "srv"
    result = runner.invoke(server, ["init", "--dir", str(srv), "--host", "fl.example.test",
                                    "--fleet-address", "192.0.2.10:9092"])
    assert result.exit_code == 0, result.output
    config = ServerConfig.load(srv)
    assert not config.insecure and config.supernode_auth
    assert config.tls_hosts == ("fl.example.test",)
    info = pki.cert_info(srv / "tls" / "server.pem")
    assert "192.0.2.10" in info.ip_addresses  # the fleet host is named automatically
    assert _mode(srv / "tls" / "ca.key") == 0o600
    ca = (srv / "tls" / "ca.pem").read_bytes()
    result = runner.invoke(server, ["init", "--dir", str(srv), "--host", "other.example.test"])
    assert result.exit_code == 0, result.output
    assert "kept CA" in result.output
    assert (srv / "tls" / "ca.pem").read_bytes() == ca
    assert "other.example.test" in pki.cert_info(srv / "tls" / "server.pem").dns_names


def test_cli_init_bad_host_exits_20(tmp_path: Path) -> None:
    result = CliRunner().invoke(server, ["init", "--dir", str(tmp_path / "s"), "--host",
                                         "0.0.0.0"])
    assert result.exit_code == 20
    assert "bind-all" in result.output


def test_cli_init_insecure_writes_no_tls(tmp_path: Path) -> None:
    srv = tmp_path / "srv"
    result = CliRunner().invoke(server, ["init", "--dir", str(srv), "--insecure"])
    assert result.exit_code == 0, result.output
    config = ServerConfig.load(srv)
    assert config.insecure and not config.supernode_auth
    assert not (srv / "tls").exists()


class _DeadProcess:
    """Stands in for a flower-superlink that exits at once (no real process is started)."""

    pid = 999_999_999
    returncode = 1

    def poll(self) -> int:
        return 1

    def wait(self, timeout: float | None = None) -> int:
        return 1


def _stay_no_subreaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """``keystay server start`` run in-process would make pytest a child subreaper for good."""
    monkeypatch.setattr("keystay.server.cli.become_subreaper", lambda: False)


def test_cli_start_warns_on_every_insecure_start(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    srv = tmp_path / "srv"
    CliRunner().invoke(server, ["init", "--dir", str(srv), "--insecure"])
    started: list[Any] = []
    monkeypatch.setattr("keystay.server.cli.subprocess.Popen",
                        lambda cmd, **kw: started.append(cmd) or _DeadProcess())
    _stay_no_subreaper(monkeypatch)
    for _ in range(2):
        result = CliRunner().invoke(server, ["start", "--dir", str(srv)])
        assert "WITHOUT TLS" in result.output
        assert result.exit_code == 21  # the stand-in SuperLink "died"
    assert all("--insecure" in cmd for cmd in started)


def test_cli_start_refuses_a_readable_tls_key(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    srv = tmp_path / "srv"
    CliRunner().invoke(server, ["init", "--dir", str(srv)])
    os.chmod(srv / "tls" / "server.key", 0o644)
    started: list[Any] = []
    monkeypatch.setattr("keystay.server.cli.subprocess.Popen",
                        lambda cmd, **kw: started.append(cmd) or _DeadProcess())
    _stay_no_subreaper(monkeypatch)
    result = CliRunner().invoke(server, ["start", "--dir", str(srv)])
    assert result.exit_code == 20
    assert "chmod 600" in result.output
    assert not started
