"""Ledgers with history, for the page tests and the README screenshots.

Both are written through keystay's own code: the device ledger by
:meth:`Ledger.admit` with the real accountant (as the daemon charges), the
server ledger by real device identities signing real privacy reports (as
devices send them) and :meth:`ServerLedger.record_report`. Some of the text
is hostile on purpose (markup in a refusal reason), so the pages must escape
it.
"""

from __future__ import annotations

import time
from pathlib import Path

from keystay.client.identity import DeviceIdentity
from keystay.client.ledger import accounting
from keystay.client.ledger.accounting import Mechanism
from keystay.client.ledger.ledger import Ledger
from keystay.client.ledger.report import report_from_charge, sign_report
from keystay.client.policy import DevicePolicy, TrainingRequest
from keystay.server.ledger.ledger import ServerLedger

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
#: The demo's server ledger is record-level (the default policy is now employee-day).
RECORD_POLICY = DevicePolicy(privacy_unit="record")


def _request(run_id: str, server_round: int, sigma: float, steps: int,
             q: float = 0.05) -> TrainingRequest:
    return TrainingRequest(noise_multiplier=sigma, max_grad_norm=1.0, local_steps=steps,
                           sample_rate=q, learning_rate=0.01, dp=True, blocks=(),
                           run_id=run_id, server_round=server_round)


def charge_device(data_dir: Path, rounds: list[tuple[list[str], float, float, int]],
                  *, forget: tuple[str, ...] = (), run_id: str = "demo") -> None:
    """Charge record-level ``rounds`` = [(days, σ, q, steps)] to the ledger in ``data_dir``."""
    policy = DevicePolicy(privacy_unit="record")
    now = time.time() - 3600 * len(rounds)
    with Ledger.open(data_dir) as ledger:
        for i, (days, sigma, q, steps) in enumerate(rounds, start=1):
            charge = ledger.admit(
                request=_request(run_id, i, sigma, steps, q), policy=policy, blocks=days,
                mechanism=Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps),
                epsilon_fn=lambda h, d: accounting.epsilons(h, delta=d),
                now=now + 3600 * i,
            )
            ledger.mark_answered(charge)
        for day in forget:
            ledger.forget_block_data(day)


def charge_device_days(data_dir: Path, rounds: list[list[str]], *, honest: float = 10.0,
                       broken: float = 40.0, t: int = 3, sigma_eff: float = 0.98,
                       q: float = 0.5) -> None:
    """Charge employee-day ``rounds`` (the days each could read) as the daemon does:
    both mechanisms of each round, the honest-but-curious server's and the share's."""
    policy = DevicePolicy(privacy_unit="employee-day", min_summed_devices=t,
                          epsilon_per_day=honest, epsilon_per_day_broken_aggregation=broken)
    now = time.time() - 3600 * len(rounds)
    with Ledger.open(data_dir) as ledger:
        for i, days in enumerate(rounds, start=1):
            charge = ledger.admit(
                request=TrainingRequest(
                    noise_multiplier=1.0, max_grad_norm=0.0, local_steps=20, sample_rate=0.0,
                    learning_rate=0.01, dp=True, blocks=(), run_id="demo-days", server_round=i,
                    privacy_unit="employee-day", update_clip=0.5, day_sample_rate=q),
                policy=policy, blocks=days, mechanism=Mechanism(sigma_eff, q, 1),
                broken_mechanism=Mechanism(sigma_eff / t**0.5, q, 1), now=now + 3600 * i,
            )
            ledger.mark_answered(charge)


def server_ledger(server_dir: Path, keys_dir: Path) -> ServerLedger:
    """Two enrolled devices over three rounds, a stranger, a refusal, central DP."""
    ledger = ServerLedger.open(server_dir)
    devices = [DeviceIdentity.open(keys_dir / name) for name in ("alice", "bob")]
    for device, name in zip(devices, ("alice-laptop", "bob-laptop"), strict=True):
        ledger.enroll_device(device.device_id, device.public_key_pem(), name)
    stranger = DeviceIdentity.open(keys_dir / "stranger")
    days = ["2026-11-30", "2026-12-01", "2026-12-02"]
    for device_no, device in enumerate(devices):
        dev_ledger_dir = keys_dir / f"ledger-{device_no}"
        for rnd in range(1, 4):
            with Ledger.open(dev_ledger_dir) as dev_ledger:
                sigma = 1.0 + 0.2 * device_no
                charge = dev_ledger.admit(
                    request=_request("run-demo", rnd, sigma, 60), policy=RECORD_POLICY,
                    blocks=days[: rnd], mechanism=Mechanism(sigma, 0.05, 60),
                    epsilon_fn=lambda h, d: accounting.epsilons(h, delta=d),
                    now=1_000.0 + rnd * 10,
                )
            report = report_from_charge(charge, device_id=device.device_id, max_grad_norm=1.0)
            payload, signature = sign_report(report, device)
            ledger.record_report("run-demo", rnd, payload, signature)
    for rnd, eps in ((1, 1.4), (2, 2.3), (3, 3.1)):
        ledger.record_central_dp(
            run_id="run-demo", server_round=rnd, noise_multiplier=0.8, clip=1.0,
            sample_rate=1.0, sampling="all devices every round, no amplification",
            epsilon=eps, delta=1e-5,
        )
    # A device nobody enrolled: its report must not count.
    with Ledger.open(keys_dir / "ledger-stranger") as dev_ledger:
        charge = dev_ledger.admit(
            request=_request("run-demo", 3, 1.0, 60), policy=RECORD_POLICY, blocks=days[:1],
            mechanism=Mechanism(1.0, 0.05, 60),
            epsilon_fn=lambda h, d: accounting.epsilons(h, delta=d), now=2_000.0,
        )
    report = report_from_charge(charge, device_id=stranger.device_id, max_grad_norm=1.0)
    ledger.record_report("run-demo", 3, *sign_report(report, stranger))
    ledger.record_refusal("run-demo", 2, "node-7", f"refused: noise below floor {HOSTILE}")
    return ledger
