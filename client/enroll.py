"""Joining a federation from the device: keys, the server check, the enrollment request.

``keystay device enroll --server HOST:PORT --ca CA.pem`` does, in order:

1. pins the server's CA: copies it to ``DATA/tls/ca.pem``; the SuperNode
   trusts that file only (never the system store);
2. checks the server: a TLS handshake with ``HOST:PORT`` verified against that
   CA *and* the name dialled, so a wrong CA, a wrong name or a man in the
   middle is found now, with a clear message, not later in a SuperNode log;
3. creates the SuperNode's node-authentication key, EC P-384 in OpenSSH
   format (what ``flower-supernode --auth-supernode-private-key`` reads),
   ``supernode.key`` mode 0600 plus ``supernode.pub``; kept if it exists,
   replaced with ``--new-key`` (if it may have leaked; the SuperLink never
   accepts a revoked key again, and the server never re-admits a revoked
   device id, so a revoked computer comes back only with a new identity);
4. writes ``DATA/enrollment-request.json`` (format ``keystay-enrollment/2``,
   see :mod:`keystay.server.deploy.enrollment` for the layout), signed with
   both the report-signing key and the SuperNode key, and prints its
   fingerprint for the employee to read out to the operator;
5. writes ``DATA/federation.toml`` (address, CA, key) so the daemon can join
   without repeating flags.

Nothing secret leaves the device: the request holds public keys only.
This module never imports torch, and nothing from the server side.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keystay.client.identity import DeviceIdentity
from keystay.common.canonical import canonical_json
from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.files import write_private
from keystay.common.fingerprints import fingerprint

REQUEST_FORMAT = "keystay-enrollment/2"
REQUEST_FILE = "enrollment-request.json"
SUPERNODE_KEY = "supernode.key"
SUPERNODE_PUB = "supernode.pub"
CA_FILE = Path("tls") / "ca.pem"
FEDERATION_FILE = "federation.toml"
_CURVE = ec.SECP384R1()


class EnrollError(KeystayError, RuntimeError):
    """Enrollment cannot go on; ``code`` is the exit code, the message says what to do."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = code


# --------------------------------------------------------------------------- keys


def load_or_create_supernode_key(key_dir: Path, *, new: bool = False) -> ec.EllipticCurvePrivateKey:
    """``key_dir/supernode.key`` (EC P-384, OpenSSH, 0600) and ``supernode.pub``.

    Raises
    ------
    EnrollError
        If the existing key is readable by group/others or is not an EC key.
    """
    path = key_dir / SUPERNODE_KEY
    if path.exists() and not new:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise EnrollError(
                ExitCode.ENROLL_KEYS,
                f"{path} has mode {mode:04o}; whoever can read it can connect as this device. "
                f"Check who could have, then 'chmod 600 {path}', or re-run with --new-key",
            )
        try:
            key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as error:
            raise EnrollError(ExitCode.ENROLL_KEYS, f"{path} is not an OpenSSH private key "
                              f"({error}); re-run with --new-key") from error
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EnrollError(ExitCode.ENROLL_KEYS,
                              f"{path} is not an EC key; re-run with --new-key")
    else:
        key = ec.generate_private_key(_CURVE)
        write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    (key_dir / SUPERNODE_PUB).write_text(supernode_public_openssh(key) + "\n")
    return key


def supernode_public_openssh(key: ec.EllipticCurvePrivateKey) -> str:
    """``"ecdsa-sha2-nistp384 AAAA…"``: the form ``flwr supernode register`` reads."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode("ascii")


# --------------------------------------------------------------------------- request


def build_request(identity: DeviceIdentity, supernode_key: ec.EllipticCurvePrivateKey,
                  created: datetime | None = None) -> tuple[dict[str, object], str]:
    """The signed request and its fingerprint."""
    when = (created or datetime.now(UTC)).astimezone(UTC)
    body: dict[str, object] = {
        "format": REQUEST_FORMAT,
        "device_id": identity.device_id,
        "signing_public_key_pem": identity.public_key_pem(),
        "supernode_public_key": supernode_public_openssh(supernode_key),
        "created": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    payload = canonical_json(body)
    proof = {
        "signing": base64.b64encode(identity.sign(payload)).decode("ascii"),
        "supernode": base64.b64encode(
            supernode_key.sign(payload, ec.ECDSA(hashes.SHA384()))).decode("ascii"),
    }
    return {**body, "proof": proof}, fingerprint(payload)


# --------------------------------------------------------------------------- server check


@dataclass(frozen=True)
class ServerCheck:
    """What the TLS handshake showed."""

    address: str
    subject: str
    names: tuple[str, ...]
    not_after: datetime


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EnrollError(ExitCode.USAGE, f"--server {address!r}: expected HOST:PORT, "
                          "e.g. fl.example.com:9092")
    return host.strip("[]"), int(port)


def check_server(address: str, ca_pem: bytes, timeout: float = 10.0) -> ServerCheck:
    """TLS-handshake with the Fleet API, trusting ``ca_pem`` only, checking the name dialled.

    Raises
    ------
    EnrollError
        ``SERVER_UNREACHABLE`` (nothing answers) or ``SERVER_UNTRUSTED`` (the
        certificate is not from this CA, does not name ``HOST``, or expired).
    """
    host, port = split_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as error:
        raise EnrollError(ExitCode.USAGE, f"--ca does not hold a PEM certificate ({error})") \
            from error
    context.set_alpn_protocols(["h2"])  # what gRPC speaks
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as error:
        reason = (error.verify_message or str(error)).rstrip(".")
        if "mismatch" in reason.lower():
            hint = (f"the server certificate does not name {host}. Dial a name it holds, or "
                    f"have the operator add it ('keystay server init --host {host}')")
        elif "expired" in reason.lower():
            hint = "the server certificate has expired; the operator renews it with " \
                   "'keystay server init' on the same folder"
        else:
            hint = ("it was not issued by the CA you were given (--ca): either the CA file is "
                    "not this server's, or something else answers at this address. Do not "
                    "enroll; ask the operator for the CA file over a trusted channel")
        raise EnrollError(ExitCode.ENROLL_SERVER_UNTRUSTED,
                          f"{address} refused: {reason}; {hint}") from error
    except ssl.SSLError as error:
        raise EnrollError(ExitCode.ENROLL_SERVER_UNTRUSTED,
                          f"{address}: TLS failed ({error}); is this the SuperLink's Fleet "
                          "API with TLS on?") from error
    except OSError as error:
        raise EnrollError(ExitCode.ENROLL_SERVER_UNREACHABLE,
                          f"cannot reach {address} ({error}); check the address and that the "
                          "server runs, or use --offline to enroll without checking") from error
    cert = x509.load_der_x509_certificate(der or b"")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName)) + tuple(
            str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = ()
    return ServerCheck(address, cert.subject.rfc4514_string(), names, cert.not_valid_after_utc)


# --------------------------------------------------------------------------- federation.toml


@dataclass(frozen=True)
class FederationSettings:
    """``DATA/federation.toml``: how this device joins (written by enroll, read by the daemon)."""

    superlink: str
    root_certificates: Path
    auth_private_key: Path

    @classmethod
    def load(cls, data_dir: Path) -> FederationSettings | None:
        path = data_dir / FEDERATION_FILE
        if not path.exists():
            return None
        data = tomllib.loads(path.read_text()).get("federation", {})
        try:
            return cls(superlink=str(data["superlink"]),
                       root_certificates=Path(data["root_certificates"]),
                       auth_private_key=Path(data["auth_private_key"]))
        except KeyError as error:
            raise EnrollError(ExitCode.USAGE, f"{path}: missing {error}; run "
                              "'keystay device enroll' again") from error

    def save(self, data_dir: Path) -> Path:
        path = data_dir / FEDERATION_FILE
        table = {
            "superlink": str(self.superlink),
            "root_certificates": str(self.root_certificates),
            "auth_private_key": str(self.auth_private_key),
        }
        path.write_text(
            "# written by `keystay device enroll`; the daemon joins with these\n"
            + tomli_w.dumps({"federation": table})
        )
        return path


# --------------------------------------------------------------------------- enroll


@dataclass(frozen=True)
class EnrollResult:
    request_file: Path
    fingerprint: str
    device_id: str
    settings: FederationSettings
    server: ServerCheck | None
    new_key: bool


def enroll(data_dir: Path, server: str, ca_file: Path, *, key_dir: Path | None = None,
           new_key: bool = False, check: bool = True, out: Path | None = None,
           timeout: float = 10.0) -> EnrollResult:
    """Do steps 1-5 of the module docstring; see there.

    Parameters
    ----------
    data_dir : Path
        The device's data folder (holds the report-signing key).
    server : str
        The Fleet API ``HOST:PORT`` exactly as this device will dial it.
    ca_file : Path
        The server's CA certificate, from the operator.
    key_dir : Path, optional
        Where the SuperNode key and the pinned CA go (default ``data_dir``);
        a folder owned by the SuperNode's OS user when it runs as its own user.
    new_key : bool
        Replace the SuperNode key (after a revocation, or if it leaked).
    check : bool
        Handshake with the server first (default); ``False`` for offline enrollment.
    out : Path, optional
        Also write the request here (e.g. a USB stick, a ticket attachment).
    """
    split_address(server)
    data_dir = data_dir.resolve()
    key_dir = (key_dir or data_dir).resolve()
    try:
        ca_pem = ca_file.read_bytes()
        ca = x509.load_pem_x509_certificate(ca_pem)
    except (OSError, ValueError) as error:
        raise EnrollError(ExitCode.USAGE, f"--ca {ca_file}: not a readable PEM certificate "
                          f"({error})") from error
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise EnrollError(ExitCode.USAGE, f"--ca {ca_file} is not a CA certificate; use the "
                          "server folder's tls/ca.pem, not its server.pem")
    result = check_server(server, ca_pem, timeout) if check else None

    key_dir.mkdir(parents=True, exist_ok=True)
    pinned = key_dir / CA_FILE
    pinned.parent.mkdir(parents=True, exist_ok=True)
    pinned.write_bytes(ca_pem)
    existed = (key_dir / SUPERNODE_KEY).exists()
    supernode_key = load_or_create_supernode_key(key_dir, new=new_key)
    identity = DeviceIdentity.open(data_dir)
    request, fp = build_request(identity, supernode_key)
    text = json.dumps(request, indent=2) + "\n"
    request_file = data_dir / REQUEST_FILE
    request_file.write_text(text)
    if out is not None:
        out.write_text(text)
    settings = FederationSettings(server, pinned, key_dir / SUPERNODE_KEY)
    settings.save(data_dir)
    return EnrollResult(request_file, fp, identity.device_id, settings, result,
                        new_key=new_key or not existed)
