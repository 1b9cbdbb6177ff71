"""Verify a device's signed privacy report.

Devices sign the canonical bytes of each privacy report with their Ed25519
key (``keystay.client.identity``); the server keeps the payload and the
signature, so anyone holding the device's enrolled public key can check later
that no figure was altered in transit or at rest.

This module needs only ``cryptography`` and :mod:`keystay.common`: the
server never imports the device's ledger or store. The contract:

* payload = :func:`keystay.common.canonical.canonical_json` of the report;
* signature = Ed25519 (RFC 8032) over the payload bytes exactly as sent;
* device id = ``"dev-"`` + first 12 hex digits of SHA-256 of the raw public key.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keystay.common.canonical import canonical_json
from keystay.common.errors import KeystayError
from keystay.common.fingerprints import device_id_for

REPORT_FORMAT = "keystay.privacy-report.v1"
#: Employee-day reports: v1's keys plus the broken-aggregation series.
REPORT_FORMAT_DAY = "keystay.privacy-report.v2"
REPORT_FORMATS: tuple[str, ...] = (REPORT_FORMAT, REPORT_FORMAT_DAY)


class ReportVerificationError(KeystayError, ValueError):
    """A report is not what its device signed, or not in canonical form."""


def load_public_key(public_key_pem: str | bytes) -> Ed25519PublicKey:
    """Parse an enrolled public key.

    Raises
    ------
    ValueError
        If the PEM does not hold an Ed25519 public key (a configuration error
        on the server, not a forged report).
    """
    data = public_key_pem.encode("ascii") if isinstance(public_key_pem, str) else public_key_pem
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"enrolled key is a {type(key).__name__}, not an Ed25519 public key")
    return key


def device_id_from_public_key(public_key_pem: str | bytes) -> str:
    """The pseudonymous device id a public key stands for."""
    return device_id_for(load_public_key(public_key_pem))


def verify_report(payload: bytes, signature: bytes, public_key_pem: str | bytes) -> bool:
    """Whether ``signature`` is the enrolled key's Ed25519 signature over ``payload``.

    Pure: no state, no I/O. Any change to the payload (one digit of an ε)
    or to the signature makes it False.

    Parameters
    ----------
    payload : bytes
        The report's canonical bytes, exactly as the device sent them.
    signature : bytes
        The 64-byte signature.
    public_key_pem : str or bytes
        The device's enrolled public key (SubjectPublicKeyInfo PEM).

    Raises
    ------
    ValueError
        If ``public_key_pem`` is not an Ed25519 public key.
    """
    key = load_public_key(public_key_pem)
    try:
        key.verify(bytes(signature), bytes(payload))
    except InvalidSignature:
        return False
    return True


def verified_report(
    payload: bytes, signature: bytes, public_key_pem: str | bytes
) -> dict[str, Any]:
    """Verify a report and return its fields; raise with the reason if anything is off.

    Checks, in order: the signature over the exact bytes; that the payload is
    JSON in canonical form (so two different byte strings never stand for
    the same report); the format tag; and that the report's ``device_id`` is
    the id of the key that signed it.

    Raises
    ------
    ReportVerificationError
        Naming which check failed.
    """
    if not verify_report(payload, signature, public_key_pem):
        raise ReportVerificationError(
            "signature does not match the report bytes under the enrolled key: the report "
            "was altered, or signed by a different device"
        )
    try:
        fields = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportVerificationError(f"signed payload is not JSON ({error})") from error
    if not isinstance(fields, dict):
        raise ReportVerificationError("signed payload is not a JSON object")
    try:
        canonical = canonical_json(fields)
    except ValueError as error:  # NaN or infinity: never in a device's canonical form
        raise ReportVerificationError(
            f"signed payload is not in canonical form ({error})"
        ) from error
    if canonical != bytes(payload):
        raise ReportVerificationError("signed payload is not in canonical form")
    if fields.get("format") not in REPORT_FORMATS:
        raise ReportVerificationError(
            f"report format {fields.get('format')!r} is not one of "
            f"{', '.join(repr(f) for f in REPORT_FORMATS)}"
        )
    expected = device_id_from_public_key(public_key_pem)
    if fields.get("device_id") != expected:
        raise ReportVerificationError(
            f"report names device {fields.get('device_id')!r} but was signed by {expected!r}"
        )
    return fields
