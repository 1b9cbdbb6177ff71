"""Device-side enrollment: SuperNode key, signed request, server check, `keystay device enroll`.

The key files are checked with Flower's own loaders (what ``flower-supernode``
and ``flwr supernode register`` run), and the server check against a real TLS
listener on loopback made from a keystay server CA.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keystay.client import enroll as ce
from keystay.client.device_cli import device
from keystay.client.identity import DeviceIdentity
from keystay.server.deploy import pki


@pytest.fixture
def server_tls(tmp_path: Path) -> Path:
    tls = tmp_path / "server-tls"
    pki.create_ca(tls, "test")
    pki.issue_server_cert(tls, pki.collect_hosts([]))
    return tls


@contextmanager
def tls_listener(tls: Path, cert: Path | None = None) -> Iterator[str]:
    """A loopback TLS server (ALPN h2, like gRPC) that handshakes and closes; yields HOST:PORT."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert or tls / pki.SERVER_CERT, tls / pki.SERVER_KEY)
    context.set_alpn_protocols(["h2"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            try:
                conn.settimeout(5)
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass  # the client refused us: that is what some tests want
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        sock.close()


# --------------------------------------------------------------------------- keys


def test_supernode_key_is_private_and_in_flowers_format(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    key = ce.load_or_create_supernode_key(tmp_path)
    path = tmp_path / ce.SUPERNODE_KEY
    assert path.stat().st_mode & 0o777 == 0o600
    assert isinstance(key.curve, ec.SECP384R1)
    # What flower-supernode --auth-supernode-private-key does with the file:
    private, public = _try_setup_client_authentication(argparse.Namespace(
        auth_supernode_private_key=str(path), auth_supernode_public_key=None))
    assert private.private_numbers() == key.private_numbers()
    # What flwr supernode register does with the public key file:
    registered = try_load_public_key(tmp_path / ce.SUPERNODE_PUB)
    assert registered == public.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def test_supernode_key_is_kept_unless_new(tmp_path: Path) -> None:
    first = ce.load_or_create_supernode_key(tmp_path)
    again = ce.load_or_create_supernode_key(tmp_path)
    assert again.private_numbers() == first.private_numbers()
    fresh = ce.load_or_create_supernode_key(tmp_path, new=True)
    assert fresh.private_numbers() != first.private_numbers()
    assert (tmp_path / ce.SUPERNODE_PUB).read_text().strip() == ce.supernode_public_openssh(fresh)


def test_a_readable_supernode_key_is_refused(tmp_path: Path) -> None:
    ce.load_or_create_supernode_key(tmp_path)
    os.chmod(tmp_path / ce.SUPERNODE_KEY, 0o644)
    with pytest.raises(ce.EnrollError, match="chmod 600") as info:
        ce.load_or_create_supernode_key(tmp_path)
    assert info.value.code == ce.ExitCode.ENROLL_KEYS


# --------------------------------------------------------------------------- request


def test_request_is_signed_by_both_keys(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    node_key = ce.load_or_create_supernode_key(tmp_path)
    when = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    request, fp = ce.build_request(identity, node_key, when)
    assert request["device_id"] == identity.device_id
    assert request["created"] == "2026-11-23T12:00:00Z"
    body = {k: v for k, v in request.items() if k != "proof"}
    payload = ce.canonical_json(body)
    assert fp == ce.fingerprint(payload)
    proof = request["proof"]
    assert isinstance(proof, dict)
    signing = serialization.load_pem_public_key(identity.public_key_pem().encode())
    assert isinstance(signing, Ed25519PublicKey)
    signing.verify(base64.b64decode(proof["signing"]), payload)
    node_key.public_key().verify(base64.b64decode(proof["supernode"]), payload,
                                 ec.ECDSA(hashes.SHA384()))
    # Same inputs, same fingerprint: the operator can compare it.
    assert ce.build_request(identity, node_key, when)[1] == fp


# --------------------------------------------------------------------------- server check


def test_check_server_accepts_the_right_server(server_tls: Path) -> None:
    with tls_listener(server_tls) as address:
        result = ce.check_server(address, (server_tls / pki.CA_CERT).read_bytes())
    assert "127.0.0.1" in result.names


def test_check_server_refuses_another_ca(server_tls: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.create_ca(other, "other")
    with tls_listener(server_tls) as address, pytest.raises(ce.EnrollError) as info:
        ce.check_server(address, (other / pki.CA_CERT).read_bytes())
    assert info.value.code == ce.ExitCode.ENROLL_SERVER_UNTRUSTED
    assert "not issued by the CA" in str(info.value)


def test_check_server_refuses_a_certificate_without_the_dialled_name(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    pki.create_ca(tls, "t")
    # A certificate that names only a DNS name, dialled by IP.
    pki.issue_server_cert(tls, [x509.DNSName("fl.example.test")])
    with tls_listener(tls) as address, pytest.raises(ce.EnrollError) as info:
        ce.check_server(address, (tls / pki.CA_CERT).read_bytes())
    assert info.value.code == ce.ExitCode.ENROLL_SERVER_UNTRUSTED
    assert "does not name 127.0.0.1" in str(info.value)


def test_check_server_says_unreachable(server_tls: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ce.EnrollError) as info:
        ce.check_server(f"127.0.0.1:{port}", (server_tls / pki.CA_CERT).read_bytes(), timeout=2)
    assert info.value.code == ce.ExitCode.ENROLL_SERVER_UNREACHABLE


def test_split_address() -> None:
    assert ce.split_address("[fd00::1]:9092") == ("fd00::1", 9092)
    with pytest.raises(ce.EnrollError):
        ce.split_address("fl.example.test")


# --------------------------------------------------------------------------- enroll()


def test_enroll_writes_pinned_ca_key_request_and_settings(server_tls: Path,
                                                          tmp_path: Path) -> None:
    data = tmp_path / "data"
    with tls_listener(server_tls) as address:
        result = ce.enroll(data, address, server_tls / pki.CA_CERT, out=tmp_path / "copy.json")
    assert (data / "tls" / "ca.pem").read_bytes() == (server_tls / pki.CA_CERT).read_bytes()
    request = json.loads(result.request_file.read_text())
    assert request["format"] == ce.REQUEST_FORMAT
    assert request["device_id"] == result.device_id
    assert json.loads((tmp_path / "copy.json").read_text()) == request
    assert "PRIVATE" not in result.request_file.read_text()  # public keys only
    settings = ce.FederationSettings.load(data)
    assert settings == result.settings
    assert settings is not None and settings.superlink == address
    assert settings.auth_private_key == data.resolve() / ce.SUPERNODE_KEY
    assert result.new_key


def test_enroll_into_a_separate_supernode_dir(server_tls: Path, tmp_path: Path) -> None:
    data, node_dir = tmp_path / "data", tmp_path / "supernode"
    result = ce.enroll(data, "fl.example.test:9092", server_tls / pki.CA_CERT,
                       key_dir=node_dir, check=False)
    assert result.server is None
    assert (node_dir / ce.SUPERNODE_KEY).exists()
    assert not (data / ce.SUPERNODE_KEY).exists()
    assert (data / "signing.key").exists()  # the report key stays with the daemon's data
    assert result.settings.root_certificates == node_dir.resolve() / "tls" / "ca.pem"


def test_enroll_refuses_a_server_certificate_given_as_ca(server_tls: Path,
                                                         tmp_path: Path) -> None:
    with pytest.raises(ce.EnrollError, match="not a CA certificate") as info:
        ce.enroll(tmp_path / "d", "127.0.0.1:1", server_tls / pki.SERVER_CERT, check=False)
    assert info.value.code == ce.ExitCode.USAGE
    assert not (tmp_path / "d" / ce.REQUEST_FILE).exists()


def test_enroll_untrusted_server_writes_nothing(server_tls: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.create_ca(other, "other")
    data = tmp_path / "d"
    with tls_listener(server_tls) as address, pytest.raises(ce.EnrollError):
        ce.enroll(data, address, other / pki.CA_CERT)
    assert not (data / ce.SUPERNODE_KEY).exists()
    assert not (data / ce.REQUEST_FILE).exists()


# --------------------------------------------------------------------------- CLI


def test_cli_enroll_prints_fingerprint(server_tls: Path, tmp_path: Path) -> None:
    data = tmp_path / "d"
    with tls_listener(server_tls) as address:
        result = CliRunner().invoke(device, ["enroll", "--data", str(data), "--server", address,
                                             "--ca", str(server_tls / pki.CA_CERT)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("fingerprint "))
    request = json.loads((data / ce.REQUEST_FILE).read_text())
    body = {k: v for k, v in request.items() if k != "proof"}
    assert line.split()[1] == ce.fingerprint(ce.canonical_json(body))
    assert "verified" in result.output


def test_cli_enroll_wrong_ca_exits_31(server_tls: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.create_ca(other, "other")
    with tls_listener(server_tls) as address:
        result = CliRunner().invoke(device, ["enroll", "--data", str(tmp_path / "d"),
                                             "--server", address,
                                             "--ca", str(other / pki.CA_CERT)])
    assert result.exit_code == 31
    assert "Do not enroll" in result.output
