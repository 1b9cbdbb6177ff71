"""The per-block privacy ledger: composition, refusals, retirement, durability.

Most tests fake the accountant with an additive ε (a unit test may fake a
part): a mechanism ``(σ, q, T)`` costs ``T·q/σ``, composed by addition, which
makes expected figures exact. One test runs the real accountant.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystay.client.ledger import accounting
from keystay.client.ledger.accounting import Epsilons, Mechanism
from keystay.client.ledger.ledger import LEDGER_FILE, DeviceLedgerError, Ledger
from keystay.client.policy import DevicePolicy, Refusal, TrainingRequest

DAY1, DAY2, DAY3 = "2025-03-03", "2025-03-04", "2025-03-05"


def additive(history: Sequence[Mechanism], delta: float) -> Epsilons:
    """Fake accountant: ε = Σ T·q/σ; RDP 25 % looser, PRV estimate 1 % lower."""
    total = sum(m.steps * m.sample_rate / m.noise_multiplier for m in history)
    return Epsilons(rdp=1.25 * total, prv=0.99 * total, prv_upper=total)


def request(sigma: float = 1.0, steps: int = 100, **changes: object) -> TrainingRequest:
    base = TrainingRequest(
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        local_steps=steps,
        sample_rate=0.05,
        learning_rate=0.01,
        dp=True,
        blocks=(),
        run_id="run-a",
        server_round=1,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def admit(
    ledger: Ledger,
    blocks: Sequence[str],
    *,
    sigma: float = 1.0,
    q: float = 0.01,
    steps: int = 100,
    policy: DevicePolicy | None = None,
    now: float = 1_000.0,
    run_id: str = "run-a",
    server_round: int = 1,
):
    req = request(sigma, steps, run_id=run_id, server_round=server_round)
    return ledger.admit(
        request=req,
        policy=policy or DevicePolicy(privacy_unit="record"),
        blocks=blocks,
        mechanism=Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps),
        epsilon_fn=additive,
        now=now,
    )


def dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, read through a separate connection."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
    finally:
        conn.close()


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger.open(tmp_path) as opened:
        yield opened


# --- composition -------------------------------------------------------------------------


def test_charges_compose_per_block_across_rounds_runs_and_reopen(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        first = admit(ledger, [DAY1, DAY2], q=0.01, steps=100)  # costs 1.0 per block
        assert [b.epsilon for b in first.blocks] == pytest.approx([1.0, 1.0])
        admit(ledger, [DAY1], q=0.02, steps=100, run_id="run-b", server_round=7)  # +2.0
        ledger.mark_answered(first)
    with Ledger.open(tmp_path) as ledger:  # a daemon restart: history is read back
        assert ledger.history(DAY1) == [Mechanism(1.0, 0.01, 100), Mechanism(1.0, 0.02, 100)]
        assert ledger.history(DAY2) == [Mechanism(1.0, 0.01, 100)]
        third = admit(ledger, [DAY1, DAY2], sigma=2.0, q=0.04, steps=100, run_id="run-c")
    by_block = {b.block: b for b in third.blocks}
    assert by_block[DAY1].epsilon_before == pytest.approx(3.0)
    assert by_block[DAY1].epsilon == pytest.approx(5.0)
    assert by_block[DAY1].cost == pytest.approx(2.0)
    assert by_block[DAY2].epsilon == pytest.approx(3.0)
    assert by_block[DAY1].epsilon_rdp == pytest.approx(6.25)
    assert third.epsilon_round.prv_upper == pytest.approx(2.0)
    assert third.epsilon_total == pytest.approx(5.0)
    with Ledger.open(tmp_path) as ledger:
        totals = {t.block: t for t in ledger.totals()}
        assert totals[DAY1].epsilon == pytest.approx(5.0)
        assert totals[DAY1].charges == 3 and totals[DAY1].runs == 3
        assert totals[DAY2].charges == 2 and totals[DAY2].runs == 2
        assert totals[DAY1].remaining == pytest.approx(3.0)
        assert ledger.device_epsilon() == pytest.approx(5.0)


def test_epsilon_fn_receives_the_full_history_and_policy_delta(ledger: Ledger) -> None:
    seen: list[tuple[int, float]] = []

    def spy(history: Sequence[Mechanism], delta: float) -> Epsilons:
        seen.append((len(history), delta))
        return additive(history, delta)

    policy = DevicePolicy(privacy_unit="record", delta=1e-7)
    for n in range(3):
        ledger.admit(
            request=request(),
            policy=policy,
            blocks=[DAY1],
            mechanism=Mechanism(1.0, 0.01, 100),
            epsilon_fn=spy,
            now=1_000.0 + n,
        )
    assert max(length for length, _ in seen) == 4  # 3 charges + the "once more" check
    assert {delta for _, delta in seen} == {1e-7}


def test_enforced_bound_follows_the_policy_accountant(ledger: Ledger) -> None:
    prv = admit(ledger, [DAY1])
    rdp = admit(ledger, [DAY2], policy=DevicePolicy(privacy_unit="record", accountant="rdp"))
    assert prv.blocks[0].epsilon == pytest.approx(1.0)  # min(rdp 1.25, prv_upper 1.0)
    assert prv.accountant == accounting.ACCOUNTANT
    assert rdp.blocks[0].epsilon == pytest.approx(1.25)
    assert rdp.accountant == "rdp"


# --- refusals ------------------------------------------------------------------------------


def test_budget_exceeded_names_block_spent_cost_and_budget(tmp_path: Path) -> None:
    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=4.0)
    with Ledger.open(tmp_path) as ledger:
        admit(ledger, [DAY1], q=0.015, steps=100, policy=policy)  # 1.5 spent on DAY1
        before = dump(tmp_path / LEDGER_FILE)
        with pytest.raises(Refusal) as info:
            admit(ledger, [DAY1, DAY2], q=0.03, steps=100, policy=policy, now=2_000.0)
    refusal = info.value
    assert refusal.code == "budget-exceeded"
    assert refusal.blocks == (DAY1,)  # DAY2 could afford it
    assert "block 2025-03-03 has spent ε = 1.5 of its budget 4" in refusal.reason
    assert "would cost 3 more, bringing it to 4.5" in refusal.reason
    assert "policy.toml epsilon_per_block" in refusal.reason
    assert "2025-03-04" not in refusal.reason
    assert refusal.grpc_status == "FAILED_PRECONDITION"
    assert dump(tmp_path / LEDGER_FILE) == before


def test_exactly_the_budget_is_allowed(ledger: Ledger) -> None:
    charge = admit(ledger, [DAY1], q=0.08, steps=100)  # 8.0 == budget
    assert charge.blocks[0].epsilon == pytest.approx(8.0)
    assert charge.blocks[0].retired


def test_policy_refusals_come_before_anything_is_written(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        before = dump(tmp_path / LEDGER_FILE)
        with pytest.raises(Refusal) as info:
            ledger.admit(
                request=request(sigma=0.3),
                policy=DevicePolicy(privacy_unit="record"),
                blocks=[DAY1],
                mechanism=Mechanism(0.3, 0.01, 100),
                epsilon_fn=additive,
            )
        assert info.value.code == "noise-below-floor"
        with pytest.raises(Refusal) as info:
            admit(ledger, [])
        assert info.value.code == "no-data"
    assert dump(tmp_path / LEDGER_FILE) == before


def test_participation_gap(ledger: Ledger) -> None:
    policy = DevicePolicy(privacy_unit="record", min_participation_gap_seconds=60)
    admit(ledger, [DAY1], policy=policy, now=1_000.0)
    with pytest.raises(Refusal) as info:
        admit(ledger, [DAY2], policy=policy, now=1_030.0)
    assert info.value.code == "too-soon"
    assert "at least 60 s" in info.value.reason
    assert "min_participation_gap_seconds" in info.value.reason
    with pytest.raises(Refusal):  # a clock set back never shortens the gap
        admit(ledger, [DAY2], policy=policy, now=500.0)
    admit(ledger, [DAY2], policy=policy, now=1_060.0)


def test_nan_epsilon_is_an_error_not_an_admission(tmp_path: Path) -> None:
    def broken(history: Sequence[Mechanism], delta: float) -> Epsilons:
        return Epsilons(rdp=float("nan"), prv=float("nan"), prv_upper=float("nan"))

    with Ledger.open(tmp_path) as ledger:
        before = dump(tmp_path / LEDGER_FILE)
        with pytest.raises(DeviceLedgerError, match="nothing was charged"):
            ledger.admit(
                request=request(),
                policy=DevicePolicy(privacy_unit="record"),
                blocks=[DAY1],
                mechanism=Mechanism(1.0, 0.01, 100),
                epsilon_fn=broken,
            )
    assert dump(tmp_path / LEDGER_FILE) == before


def test_mechanism_must_match_the_request(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="differs from the request"):
        ledger.admit(
            request=request(sigma=1.0),
            policy=DevicePolicy(privacy_unit="record"),
            blocks=[DAY1],
            mechanism=Mechanism(2.0, 0.01, 100),
            epsilon_fn=additive,
        )
    with pytest.raises(ValueError, match="local_steps"):
        ledger.admit(
            request=request(steps=100),
            policy=DevicePolicy(privacy_unit="record"),
            blocks=[DAY1],
            mechanism=Mechanism(1.0, 0.01, 99),
            epsilon_fn=additive,
        )


# Hypothesis: a random sequence of rounds against a small budget. Every refused
# round leaves every table byte-for-byte as it was, and no block ever ends
# above its budget or is charged after it retired.
rounds = st.lists(
    st.tuples(
        st.floats(min_value=0.5, max_value=3.0),  # sigma (some below the 0.8 floor)
        st.sampled_from([0.01, 0.05, 0.2, 1.0]),  # q
        st.integers(min_value=1, max_value=260),  # steps (some above the 200 max)
        st.sets(st.sampled_from([DAY1, DAY2, DAY3]), max_size=3),  # blocks
        st.integers(min_value=0, max_value=120),  # seconds since the previous round
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=rounds)
def test_refused_rounds_never_change_the_ledger(
    rounds: list[tuple[float, float, int, set[str], int]],
) -> None:
    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=6.0,
                          min_participation_gap_seconds=30)
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp)) as ledger:
        path = Path(tmp) / LEDGER_FILE
        now = 10_000.0
        retired_seen: set[str] = set()
        for sigma, q, steps, blocks, wait in rounds:
            now += wait
            before = dump(path)
            try:
                charge = admit(
                    ledger, sorted(blocks), sigma=sigma, q=q, steps=steps, policy=policy, now=now
                )
            except Refusal:
                assert dump(path) == before
                continue
            charged = {b.block for b in charge.blocks}
            assert not charged & retired_seen, "a retired block was charged again"
            retired_seen |= ledger.retired_blocks()
            for total in ledger.totals():
                assert total.epsilon <= policy.epsilon_per_block + 1e-12
                expected = additive(ledger.history(total.block), policy.delta).prv_upper
                assert total.epsilon == pytest.approx(expected)


# --- retirement -------------------------------------------------------------------------------


def test_block_retires_when_the_same_round_cannot_be_afforded_again(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        first = admit(ledger, [DAY1], q=0.03, steps=100)  # 3.0; 6.0 would still fit 8
        assert not first.blocks[0].retired
        second = admit(ledger, [DAY1], q=0.03, steps=100)  # 6.0; 9.0 would not
        assert second.blocks[0].retired
        assert ledger.retired_blocks() == {DAY1}
    with Ledger.open(tmp_path) as ledger:
        # Retired for good: even a round cheap enough to fit is refused.
        with pytest.raises(Refusal) as info:
            admit(ledger, [DAY1, DAY2], q=0.001, steps=1)
        assert info.value.code == "block-retired"
        assert info.value.blocks == (DAY1,)
        assert "2025-03-03" in info.value.reason and "never trained on again" in info.value.reason
        # Raising the budget later does not bring a spent day back.
        with pytest.raises(Refusal):
            admit(ledger, [DAY1],
                  policy=DevicePolicy(privacy_unit="record", epsilon_per_block=30.0))
        totals = ledger.totals()
        assert totals[0].retired and totals[0].remaining == pytest.approx(2.0)


# --- durability ---------------------------------------------------------------------------------


def test_no_refund_when_a_charge_is_never_answered(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path)
    charge = admit(ledger, [DAY1], q=0.05, steps=100)
    # No mark_answered, no close: a second object (the restarted daemon) reads it.
    again = Ledger.open(tmp_path)
    assert again.device_epsilon() == pytest.approx(5.0)
    assert again.unanswered() == [charge.id]
    assert again.history(DAY1) == [Mechanism(1.0, 0.05, 100)]
    with pytest.raises(Refusal):
        admit(again, [DAY1], q=0.05, steps=100)
    again.mark_answered(charge)
    assert again.unanswered() == []
    assert again.device_epsilon() == pytest.approx(5.0)
    again.close()
    ledger.close()


def test_charge_survives_a_process_killed_before_answering(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from keystay.client.ledger.accounting import Epsilons, Mechanism
        from keystay.client.ledger.ledger import Ledger
        from keystay.client.policy import DevicePolicy, TrainingRequest

        def fake(history, delta):
            t = sum(m.steps * m.sample_rate / m.noise_multiplier for m in history)
            return Epsilons(rdp=t, prv=t, prv_upper=t)

        ledger = Ledger.open(Path({str(tmp_path)!r}))
        req = TrainingRequest(1.0, 1.0, 100, 0.04, 0.01, True, (), "run-x", 3)
        ledger.admit(request=req, policy=DevicePolicy(privacy_unit="record"), blocks=["{DAY1}"],
                     mechanism=Mechanism(1.0, 0.04, 100), epsilon_fn=fake)
        os._exit(9)  # dies mid-round: no answer, no close
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=False)
    assert result.returncode == 9
    with Ledger.open(tmp_path) as ledger:
        assert ledger.device_epsilon() == pytest.approx(4.0)
        assert len(ledger.unanswered()) == 1


def test_two_connections_cannot_both_spend_the_last_budget(tmp_path: Path) -> None:
    Ledger.open(tmp_path).close()
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        with Ledger.open(tmp_path) as ledger:
            barrier.wait()
            try:
                admit(ledger, [DAY1], q=0.05, steps=100)  # 5.0 each; budget 8 fits one
                outcomes.append("admitted")
            except Refusal as refusal:
                outcomes.append(refusal.code)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The first to commit spends 5.0 and retires the block (10.0 would not fit).
    assert sorted(outcomes) == ["admitted", "block-retired"]
    with Ledger.open(tmp_path) as ledger:
        assert ledger.device_epsilon() == pytest.approx(5.0)


def test_file_is_private_and_fully_synchronous(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        mode = stat.S_IMODE(os.stat(tmp_path / LEDGER_FILE).st_mode)
        assert mode == 0o600
        assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert ledger._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unknown_format_or_garbage_stops_with_an_error(tmp_path: Path) -> None:
    Ledger.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / LEDGER_FILE)
    conn.execute("PRAGMA user_version=7")
    conn.close()
    with pytest.raises(DeviceLedgerError, match="ledger format 7"):
        Ledger.open(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / LEDGER_FILE).write_bytes(b"not a database at all" * 100)
    with pytest.raises(DeviceLedgerError, match="never delete it"):
        Ledger.open(other)


# --- forgetting, totals -------------------------------------------------------------------------


def test_forget_block_data_keeps_every_ledger_row(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        admit(ledger, [DAY1, DAY2], q=0.02)
        before = dump(tmp_path / LEDGER_FILE)["charges"]
        assert ledger.forget_block_data(DAY1, now=5_000.0) is True
        assert ledger.forget_block_data("2030-01-01") is False
        assert dump(tmp_path / LEDGER_FILE)["charges"] == before
        totals = {t.block: t for t in ledger.totals()}
        assert totals[DAY1].forgotten_at == 5_000.0 and totals[DAY1].epsilon == pytest.approx(2.0)
        # The same day recorded again inherits its history: no refund.
        charge = admit(ledger, [DAY1], q=0.02, now=6_000.0)
        assert charge.blocks[0].epsilon == pytest.approx(4.0)


def test_device_epsilon_is_the_most_spent_block(ledger: Ledger) -> None:
    assert ledger.device_epsilon() == 0.0
    assert ledger.totals() == []
    admit(ledger, [DAY1, DAY2], q=0.01)
    admit(ledger, [DAY2], q=0.03)
    assert ledger.device_epsilon() == pytest.approx(4.0)
    assert [t.block for t in ledger.totals()] == [DAY1, DAY2]


def test_ledger_module_does_not_import_torch() -> None:
    code = "import sys, keystay.client.ledger.ledger; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- the real accountant ------------------------------------------------------------------------


def test_with_the_real_accountant(tmp_path: Path) -> None:
    def real(history: Sequence[Mechanism], delta: float) -> Epsilons:
        return accounting.epsilons(history, delta=delta)

    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=8.0)
    mechanism = Mechanism(noise_multiplier=1.0, sample_rate=0.02, steps=200)
    with Ledger.open(tmp_path) as ledger:
        charges = [
            ledger.admit(
                request=request(sigma=1.0, steps=200),
                policy=policy,
                blocks=[DAY1],
                mechanism=mechanism,
                epsilon_fn=real,
                now=1_000.0 + n,
            )
            for n in range(2)
        ]
    expected = accounting.epsilons([mechanism, mechanism], delta=policy.delta)
    second = charges[1].blocks[0]
    assert second.epsilon == pytest.approx(accounting.enforced(expected))
    assert second.epsilon_rdp == pytest.approx(expected.rdp)
    # Composition is not additive: two rounds cost less than twice one round.
    assert charges[0].blocks[0].epsilon < second.epsilon < 2 * charges[0].blocks[0].epsilon
    assert second.epsilon <= policy.epsilon_per_block


# --- the built-in incremental accountant (epsilon_fn=None, as the daemon uses) -------------


def _charge_real(
    ledger: Ledger, blocks: Sequence[str], m: Mechanism, n: int, policy: DevicePolicy
):
    return ledger.admit(
        request=request(sigma=m.noise_multiplier, steps=m.steps, server_round=n),
        policy=policy,
        blocks=blocks,
        mechanism=m,
        now=1_000.0 + n,
    )


MIX = [
    Mechanism(1.0, 0.004, 100),
    Mechanism(1.2, 0.006, 150),
    Mechanism(1.5, 0.010, 200),
    Mechanism(0.9, 0.002, 50),
    Mechanism(2.0, 0.020, 200),
    Mechanism(1.1, 0.003, 120),
]


def _state_row(path: Path, block: str) -> tuple[object, ...] | None:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT version, last_charge, charges FROM accountant_state WHERE block = ?",
            (block,),
        ).fetchone()
    finally:
        conn.close()


def test_builtin_accountant_stores_a_state_that_equals_the_history(tmp_path: Path) -> None:
    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=16.0)
    with Ledger.open(tmp_path) as ledger:
        for n, m in enumerate(MIX[:4], start=1):
            charge = _charge_real(ledger, [DAY1, DAY2] if n % 2 else [DAY1], m, n, policy)
        assert _state_row(ledger.path, DAY1) == (accounting.STATE_VERSION, charge.id, 4)
        assert _state_row(ledger.path, DAY2) is not None
        scratch = accounting.epsilons(ledger.history(DAY1), delta=policy.delta)
        last = charge.blocks[0]
        assert last.epsilon_rdp == pytest.approx(scratch.rdp, rel=1e-9)
        assert last.epsilon == pytest.approx(accounting.enforced(scratch), rel=1e-3)
        assert charge.accountant == accounting.ACCOUNTANT == "min(rdp, pld)"
        alone = accounting.epsilons([MIX[3]], delta=policy.delta)
        assert charge.epsilon_round.prv_upper == pytest.approx(alone.prv_upper, rel=1e-9)


@pytest.mark.parametrize("damage", ["delete", "version", "stale", "garbage"])
def test_a_missing_or_foreign_state_is_rebuilt_from_the_history(
    tmp_path: Path, damage: str
) -> None:
    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=16.0)
    with Ledger.open(tmp_path) as ledger:
        for n, m in enumerate(MIX[:3], start=1):
            _charge_real(ledger, [DAY1], m, n, policy)
        path = ledger.path
    conn = sqlite3.connect(path)
    if damage == "delete":
        conn.execute("DELETE FROM accountant_state")
    elif damage == "version":
        conn.execute("UPDATE accountant_state SET version = 'an-older-grid'")
    elif damage == "garbage":
        conn.execute("UPDATE accountant_state SET state = x'00ff'")
    conn.commit()
    conn.close()
    with Ledger.open(tmp_path) as ledger:
        if damage == "stale":
            # A charge priced by another accountant (an older keystay, epsilon_fn) leaves
            # the stored state one charge behind the history.
            ledger.admit(request=request(steps=10, server_round=4), policy=policy,
                         blocks=[DAY1], mechanism=Mechanism(1.0, 0.01, 10),
                         epsilon_fn=lambda h, d: accounting.epsilons(h, delta=d), now=1_004.0)
        history = ledger.history(DAY1)
        charge = _charge_real(ledger, [DAY1], MIX[3], 9, policy)
        expected = accounting.epsilons([*history, MIX[3]], delta=policy.delta)
        assert charge.blocks[0].epsilon_rdp == pytest.approx(expected.rdp, rel=1e-9)
        assert charge.blocks[0].epsilon == pytest.approx(accounting.enforced(expected), rel=1e-3)
        assert _state_row(ledger.path, DAY1) == (
            accounting.STATE_VERSION, charge.id, len(history) + 1
        )


def test_a_ledger_from_before_the_state_table_gains_it(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        admit(ledger, [DAY1])
        path = ledger.path
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE accountant_state")
    conn.commit()
    conn.close()
    with Ledger.open(tmp_path) as ledger:
        charge = _charge_real(ledger, [DAY1], MIX[0], 2, DevicePolicy(privacy_unit="record"))
        assert _state_row(ledger.path, DAY1) == (accounting.STATE_VERSION, charge.id, 2)


# Half MIX's sample rates: 1,000 rounds end near ε = 4, a typical budget.
THOUSAND = [dataclasses.replace(m, sample_rate=m.sample_rate / 2) for m in MIX]


def test_a_thousand_mixed_rounds_on_one_block_stay_valid(tmp_path: Path) -> None:
    """1,000 rounds of mixed mechanisms on one block, through the real ledger.

    Each charge's ε must never decrease, stay within budget, stay at or below
    the RDP bound, and end where an independent accountant (dp-accounting's
    PLD, on the merged history) puts it: never more than 1 % below.

    The ledger lives in RAM (``/dev/shm``) where there is one: this test is
    about the maths staying valid, and 1,000 fsyncs would only slow it down
    (``bench/bench_accounting.py`` times charges on a real disk).
    """
    import dp_accounting
    from dp_accounting import pld as google_pld

    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=32.0)
    previous = 0.0
    counts: dict[Mechanism, int] = {}
    shm = Path("/dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path
    with Ledger.open(folder) as ledger:
        for n in range(1, 1_001):
            m = THOUSAND[n % len(THOUSAND)]
            counts[m] = counts.get(m, 0) + 1
            block = _charge_real(ledger, [DAY1], m, n, policy).blocks[0]
            assert previous < block.epsilon <= min(block.epsilon_rdp, block.budget)
            assert block.epsilon_before == pytest.approx(previous)
            previous = block.epsilon
        assert len(ledger.history(DAY1)) == 1_000
        assert 2.0 < previous < 8.0  # the regime the mix was chosen for
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)),
            m.steps * k)
        for m, k in counts.items()
    ])
    google = google_pld.PLDAccountant(value_discretization_interval=1e-4)
    google.compose(event)
    truth = google.get_epsilon(policy.delta)
    assert truth * 0.99 <= previous <= truth * 1.02
    if folder != tmp_path:
        shutil.rmtree(folder)


def test_a_refused_round_leaves_the_stored_state_alone(tmp_path: Path) -> None:
    policy = DevicePolicy(privacy_unit="record", epsilon_per_block=1.0)
    with Ledger.open(tmp_path) as ledger:
        _charge_real(ledger, [DAY1], Mechanism(1.5, 0.01, 100), 1, policy)
        before = dump(ledger.path)
        with pytest.raises(Refusal) as refused:
            _charge_real(ledger, [DAY1], Mechanism(0.8, 0.2, 200), 2, policy)
        assert refused.value.code == "budget-exceeded"
        assert dump(ledger.path) == before


# --- the employee-day unit: two series per day ------------------------------------------

DAY_POLICY = DevicePolicy(epsilon_per_day=1.0, epsilon_per_day_broken_aggregation=2.0,
                          min_summed_devices=4)


def day_request(sigma: float = 1.0, q: float = 0.5, **changes: object) -> TrainingRequest:
    base = request(sigma, 10, privacy_unit="employee-day", update_clip=0.5,
                   day_sample_rate=q, sample_rate=0.0, max_grad_norm=0.0)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def day_mechanisms(sigma: float, q: float, t: int) -> tuple[Mechanism, Mechanism]:
    return Mechanism(sigma, q, 1), Mechanism(sigma / t**0.5, q, 1)


def admit_day(
    ledger: Ledger,
    blocks: Sequence[str],
    *,
    sigma: float = 1.0,
    q: float = 0.5,
    policy: DevicePolicy = DAY_POLICY,
    server_round: int = 1,
    epsilon_fn: object = additive,
):
    honest, broken = day_mechanisms(sigma, q, policy.min_summed_devices)
    return ledger.admit(
        request=day_request(sigma, q, server_round=server_round),
        policy=policy,
        blocks=blocks,
        mechanism=honest,
        broken_mechanism=broken,
        epsilon_fn=epsilon_fn,  # type: ignore[arg-type]
        now=1_000.0 + server_round,
    )


def test_an_employee_day_charge_records_both_series(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        charge = admit_day(ledger, [DAY1, DAY2])
        # additive: honest ε = q/σ = 0.5, broken = q·√t/σ = 1.0
        assert charge.unit == "employee-day"
        assert charge.min_summed_devices == 4 and charge.update_clip == 0.5
        assert charge.broken_mechanism == Mechanism(0.5, 0.5, 1)
        for block in charge.blocks:
            assert block.epsilon == pytest.approx(0.5) and block.budget == 1.0
            assert block.epsilon_broken == pytest.approx(1.0) and block.budget_broken == 2.0
            assert block.cost_broken == pytest.approx(1.0)
        assert charge.epsilon_total_broken == pytest.approx(1.0)
        assert charge.epsilon_round_broken_enforced == pytest.approx(1.0)
        totals = {t.block: t for t in ledger.totals()}
        assert totals[DAY1].unit == "employee-day"
        assert totals[DAY1].epsilon_broken == pytest.approx(1.0)
        assert totals[DAY1].remaining_broken == pytest.approx(1.0)
        assert ledger.history(DAY1, broken=True) == [Mechanism(0.5, 0.5, 1)]
        assert ledger.device_epsilon_broken() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("policy", "which"),
    [
        # Two rounds at σ = 2 (honest 0.25, broken 0.5 each), then σ = 0.8
        # (honest 0.625, broken 1.25). Honest binds: 1.125 > 1 while broken 2.25 <= 10.
        (DevicePolicy(epsilon_per_day=1.0, epsilon_per_day_broken_aggregation=10.0,
                      min_summed_devices=4), "budget 1;"),
        # Broken binds: honest 1.125 <= 10 while broken 2.25 > 2.
        (DevicePolicy(epsilon_per_day=10.0, epsilon_per_day_broken_aggregation=2.0,
                      min_summed_devices=4), "server that breaks secure aggregation"),
    ],
)
def test_over_budget_on_either_series_refuses_and_charges_nothing(
    tmp_path: Path, policy: DevicePolicy, which: str
) -> None:
    with Ledger.open(tmp_path) as ledger:
        admit_day(ledger, [DAY1], sigma=2.0, policy=policy, server_round=1)
        admit_day(ledger, [DAY1], sigma=2.0, policy=policy, server_round=2)
        before = dump(ledger.path)
        with pytest.raises(Refusal) as info:
            admit_day(ledger, [DAY1, DAY2], sigma=0.8, policy=policy, server_round=3)
        assert info.value.code == "budget-exceeded"
        assert info.value.blocks == (DAY1,)
        assert which in info.value.reason
        assert dump(ledger.path) == before


def test_a_day_retires_when_either_budget_could_not_afford_the_round_again(
    tmp_path: Path,
) -> None:
    # Broken budget 2.0 affords two rounds of 1.0: retired after the second,
    # while the honest series (1.0 of 10) is far from its budget.
    policy = DevicePolicy(epsilon_per_day=10.0, epsilon_per_day_broken_aggregation=2.0,
                          min_summed_devices=4)
    with Ledger.open(tmp_path) as ledger:
        first = admit_day(ledger, [DAY1], policy=policy, server_round=1)
        assert not first.blocks[0].retired
        second = admit_day(ledger, [DAY1], policy=policy, server_round=2)
        assert second.blocks[0].retired and second.blocks[0].epsilon < 10.0
        assert ledger.retired_blocks() == {DAY1}
        with pytest.raises(Refusal) as info:
            admit_day(ledger, [DAY1], policy=policy, server_round=3)
        assert info.value.code == "block-retired"


def test_both_series_survive_a_reopen_and_keep_composing(tmp_path: Path) -> None:
    policy = DevicePolicy(epsilon_per_day=20.0, epsilon_per_day_broken_aggregation=60.0)
    with Ledger.open(tmp_path) as ledger:
        admit_day(ledger, [DAY1], policy=policy, server_round=1, epsilon_fn=None)
        stored = ledger.accountant_state(DAY1, broken=True)
    with Ledger.open(tmp_path) as ledger:
        again = ledger.accountant_state(DAY1, broken=True)
        assert np.array_equal(again.rdp, stored.rdp)
        charge = admit_day(ledger, [DAY1], policy=policy, server_round=2, epsilon_fn=None)
        honest, broken = day_mechanisms(1.0, 0.5, policy.min_summed_devices)
        expected = accounting.epsilons([broken, broken], delta=policy.delta)
        assert charge.blocks[0].epsilon_broken == pytest.approx(
            accounting.enforced(expected), rel=1e-6
        )
        assert charge.blocks[0].epsilon == pytest.approx(
            accounting.enforced(accounting.epsilons([honest, honest], delta=policy.delta)),
            rel=1e-6,
        )


def test_a_ledger_from_before_the_employee_day_tables_opens_and_keeps_its_charges(
    tmp_path: Path,
) -> None:
    with Ledger.open(tmp_path) as ledger:
        admit(ledger, [DAY1])
        path = ledger.path
    conn = sqlite3.connect(path)
    for table in ("charge_units", "broken_charges", "broken_accountant_state"):
        conn.execute(f"DROP TABLE {table}")
    conn.commit()
    conn.close()
    with Ledger.open(tmp_path) as ledger:
        (total,) = ledger.totals()
        assert total.unit == "record" and total.epsilon_broken is None
        assert total.remaining_broken is None
        # Its record-level charge closes the day to employee-day rounds.
        assert ledger.retired_blocks("employee-day") == {DAY1}
        assert ledger.retired_blocks() == set()
        with pytest.raises(Refusal) as info:
            admit_day(ledger, [DAY1, DAY2])
        assert info.value.code == "block-retired" and info.value.blocks == (DAY1,)
        assert "record-level" in info.value.reason
        assert admit_day(ledger, [DAY2]).blocks[0].block == DAY2


def test_record_level_charges_keep_working_without_a_second_series(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        charge = admit(ledger, [DAY1])
        assert charge.unit == "record" and charge.broken_mechanism is None
        assert charge.blocks[0].epsilon_broken is None and charge.blocks[0].budget_broken is None
        assert charge.blocks[0].cost_broken is None
        with pytest.raises(ValueError, match="no broken-aggregation"):
            ledger.admit(request=request(), policy=DevicePolicy(privacy_unit="record"),
                         blocks=[DAY2], mechanism=Mechanism(1.0, 0.01, 100),
                         broken_mechanism=Mechanism(0.5, 0.01, 100), epsilon_fn=additive)


@pytest.mark.parametrize(
    ("honest", "broken", "words"),
    [
        (Mechanism(1.0, 0.5, 1), None, "needs its broken-aggregation mechanism"),
        (Mechanism(1.0, 0.5, 2), Mechanism(0.5, 0.5, 1), "steps"),
        (Mechanism(1.0, 0.4, 1), Mechanism(0.5, 0.4, 1), "day_sample_rate"),
        (Mechanism(1.5, 0.5, 1), Mechanism(0.5, 0.5, 1), "the request's σ"),
        (Mechanism(1.0, 0.5, 1), Mechanism(0.6, 0.5, 1), "σ_eff / √t"),
    ],
)
def test_employee_day_mechanisms_that_overstate_the_noise_raise(
    tmp_path: Path, honest: Mechanism, broken: Mechanism | None, words: str
) -> None:
    with Ledger.open(tmp_path) as ledger:
        with pytest.raises(ValueError, match=words):
            ledger.admit(request=day_request(), policy=DAY_POLICY, blocks=[DAY1],
                         mechanism=honest, broken_mechanism=broken, epsilon_fn=additive)
        assert ledger.totals() == []
