"""The server ledger: enrollment, verification verdicts, flags, audit at rest."""

from __future__ import annotations

import json
import sqlite3
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystay.server.ledger.ledger import (
    FLAG_CONTRADICTION,
    FLAG_OVER_BUDGET,
    FLAG_UNVERIFIABLE,
    LEDGER_FILE,
    REQUIRED_BLOCK_FIELDS,
    REQUIRED_FIELDS,
    LedgerEnrollmentError,
    LedgerNotFoundError,
    ServerLedger,
    ServerLedgerError,
)
from tests.e2e.full_disk import fill, needs_root, small_tmpfs

D1, D2, D3 = "2025-03-03", "2025-03-04", "2025-03-05"
# The fixture's FakeDevice (tests/unit/server/conftest.py); conftest is not imported.
MakeDevice = Callable[[], Any]


def enrolled(ledger: ServerLedger, make_device: MakeDevice) -> Any:
    device = make_device()
    ledger.enroll_device(device.device_id, device.pem, "test laptop")
    return device


# --- opening and enrollment ----------------------------------------------------------


def test_open_creates_private_file_and_reopens(tmp_path: Path, make_device: MakeDevice) -> None:
    with ServerLedger.open(tmp_path / "srv") as led:
        device = enrolled(led, make_device)
    path = tmp_path / "srv" / LEDGER_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with ServerLedger.open(tmp_path / "srv", create=False) as led:
        assert [d.device_id for d in led.devices()] == [device.device_id]


def test_open_without_create_refuses_missing_ledger(tmp_path: Path) -> None:
    with pytest.raises(LedgerNotFoundError, match="--server-dir"):
        ServerLedger.open(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()


def test_open_refuses_foreign_sqlite(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / LEDGER_FILE)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    with pytest.raises(ServerLedgerError, match="not a keystay server ledger"):
        ServerLedger.open(tmp_path)


def test_enroll_lists_device_and_is_idempotent(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = make_device()
    first = ledger.enroll_device(device.device_id, device.pem, "a")
    again = ledger.enroll_device(device.device_id, device.pem, "b")
    assert first.enrolled_at == again.enrolled_at
    assert again.name == "b"
    assert [d.device_id for d in ledger.devices()] == [device.device_id]
    assert not again.revoked


def test_enroll_refuses_id_that_is_not_the_keys(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    a, b = make_device(), make_device()
    with pytest.raises(LedgerEnrollmentError, match=b.device_id):
        ledger.enroll_device(a.device_id, b.pem)
    assert ledger.devices() == []


def test_enroll_refuses_non_key(ledger: ServerLedger) -> None:
    with pytest.raises(LedgerEnrollmentError, match="not an Ed25519 public key"):
        ledger.enroll_device("dev-000000000000", "not a pem")


def test_revoked_device_cannot_be_reenrolled(ledger: ServerLedger, make_device: MakeDevice) -> None:
    device = enrolled(ledger, make_device)
    ledger.revoke_device(device.device_id)
    with pytest.raises(LedgerEnrollmentError, match="revoked"):
        ledger.enroll_device(device.device_id, device.pem)
    with pytest.raises(LedgerEnrollmentError, match="no enrolled device"):
        ledger.revoke_device("dev-ffffffffffff")


# --- verdicts ------------------------------------------------------------------------


def test_valid_report_is_verified_and_counted(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    payload, signature = device.report("run-1", 1, [(D1, 0.5, 8.0, False), (D2, 0.7, 8.0, False)])
    verdict = ledger.record_report("run-1", 1, payload, signature, node_id=42)
    assert verdict.verified and verdict.signature_valid and verdict.ok
    assert verdict.flags == ()
    assert verdict.device_id == device.device_id
    [stored] = ledger.reports()
    assert stored.payload_json == payload and stored.signature == signature
    assert stored.node_id == "42"
    rows = {(r.block, r.epsilon, r.budget, r.retired) for r in ledger.block_epsilons()}
    assert rows == {(D1, 0.5, 8.0, False), (D2, 0.7, 8.0, False)}
    assert ledger.audit() == []


def test_tampered_payload_is_unverifiable_and_not_counted(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    payload, signature = device.report("run-1", 1, [(D1, 2.5, 8.0, False)])
    forged = payload.replace('"epsilon":2.5', '"epsilon":0.5')
    assert forged != payload
    verdict = ledger.record_report("run-1", 1, forged, signature)
    assert not verdict.verified and not verdict.signature_valid
    assert verdict.flags == (FLAG_UNVERIFIABLE,)
    assert "signature" in verdict.reasons[0]
    assert ledger.block_epsilons() == []
    # The forged bytes are kept as received: that is the evidence.
    assert ledger.reports()[0].payload_json == forged


def test_unknown_device_is_unverifiable(ledger: ServerLedger, make_device: MakeDevice) -> None:
    stranger = make_device()
    payload, signature = stranger.report("run-1", 1, [(D1, 0.5, 8.0, False)])
    verdict = ledger.record_report("run-1", 1, payload, signature)
    assert verdict.flags == (FLAG_UNVERIFIABLE,)
    assert not verdict.verified
    assert "not enrolled" in verdict.reasons[0]
    assert ledger.reports()[0].device_id == stranger.device_id


def test_report_signed_by_another_enrolled_key_is_unverifiable(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    victim, attacker = enrolled(ledger, make_device), enrolled(ledger, make_device)
    payload, _ = victim.report("run-1", 1, [(D1, 0.1, 8.0, False)])
    verdict = ledger.record_report("run-1", 1, payload, attacker.key.sign(payload.encode()))
    assert verdict.flags == (FLAG_UNVERIFIABLE,) and not verdict.signature_valid


def test_revoked_device_reports_are_unverifiable(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    before = ledger.record_report("run-1", 1, *device.report("run-1", 1, [(D1, 0.5, 8.0, False)]))
    ledger.revoke_device(device.device_id)
    after = ledger.record_report("run-1", 2, *device.report("run-1", 2, [(D1, 0.9, 8.0, False)]))
    assert before.ok
    assert after.flags == (FLAG_UNVERIFIABLE,) and after.signature_valid
    assert "revoked" in after.reasons[0]


def test_replayed_report_is_unverifiable_despite_valid_signature(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    payload, signature = device.report("run-1", 1, [(D1, 0.5, 8.0, False)])
    assert ledger.record_report("run-1", 1, payload, signature).ok
    for run, rnd in (("run-1", 2), ("run-2", 1)):
        verdict = ledger.record_report(run, rnd, payload, signature)
        assert verdict.signature_valid and not verdict.verified
        assert verdict.flags == (FLAG_UNVERIFIABLE,)
        assert "replayed or misrouted" in verdict.reasons[0]


def test_non_canonical_or_malformed_payload_is_unverifiable(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    fields = device.payload("run-1", 1, [(D1, 0.5, 8.0, False)])
    pretty = json.dumps(fields, indent=1, sort_keys=True).encode()
    verdict = ledger.record_report("run-1", 1, pretty.decode(), device.key.sign(pretty))
    assert verdict.flags == (FLAG_UNVERIFIABLE,) and "canonical" in verdict.reasons[0]

    del fields["unit"]
    verdict = ledger.record_report("run-1", 1, *device.sign(fields))
    assert verdict.flags == (FLAG_UNVERIFIABLE,) and "unit" in verdict.reasons[0]

    verdict = ledger.record_report("run-1", 1, "not json", b"\x00" * 64)
    assert verdict.flags == (FLAG_UNVERIFIABLE,) and verdict.device_id == ""
    assert ledger.block_epsilons() == []


def test_decreasing_block_epsilon_is_a_contradiction(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    first = device.report("run-1", 1, [(D1, 1.5, 8.0, False)], total=1.5)
    assert ledger.record_report("run-1", 1, *first).ok
    # Block D1 goes down while the device total stays: only the block is caught.
    second = device.report("run-1", 2, [(D1, 1.0, 8.0, False)], total=1.5)
    verdict = ledger.record_report("run-1", 2, *second)
    assert verdict.verified
    assert verdict.flags == (FLAG_CONTRADICTION,)
    [finding] = verdict.findings
    assert finding.block == D1 and "never goes down" in finding.detail


def test_decreasing_device_total_is_a_contradiction_across_runs(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    assert ledger.record_report("run-1", 1, *device.report("run-1", 1, [(D1, 3.0, 8.0, False)])).ok
    verdict = ledger.record_report("run-2", 1, *device.report("run-2", 1, [(D2, 1.0, 8.0, False)]))
    assert verdict.flags == (FLAG_CONTRADICTION,)
    assert "total" in verdict.reasons[0]


def test_growing_epsilon_is_clean(ledger: ServerLedger, make_device: MakeDevice) -> None:
    device = enrolled(ledger, make_device)
    for rnd, eps in enumerate((0.5, 1.0, 1.5), start=1):
        verdict = ledger.record_report(
            "run-1", rnd, *device.report("run-1", rnd, [(D1, eps, 8.0, False)])
        )
        assert verdict.ok, verdict.findings


def test_retired_block_charged_again_is_a_contradiction(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    assert ledger.record_report("run-1", 1, *device.report("run-1", 1, [(D1, 7.5, 8.0, True)])).ok
    verdict = ledger.record_report("run-1", 2, *device.report("run-1", 2, [(D1, 7.9, 8.0, True)]))
    assert verdict.flags == (FLAG_CONTRADICTION,)
    assert "retired" in verdict.reasons[0]


def test_second_report_for_one_round_is_a_contradiction(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    report = device.report("run-1", 1, [(D1, 0.5, 8.0, False)])
    assert ledger.record_report("run-1", 1, *report).ok
    verdict = ledger.record_report("run-1", 1, *report)
    assert verdict.flags == (FLAG_CONTRADICTION,) and "already reported" in verdict.reasons[0]


def test_report_from_other_sender_is_a_contradiction(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    verdict = ledger.record_report(
        "run-1", 1, *device.report("run-1", 1, [(D1, 0.5, 8.0, False)]),
        sender_device_id="dev-000000000000",
    )
    assert verdict.flags == (FLAG_CONTRADICTION,) and "arrived from" in verdict.reasons[0]


def test_total_below_own_block_is_a_contradiction(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    verdict = ledger.record_report(
        "run-1", 1, *device.report("run-1", 1, [(D1, 2.0, 8.0, False)], total=1.0)
    )
    assert verdict.flags == (FLAG_CONTRADICTION,)


def test_over_budget_block_is_flagged(ledger: ServerLedger, make_device: MakeDevice) -> None:
    device = enrolled(ledger, make_device)
    verdict = ledger.record_report(
        "run-1", 1, *device.report("run-1", 1, [(D1, 8.5, 8.0, True), (D2, 1.0, 8.0, False)])
    )
    assert verdict.verified and not verdict.ok
    assert verdict.flags == (FLAG_OVER_BUDGET,)
    [finding] = verdict.findings
    assert finding.block == D1 and "over its budget" in finding.detail
    # Still counted: the device signed it, and security must see the figure.
    assert {r.block for r in ledger.block_epsilons()} == {D1, D2}


def test_epsilon_exactly_at_budget_is_not_over(
    ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    verdict = ledger.record_report("run-1", 1, *device.report("run-1", 1, [(D1, 8.0, 8.0, True)]))
    assert verdict.ok


# --- audit at rest, refusals, central DP ---------------------------------------------


def test_audit_catches_edits_at_rest(tmp_path: Path, make_device: MakeDevice) -> None:
    with ServerLedger.open(tmp_path) as led:
        device = enrolled(led, make_device)
        led.record_report("run-1", 1, *device.report("run-1", 1, [(D1, 5.0, 8.0, False)]))
        led.record_report("run-1", 2, *device.report("run-1", 2, [(D1, 6.0, 8.0, False)]))
        assert led.audit() == []
    conn = sqlite3.connect(tmp_path / LEDGER_FILE)
    conn.execute("UPDATE block_epsilons SET epsilon = 0.1 WHERE report_id = 1")
    conn.execute(
        "UPDATE reports SET payload_json = replace(payload_json, '\"epsilon\":6.0', "
        "'\"epsilon\":0.6') WHERE id = 2"
    )
    conn.commit()
    conn.close()
    with ServerLedger.open(tmp_path) as led:
        findings = led.audit()
    assert {f.report_id for f in findings} == {1, 2}
    assert any("no longer verifies" in f.detail for f in findings if f.report_id == 2)
    assert any("block_epsilons" in f.detail for f in findings if f.report_id == 1)


def test_refusals_and_central_dp_are_stored(ledger: ServerLedger) -> None:
    ledger.record_refusal("run-1", 3, "node-7", "refused: block 2025-03-03 is retired")
    [refusal] = ledger.refusals()
    assert (refusal.run_id, refusal.server_round, refusal.device) == ("run-1", 3, "node-7")
    row = ledger.record_central_dp(
        run_id="run-1", server_round=1, noise_multiplier=1.0, clip=0.5, sample_rate=1.0,
        sampling="all devices every round, no amplification", epsilon=4.7, delta=1e-5,
    )
    assert ledger.central_dp() == [row]
    with pytest.raises(ServerLedgerError, match="already recorded"):
        ledger.record_central_dp(
            run_id="run-1", server_round=1, noise_multiplier=1.0, clip=0.5, sample_rate=1.0,
            sampling="all", epsilon=4.7, delta=1e-5,
        )
    with pytest.raises(ServerLedgerError, match="delta"):
        ledger.record_central_dp(
            run_id="run-1", server_round=2, noise_multiplier=1.0, clip=0.5, sample_rate=1.0,
            sampling="all", epsilon=5.0, delta=0.0,
        )
    assert ledger.runs() == ["run-1"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_changed_byte_is_never_verified(make_device: MakeDevice, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp, ServerLedger.open(Path(tmp)) as led:
        device = enrolled(led, make_device)
        payload, signature = device.report("run-1", 1, [(D1, 1.25, 8.0, False)])
        index = data.draw(st.integers(0, len(payload) - 1))
        replacement = data.draw(st.characters(min_codepoint=32, max_codepoint=126))
        changed = payload[:index] + replacement + payload[index + 1 :]
        verdict = led.record_report("run-1", 1, changed, signature)
        if changed == payload:
            assert verdict.ok
        else:
            assert not verdict.verified and FLAG_UNVERIFIABLE in verdict.flags
            assert led.block_epsilons() == []


def test_field_names_match_the_device_report() -> None:
    """The device's signed report carries every field the server requires.

    Uses the device's own report builder and canonical form, so a renamed
    field on either side fails here rather than as "unverifiable" in a run.
    """
    from keystay.client.ledger.report import PrivacyReport, ReportBlock, canonical_bytes

    report = PrivacyReport(
        device_id="dev-000000000000", run_id="r", server_round=1,
        blocks=(ReportBlock(D1, 1.0, 0.9, 0.95, 8.0, False),),
        noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5,
        accountant="min(rdp, prv_upper)", epsilon_round=0.95, epsilon_round_rdp=1.0,
        epsilon_total=0.95, max_grad_norm=1.0,
    )
    fields = json.loads(canonical_bytes(report))
    assert set(REQUIRED_FIELDS) <= set(fields)
    assert set(REQUIRED_BLOCK_FIELDS) <= set(fields["blocks"][0])


def test_report_signed_by_device_identity_verifies(tmp_path: Path, ledger: ServerLedger) -> None:
    """End to end with the device's identity and report code."""
    from keystay.client.identity import DeviceIdentity
    from keystay.client.ledger.report import PrivacyReport, ReportBlock, sign_report

    identity = DeviceIdentity(Ed25519PrivateKey.generate())
    ledger.enroll_device(identity.device_id, identity.public_key_pem())
    report = PrivacyReport(
        device_id=identity.device_id, run_id="run-1", server_round=2,
        blocks=(ReportBlock(D3, 1.1, 0.9, 0.95, 8.0, False),),
        noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5,
        accountant="min(rdp, prv_upper)", epsilon_round=0.95, epsilon_round_rdp=1.1,
        epsilon_total=0.95, max_grad_norm=1.0,
    )
    payload, signature = sign_report(report, identity)
    verdict = ledger.record_report("run-1", 2, payload.decode("ascii"), signature)
    assert verdict.ok, verdict.findings


# --- employee-day reports (format v2): both series, recomputed ---------------------------


def _day_report(tmp_path: Path, device: Any, rounds: int = 1) -> list[dict[str, Any]]:
    """Real employee-day charges from a device ledger, as the device reports them."""
    import dataclasses as dc

    from keystay.client.ledger.accounting import Mechanism
    from keystay.client.ledger.ledger import Ledger
    from keystay.client.ledger.report import report_from_charge
    from keystay.client.policy import DevicePolicy, TrainingRequest

    policy = DevicePolicy(min_summed_devices=3, epsilon_per_day=10.0,
                          epsilon_per_day_broken_aggregation=40.0)
    payloads = []
    with Ledger.open(tmp_path / "device") as device_ledger:
        for n in range(1, rounds + 1):
            sigma_eff, q = 0.98, 0.5
            charge = device_ledger.admit(
                request=TrainingRequest(
                    noise_multiplier=1.0, max_grad_norm=0.0, local_steps=20, sample_rate=0.0,
                    learning_rate=0.01, dp=True, blocks=(), run_id="run-1", server_round=n,
                    privacy_unit="employee-day", update_clip=0.5, day_sample_rate=q),
                policy=policy, blocks=[D1, D2],
                mechanism=Mechanism(sigma_eff, q, 1),
                broken_mechanism=Mechanism(sigma_eff / 3**0.5, q, 1),
                now=1_000.0 + n,
            )
            report = dc.replace(report_from_charge(charge, device_id=device.device_id,
                                                   max_grad_norm=0.0))
            payloads.append(report.to_dict())
    return payloads


def _signed(device: Any, payload: dict[str, Any]) -> tuple[bytes, bytes]:
    from keystay.common.canonical import canonical_json

    data = canonical_json(payload)
    return data, device.key.sign(data)


def test_an_employee_day_report_is_verified_with_both_series(
    tmp_path: Path, ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    payloads = _day_report(tmp_path, device, rounds=2)
    first = payloads[0]
    assert first["format"] == "keystay.privacy-report.v2" and first["unit"] == "employee-day"
    assert first["assumptions"] == ["honest-but-curious server",
                                    "server that breaks secure aggregation"]
    assert first["min_summed_devices"] == 3 and first["steps"] == 1
    assert first["blocks"][0]["epsilon_broken"] > first["blocks"][0]["epsilon"]
    for n, payload in enumerate(payloads, start=1):
        verdict = ledger.record_report("run-1", n, *_signed(device, payload))
        assert verdict.ok, verdict.reasons
    assert ledger.audit() == []


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"epsilon_round_broken_rdp": 0.01}, "broken-aggregation ε of the round is reported"),
        ({"epsilon_round_rdp": 0.01}, "honest-but-curious ε of the round is reported"),
        ({"noise_multiplier_broken": 0.9}, "overstates its noise"),
        ({"steps": 2}, "steps must be 1"),
        ({"assumptions": ["trusted server"]}, "names the assumptions"),
        ({"unit": "record"}, "unit must be 'employee-day'"),
        ({"epsilon_total_broken": None}, "no valid 'epsilon_total_broken'"),
    ],
)
def test_an_employee_day_report_whose_figures_do_not_follow_is_unverifiable(
    tmp_path: Path, ledger: ServerLedger, make_device: MakeDevice,
    change: dict[str, Any], words: str,
) -> None:
    device = enrolled(ledger, make_device)
    payload = {**_day_report(tmp_path, device)[0], **change}
    verdict = ledger.record_report("run-1", 1, *_signed(device, payload))
    assert not verdict.verified and FLAG_UNVERIFIABLE in verdict.flags
    assert any(words in reason for reason in verdict.reasons), verdict.reasons
    assert ledger.block_epsilons() == []


def test_an_employee_day_block_over_its_broken_budget_is_flagged(
    tmp_path: Path, ledger: ServerLedger, make_device: MakeDevice
) -> None:
    device = enrolled(ledger, make_device)
    payload = _day_report(tmp_path, device)[0]
    payload["blocks"][0]["budget_broken"] = payload["blocks"][0]["epsilon_broken"] / 2
    verdict = ledger.record_report("run-1", 1, *_signed(device, payload))
    assert verdict.verified and FLAG_OVER_BUDGET in verdict.flags
    assert any("breaks secure aggregation" in r for r in verdict.reasons)


# --- a full disk -----------------------------------------------------------------------


@needs_root
def test_a_full_disk_stores_no_part_of_a_report(tmp_path: Path, make_device: MakeDevice) -> None:
    """The disk fills while reports arrive: each is stored whole or refused clearly."""
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        ledger = ServerLedger.open(disk)
        device = enrolled(ledger, make_device)
        stored = 0
        filler = fill(disk)
        # SQLite may still have room in pages it holds: report until it refuses.
        with pytest.raises(ServerLedgerError, match="server's disk is full") as raised:
            for round_no in range(1, 2000):
                blocks = [(f"2025-{1 + i // 28:02d}-{1 + i % 28:02d}", 0.01 * round_no, 64.0,
                           False) for i in range(40)]
                payload, signature = device.report("run-full", round_no, blocks)
                assert ledger.record_report("run-full", round_no, payload, signature).ok
                stored += 1
        assert "nothing of it was stored" in str(raised.value)
        ledger.close()
        filler.unlink()
        with ServerLedger.open(disk, create=False) as reopened:
            assert len(reopened.reports()) == stored
            assert len(reopened.block_epsilons()) == 40 * stored
            assert reopened.audit() == []
            payload, signature = device.report("run-full", stored + 1, blocks)
            assert reopened.record_report("run-full", stored + 1, payload, signature).ok
