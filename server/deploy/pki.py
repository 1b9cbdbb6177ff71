"""The server's own certificate authority and TLS certificate.

keystay runs a private CA per server folder::

    DIR/tls/ca.key       CA private key (EC P-384, mode 0600). Only `keystay server init`
                         needs it (to issue or renew the server certificate); move it
                         off the server once issued if you can.
    DIR/tls/ca.pem       CA certificate: what every device pins (`keystay device enroll --ca`)
    DIR/tls/server.key   the SuperLink's TLS key (EC P-384, mode 0600)
    DIR/tls/server.pem   the SuperLink's certificate, signed by the CA, with a
                         subjectAltName for every name and address devices use

Devices verify the SuperLink against ``ca.pem`` only (not the system trust
store), so a certificate from any other CA, public or not, is refused. TLS
checks the name a device dialled against the certificate's SANs, which is why
``--host`` must list every DNS name and IP address devices connect to.

The flwr CLI and the SuperExec reach the Control / ServerAppIo HTTP API over the
same certificate on loopback, so ``localhost``, ``127.0.0.1`` and ``::1`` are
always included.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.files import write_private

TLS_DIR = "tls"
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
SERVER_KEY = "server.key"
SERVER_CERT = "server.pem"

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
SERVER_DAYS = 397  # the CA/Browser limit; short enough that renewal is a habit
RENEW_WARNING_DAYS = 30
_CURVE = ec.SECP384R1()


class PKIError(KeystayError, ValueError):
    """A host name, key or certificate keystay cannot use; the message says which and why."""

    exit_code = ExitCode.SERVER_CONFIG


Host = x509.DNSName | x509.IPAddress


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says, for ``server init`` output, ``server start`` checks and tests."""

    subject: str
    issuer: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_after: datetime
    fingerprint_sha256: str
    is_ca: bool

    def days_left(self, now: datetime | None = None) -> float:
        return (self.not_after - (now or datetime.now(UTC))).total_seconds() / 86400


def parse_host(text: str) -> Host:
    """``"10.0.0.5"`` -> IPAddress SAN, ``"fl.example.com"`` -> DNSName SAN.

    Raises
    ------
    PKIError
        For an empty name, a wildcard bind address (``0.0.0.0``, ``::``: nobody
        dials those), a port, a URL, or characters a DNS name cannot hold.
    """
    value = text.strip().strip("[]")
    if not value:
        raise PKIError("--host is empty; give a DNS name or an IP address devices dial")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        address = None
    if address is not None:
        if address.is_unspecified:
            raise PKIError(
                f"--host {text}: {value} is a bind-all address, not one a device can dial; "
                "give the server's real IP address or DNS name"
            )
        return x509.IPAddress(address)
    if "://" in value or "/" in value or ":" in value:
        raise PKIError(f"--host {text}: give a bare DNS name or IP address (no scheme, no port)")
    labels = value.rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or not all(c.isalnum() or c == "-" for c in label) \
                or label.startswith("-") or label.endswith("-"):
            raise PKIError(f"--host {text}: {value!r} is not a valid DNS name")
    return x509.DNSName(value.rstrip(".").lower())


def host_of(address: str) -> str | None:
    """The host part of ``HOST:PORT`` if a device could dial it (None for ``0.0.0.0``/``[::]``)."""
    host, _, _ = address.rpartition(":")
    host = host.strip("[]")
    if not host:
        return None
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return None
    except ValueError:
        pass
    return host


def collect_hosts(hosts: Iterable[str], *extra: str | None) -> list[Host]:
    """The SAN list: every ``--host`` (the first is also the CN), the listen hosts, the defaults."""
    seen: dict[str, Host] = {}
    for text in (*hosts, *(e for e in extra if e), *DEFAULT_HOSTS):
        san = parse_host(text)
        seen.setdefault(_san_key(san), san)
    return list(seen.values())


def _san_key(san: Host) -> str:
    return f"ip:{san.value}" if isinstance(san, x509.IPAddress) else f"dns:{san.value}"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise PKIError(f"{path} does not hold an unencrypted PEM private key ({error})") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} holds a {type(key).__name__}, not an EC private key")
    return key


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as error:
        raise PKIError(f"{path} is not a readable PEM certificate ({error})") from error


def create_ca(tls_dir: Path, name: str, *, days: int = CA_DAYS,
              now: datetime | None = None) -> tuple[Path, Path]:
    """Create ``ca.key`` (0600) and ``ca.pem`` (self-signed, CA:TRUE, pathlen 0).

    Returns ``(ca_cert_path, ca_key_path)``. Refuses to replace an existing CA:
    every enrolled device pins it, so a new one disconnects the whole fleet.
    """
    key_path, cert_path = tls_dir / CA_KEY, tls_dir / CA_CERT
    if key_path.exists() or cert_path.exists():
        raise PKIError(
            f"{tls_dir} already holds a CA; devices pin it, so it is never replaced silently. "
            f"Delete {key_path} and {cert_path} yourself if you mean to re-enroll every device"
        )
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(_CURVE)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keystay"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"keystay CA ({name})"),
    ])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue_server_cert(tls_dir: Path, hosts: Sequence[Host], *, days: int = SERVER_DAYS,
                      now: datetime | None = None) -> tuple[Path, Path]:
    """Issue (or re-issue) ``server.pem`` / ``server.key`` (0600) from the CA in ``tls_dir``.

    A fresh key every time: re-issuing is how hosts are added and how the
    certificate is renewed. Returns ``(cert_path, key_path)``.
    """
    if not hosts:
        raise PKIError("a server certificate needs at least one host name or address")
    ca_key_path, ca_cert_path = tls_dir / CA_KEY, tls_dir / CA_CERT
    if not ca_key_path.exists():
        raise PKIError(
            f"{ca_key_path} is missing: the CA key is needed to issue the server certificate. "
            "Copy it back from where you keep it offline, then run this again"
        )
    ca_key = _load_key(ca_key_path)
    ca_cert = load_cert(ca_cert_path)
    ca_public = ca_cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey) \
            or ca_public.public_numbers() != ca_key.public_key().public_numbers():
        raise PKIError(f"{ca_key_path} is not the key of {ca_cert_path}")
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(_CURVE)
    first = hosts[0]
    common_name = str(first.value)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keystay"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
        # Clients check the name they dialled against these SANs, never the CN.
        .add_extension(x509.SubjectAlternativeName(list(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    cert_path, key_path = tls_dir / SERVER_CERT, tls_dir / SERVER_KEY
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def cert_info(path: Path) -> CertInfo:
    """Read a certificate's names, expiry and fingerprint."""
    cert = load_cert(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    digest = cert.fingerprint(hashes.SHA256()).hex()
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        dns_names=dns,
        ip_addresses=ips,
        not_after=cert.not_valid_after_utc,
        fingerprint_sha256=":".join(digest[i:i + 2] for i in range(0, len(digest), 2)),
        is_ca=is_ca,
    )


def verify_chain(cert_path: Path, ca_path: Path) -> None:
    """Check that ``cert_path`` was signed by the CA in ``ca_path`` (and is in date).

    Raises
    ------
    PKIError
        If it was not, or if it has expired.
    """
    cert, ca = load_cert(cert_path), load_cert(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as error:
        raise PKIError(f"{cert_path} was not issued by the CA in {ca_path} ({error})") from error
    except Exception as error:  # InvalidSignature carries no message
        raise PKIError(f"{cert_path} was not issued by the CA in {ca_path}") from error
    if cert.not_valid_after_utc < datetime.now(UTC):
        raise PKIError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                       "renew it with `keystay server init` on the same folder")
