"""Fixtures for server tests: devices that sign privacy reports like real ones.

Keys are made directly with ``cryptography`` and payloads serialised the way
the device does (``keystay.client.ledger.report.canonical_bytes``: sorted
keys, compact separators, ASCII, no NaN), so server tests do not depend on
the device daemon. One ledger test checks the two stay in step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keystay.server.ledger.ledger import ServerLedger

Block = tuple[str, float, float, bool]  # block, epsilon, budget, retired


def canonical(obj: Any) -> bytes:
    """The device's canonical JSON bytes."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("utf-8")


@dataclass
class FakeDevice:
    """A device identity that signs reports (test stand-in for the daemon)."""

    key: Ed25519PrivateKey

    @property
    def pem(self) -> str:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        pem = self.key.public_key().public_bytes(serialization.Encoding.PEM, spki)
        return pem.decode("ascii")

    @property
    def device_id(self) -> str:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return "dev-" + hashlib.sha256(raw).hexdigest()[:12]

    def payload(
        self,
        run_id: str,
        server_round: int,
        blocks: Sequence[Block],
        *,
        total: float | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "format": "keystay.privacy-report.v1",
            "device_id": self.device_id,
            "run_id": run_id,
            "server_round": server_round,
            "blocks": [
                {
                    "block": name,
                    "epsilon_rdp": eps * 1.1,
                    "epsilon_prv": eps * 0.98,
                    "epsilon": eps,
                    "budget": budget,
                    "retired": retired,
                }
                for name, eps, budget, retired in blocks
            ],
            "noise_multiplier": 1.0,
            "sample_rate": 0.05,
            "steps": 30,
            "delta": 1e-5,
            "accountant": "min(rdp, prv_upper)",
            "epsilon_round": 0.4,
            "epsilon_round_rdp": 0.5,
            "epsilon_total": total if total is not None else max(b[1] for b in blocks),
            "max_grad_norm": 1.0,
            "unit": "one training record = 33 consecutive input events of one employee-day; "
                    "records do not overlap, so each event is in exactly one record",
            "created": 1_700_000_000.0,
        }
        fields.update(overrides)
        return fields

    def sign(self, fields: dict[str, Any]) -> tuple[str, bytes]:
        payload = canonical(fields)
        return payload.decode("ascii"), self.key.sign(payload)

    def report(
        self, run_id: str, server_round: int, blocks: Sequence[Block], **kwargs: Any
    ) -> tuple[str, bytes]:
        """``(payload_json, signature)`` as the ClientApp forwards them."""
        return self.sign(self.payload(run_id, server_round, blocks, **kwargs))


@pytest.fixture
def make_device() -> Callable[[], FakeDevice]:
    return lambda: FakeDevice(Ed25519PrivateKey.generate())


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[ServerLedger]:
    led = ServerLedger.open(tmp_path / "server")
    yield led
    led.close()
