"""Device signing identity, signed privacy reports, and the server's verification."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from keystay.client.identity import KEY_FILE, DeviceIdentity, IdentityError
from keystay.client.ledger.accounting import Epsilons, Mechanism
from keystay.client.ledger.ledger import BlockCharge, Charge, Ledger
from keystay.client.ledger.report import (
    UNIT,
    PrivacyReport,
    ReportBlock,
    build_report,
    canonical_bytes,
    report_from_charge,
    sign_report,
)
from keystay.client.policy import DevicePolicy, TrainingRequest
from keystay.server.ledger.verify import (
    ReportVerificationError,
    canonical_json,
    device_id_from_public_key,
    verified_report,
    verify_report,
)


def make_report(device_id: str, **changes: object) -> PrivacyReport:
    report = PrivacyReport(
        device_id=device_id,
        run_id="run-a",
        server_round=3,
        blocks=(
            ReportBlock("2025-03-03", 4.1, 3.3, 3.35, 8.0, False),
            ReportBlock("2025-03-04", 1.0, 0.8, 0.81, 8.0, True),
        ),
        noise_multiplier=1.1,
        sample_rate=0.015625,
        steps=200,
        delta=1e-5,
        accountant="min(rdp, prv_upper)",
        epsilon_round=0.81,
        epsilon_round_rdp=1.0,
        epsilon_total=3.35,
        max_grad_norm=1.0,
        created=1_741_000_000.25,
    )
    return dataclasses.replace(report, **changes)  # type: ignore[arg-type]


# --- identity ------------------------------------------------------------------------------


def test_key_file_is_created_0600_and_the_id_is_stable(tmp_path: Path) -> None:
    first = DeviceIdentity.open(tmp_path / "device")
    path = tmp_path / "device" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "device").stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    second = DeviceIdentity.open(tmp_path / "device")
    assert second.device_id == first.device_id
    assert second.public_key_pem() == first.public_key_pem()
    assert first.device_id.startswith("dev-") and len(first.device_id) == 16
    assert DeviceIdentity.open(tmp_path / "other").device_id != first.device_id


def test_server_derives_the_same_device_id_from_the_public_key(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    assert device_id_from_public_key(identity.public_key_pem()) == identity.device_id


def test_sign_and_verify_round_trip(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    payload = b'{"epsilon":1.5}'
    signature = identity.sign(payload)
    assert len(signature) == 64
    assert verify_report(payload, signature, identity.public_key_pem())


def test_altered_payload_or_signature_or_key_fails(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path / "a")
    other = DeviceIdentity.open(tmp_path / "b")
    payload = b'{"epsilon":1.5}'
    signature = identity.sign(payload)
    assert not verify_report(b'{"epsilon":1.4}', signature, identity.public_key_pem())
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify_report(payload, flipped, identity.public_key_pem())
    assert not verify_report(payload, signature[:-1], identity.public_key_pem())
    assert not verify_report(payload, signature, other.public_key_pem())


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    DeviceIdentity.open(tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(IdentityError, match=r"mode 0644.*chmod 600"):
        DeviceIdentity.open(tmp_path)


def test_garbage_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="does not hold an unencrypted PEM private key"):
        DeviceIdentity.open(tmp_path)


def test_repr_shows_no_key_material(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    assert "PRIVATE" not in repr(identity) and identity.device_id in repr(identity)


# --- signed reports ------------------------------------------------------------------------


def test_signed_report_verifies_on_the_server_and_reads_back(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    report = make_report(identity.device_id)
    payload, signature = sign_report(report, identity)
    fields = verified_report(payload, signature, identity.public_key_pem())
    assert fields["epsilon_total"] == 3.35
    assert fields["unit"] == UNIT
    assert UNIT.startswith("one training record = 33 consecutive input events")
    assert "num_examples" not in fields  # no count of the device's data
    assert PrivacyReport.from_dict(fields) == report


def test_canonical_bytes_are_what_the_server_calls_canonical(tmp_path: Path) -> None:
    payload = canonical_bytes(make_report("dev-000000000000"))
    assert payload == canonical_json(json.loads(payload))
    assert b'": ' not in payload and b', "' not in payload  # compact separators
    keys = list(json.loads(payload))
    assert keys == sorted(keys)
    assert b'"delta":1e-05' in payload and b'"sample_rate":0.015625' in payload


def test_a_tampered_epsilon_fails_verification(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    payload, signature = sign_report(make_report(identity.device_id), identity)
    tampered = payload.replace(b'"epsilon_total":3.35', b'"epsilon_total":0.35')
    assert tampered != payload
    assert not verify_report(tampered, signature, identity.public_key_pem())
    with pytest.raises(ReportVerificationError, match="altered"):
        verified_report(tampered, signature, identity.public_key_pem())


def test_report_naming_another_device_is_not_signed_or_accepted(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path / "a")
    with pytest.raises(ValueError, match="signing key is"):
        sign_report(make_report("dev-ffffffffffff"), identity)
    # A payload that claims another device id but is signed by this key.
    payload = canonical_bytes(make_report("dev-ffffffffffff"))
    with pytest.raises(ReportVerificationError, match="was signed by"):
        verified_report(payload, identity.sign(payload), identity.public_key_pem())


def test_non_canonical_payload_is_rejected_even_if_signed(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    fields = make_report(identity.device_id).to_dict()
    loose = json.dumps(fields, indent=2).encode()
    with pytest.raises(ReportVerificationError, match="canonical"):
        verified_report(loose, identity.sign(loose), identity.public_key_pem())


def test_report_from_charge_and_failed_prv_figure(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    charge = Charge(
        id=4,
        created=1_741_000_000.0,
        run_id="run-a",
        server_round=2,
        mechanism=Mechanism(1.2, 0.02, 150),
        delta=1e-5,
        accountant="min(rdp, prv_upper)",
        blocks=(BlockCharge("2025-03-03", 2.0, math.inf, math.inf, 2.0, 1.0, 8.0, False),),
        epsilon_round=Epsilons(rdp=1.2, prv=0.9, prv_upper=0.95),
        epsilon_round_enforced=0.95,
        epsilon_total=2.0,
    )
    report = report_from_charge(
        charge, device_id=identity.device_id, max_grad_norm=0.5
    )
    assert report.steps == 150 and report.epsilon_round == 0.95 and report.epsilon_round_rdp == 1.2
    payload, signature = sign_report(report, identity)
    fields = verified_report(payload, signature, identity.public_key_pem())
    assert fields["blocks"][0]["epsilon_prv"] is None  # PRV failed: no figure, not a number
    assert fields["blocks"][0]["epsilon"] == 2.0
    assert PrivacyReport.from_dict(fields) == report


def test_build_report_from_a_real_charge_states_what_was_charged(tmp_path: Path) -> None:
    identity = DeviceIdentity.open(tmp_path)
    policy = DevicePolicy(privacy_unit="record")
    req = TrainingRequest(1.0, 0.7, 100, 0.02, 0.01, True, (), "run-z", 5)
    mechanism = Mechanism(1.0, 0.02, 100)

    def additive(history: Sequence[Mechanism], delta: float) -> Epsilons:
        total = sum(m.steps * m.sample_rate / m.noise_multiplier for m in history)
        return Epsilons(rdp=1.25 * total, prv=total, prv_upper=total)

    with Ledger.open(tmp_path) as ledger:
        charge = ledger.admit(
            request=req,
            policy=policy,
            blocks=["2025-03-03", "2025-03-04"],
            mechanism=mechanism,
            epsilon_fn=additive,
        )
        report = build_report(
            device_id=identity.device_id,
            request=req,
            mechanism=mechanism,
            delta=policy.delta,
            charge=charge,
            ledger=ledger,
        )
        with pytest.raises(ValueError, match="not the one charged"):
            build_report(
                device_id=identity.device_id,
                request=req,
                mechanism=Mechanism(1.0, 0.03, 100),
                delta=policy.delta,
                charge=charge,
                )
    assert [b.block for b in report.blocks] == ["2025-03-03", "2025-03-04"]
    assert report.epsilon_total == pytest.approx(2.0) and report.epsilon_round == pytest.approx(2.0)
    assert report.max_grad_norm == 0.7 and report.sample_rate == 0.02 and report.steps == 100
    payload, signature = sign_report(report, identity)
    assert verified_report(payload, signature, identity.public_key_pem())["server_round"] == 5


def test_nan_in_a_report_is_refused() -> None:
    with pytest.raises(ValueError):
        canonical_bytes(make_report("dev-000000000000", epsilon_total=math.nan))


def test_server_verify_imports_no_client_code() -> None:
    code = (
        "import sys, keystay.server.ledger.verify; "
        "sys.exit(any(m.startswith('keystay.client') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
