"""Employee-day ledgers written by keystay's own code, for the tests of what people read.

:class:`EmployeeDays` charges a real device :class:`Ledger` with both
mechanisms of each employee-day round (``admit(..., broken_mechanism=...)``,
the real accountant), and signs the real v2 privacy reports of those charges
with a real :class:`DeviceIdentity` into a real :class:`ServerLedger`. The
status output, the budget report and the device page are tested against
ledgers made this way, never against hand-written figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.accounting import Mechanism
from keystay.client.ledger.ledger import Charge, Ledger
from keystay.client.ledger.report import report_from_charge, sign_report
from keystay.client.policy import DevicePolicy, TrainingRequest
from keystay.server.ledger.ledger import ServerLedger

#: t, the device's σ_eff (≈ the requested σ = 1 after rounding) and q of the demo.
T, SIGMA_EFF, Q = 3, 0.98, 0.5


class EmployeeDays:
    """Builders of employee-day ledgers (see the module docstring)."""

    @staticmethod
    def policy(honest: float = 10.0, broken: float = 40.0) -> DevicePolicy:
        return DevicePolicy(privacy_unit="employee-day", min_summed_devices=T,
                            epsilon_per_day=honest, epsilon_per_day_broken_aggregation=broken)

    @staticmethod
    def charge(
        data_dir: Path,
        rounds: Sequence[Sequence[str]],
        *,
        policy: DevicePolicy | None = None,
        run_id: str = "run-day",
        start: float = 1_000.0,
    ) -> list[Charge]:
        """Charge one employee-day round per entry of ``rounds`` (the days it could read)."""
        policy = policy or EmployeeDays.policy()
        charges = []
        with Ledger.open(data_dir) as ledger:
            for n, days in enumerate(rounds, start=1):
                charge = ledger.admit(
                    request=TrainingRequest(
                        noise_multiplier=1.0, max_grad_norm=0.0, local_steps=20,
                        sample_rate=0.0, learning_rate=0.01, dp=True, blocks=(),
                        run_id=run_id, server_round=n, privacy_unit="employee-day",
                        update_clip=0.5, day_sample_rate=Q),
                    policy=policy, blocks=list(days),
                    mechanism=Mechanism(SIGMA_EFF, Q, 1),
                    broken_mechanism=Mechanism(SIGMA_EFF / T**0.5, Q, 1),
                    now=start + 60.0 * n,
                )
                ledger.mark_answered(charge)
                charges.append(charge)
        return charges

    @staticmethod
    def server_ledger(
        server_dir: Path,
        keys_dir: Path,
        rounds: Sequence[Sequence[str]],
        *,
        policy: DevicePolicy | None = None,
        run_id: str = "run-day",
    ) -> tuple[ServerLedger, DeviceIdentity]:
        """One enrolled device's employee-day rounds, signed v2 reports, recorded."""
        ledger = ServerLedger.open(server_dir)
        identity = DeviceIdentity.open(keys_dir / "day-device")
        ledger.enroll_device(identity.device_id, identity.public_key_pem(), "day-laptop")
        for charge in EmployeeDays.charge(keys_dir / "day-ledger", rounds, policy=policy,
                                          run_id=run_id):
            report = report_from_charge(charge, device_id=identity.device_id,
                                        max_grad_norm=0.0)
            verdict = ledger.record_report(run_id, charge.server_round,
                                           *sign_report(report, identity))
            assert verdict.ok, verdict.reasons
        return ledger, identity


@pytest.fixture
def employee_days() -> type[EmployeeDays]:
    return EmployeeDays
