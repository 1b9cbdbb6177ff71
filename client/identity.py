"""The device's report-signing identity.

Each device holds one Ed25519 key (RFC 8032) in ``DATA_DIR/signing.key``
(PKCS#8 PEM, mode 0600, created on first use). It signs the privacy report
the device sends with every update, so the server's ledger can show security
that no ε figure was altered in transit or at rest. The key signs reports
only; it is not the Flower node-authentication key and never leaves the
device (the public key does, at enrollment).

The ``device_id`` is pseudonymous: ``"dev-"`` followed by the first 12 hex
digits of SHA-256 over the raw 32-byte public key. It names the key, not the
person; the server computes the same id from the enrolled public key
(:func:`keystay.server.ledger.verify.device_id_from_public_key`).

This module never imports torch.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from keystay.common.errors import KeystayError
from keystay.common.files import create_private
from keystay.common.fingerprints import device_id_for

KEY_FILE = "signing.key"


class IdentityError(KeystayError, RuntimeError):
    """The signing key cannot be used (unreadable, wrong kind, or readable by others)."""


def _write_new_key(path: Path) -> None:
    """Create ``path`` holding a fresh key, mode 0600, without ever replacing one.

    The key is written to a private temporary file, synced, then hard-linked
    into place: ``link`` fails if ``path`` exists, so two processes starting at
    once end up sharing whichever key landed first instead of one silently
    overwriting the other's (which would orphan already signed reports).
    """
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Another process may win the race: its key is kept and ours dropped.
    create_private(path, pem)


class DeviceIdentity:
    """The device's Ed25519 signing key and pseudonymous id.

    Use :meth:`open`; the constructor takes an already loaded key (tests).

    Parameters
    ----------
    private_key : Ed25519PrivateKey
        The signing key.
    path : Path or None
        Where it is stored, for messages.
    """

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._key = private_key
        self.path = path
        self.device_id = device_id_for(private_key.public_key())

    @classmethod
    def open(cls, data_dir: Path) -> DeviceIdentity:
        """Load ``data_dir/signing.key``, creating it (and ``data_dir``, 0700) on first use.

        Raises
        ------
        IdentityError
            If the key file is readable or writable by group or others (anyone
            who can read it can forge this device's reports: fix the mode with
            ``chmod 600`` after checking who could have read it), or if it
            does not hold an unencrypted Ed25519 private key.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = data_dir / KEY_FILE
        if not path.exists():
            _write_new_key(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            # Refuse rather than chmod: a key others could read may already be
            # copied, and a person should decide whether to re-enroll.
            raise IdentityError(
                f"{path} has mode {mode:04o}; the signing key must be readable by its owner "
                f"only. Check who could have read it, then run 'chmod 600 {path}' (or delete "
                "it to create a new identity, which needs re-enrollment on the server)"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as error:
            raise IdentityError(
                f"{path} does not hold an unencrypted PEM private key ({error}); delete it "
                "to create a new identity (the server must then enroll the new public key)"
            ) from error
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(
                f"{path} holds a {type(key).__name__}, not an Ed25519 key; delete it to "
                "create a new identity (the server must then enroll the new public key)"
            )
        return cls(key, path)

    def public_key_pem(self) -> str:
        """The public key as SubjectPublicKeyInfo PEM: what the server enrolls."""
        pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode("ascii")

    def sign(self, payload: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``payload``, exactly as given."""
        return self._key.sign(payload)

    def __repr__(self) -> str:
        # Never show key material.
        return f"DeviceIdentity(device_id={self.device_id!r}, path={self.path!s})"
