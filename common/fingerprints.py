"""Fingerprints both sides compute the same way: device ids and request fingerprints.

Design
------
* A **device id** is pseudonymous: ``"dev-"`` and the first 12 hex digits
  (48 bits: unique among any realistic fleet, short enough to read aloud) of
  SHA-256 over the raw bytes of the device's Ed25519 report-signing key. The
  device names itself with it; the server recomputes it from the enrolled key
  and refuses a report or a request that names another.
* A **request fingerprint** is 80 bits of SHA-256 over an enrollment
  request's signed bytes, in groups of four hex digits: the employee reads it
  to the operator out of band, who checks it before enrolling.

>>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
>>> device_id_for(Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key())
'dev-139e3940e64b'
>>> fingerprint(b"{}")
'4413-6fa3-55b3-678a-1146'
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DEVICE_ID_PREFIX = "dev-"
DEVICE_ID_HEX = 12
#: Hex digits of a request fingerprint (80 bits).
FINGERPRINT_HEX = 20


def device_id_for(public_key: Ed25519PublicKey) -> str:
    """``"dev-"`` + first 12 hex digits of SHA-256(raw public key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return DEVICE_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:DEVICE_ID_HEX]


def fingerprint(payload: bytes) -> str:
    """80 bits of SHA-256 over the signed bytes, as ``"1a2b-3c4d-5e6f-7a8b-9c0d"``."""
    digest = hashlib.sha256(payload).hexdigest()[:FINGERPRINT_HEX]
    return "-".join(digest[i:i + 4] for i in range(0, FINGERPRINT_HEX, 4))
