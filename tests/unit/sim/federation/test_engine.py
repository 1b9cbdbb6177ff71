"""The simulation's run settings, population, enrollment and per-round line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keystay.client.identity import DeviceIdentity
from keystay.client.policy import DevicePolicy
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.settings import SettingsError
from keystay.sim.federation.engine import (
    ASSUMPTIONS,
    WIDE_SHARES,
    SimOptions,
    backend_config,
    enroll,
    epsilon_means,
    population,
)


@pytest.mark.parametrize(("unit", "devices", "fraction", "per_round"), [
    ("employee-day", 1000, 1.0, 1000), ("employee-day", 1000, 0.1, 100),
    ("record", 7, 0.1, 1),
    # An employee-day round never asks for fewer than the policy's t = 3:
    # every device would refuse a SecAgg+ round that could unmask a smaller sum.
    ("employee-day", 7, 0.1, 3), ("employee-day", 3, 0.5, 3),
])
def test_min_devices_follows_the_population(unit: str, devices: int, fraction: float,
                                            per_round: int, tmp_path: Path) -> None:
    # Flower samples max(int(connected × fraction), min-devices) once min-devices
    # nodes are registered: the first round cannot sample a half-registered population.
    settings = SimOptions(devices=devices, rounds=2, fraction=fraction, out=tmp_path,
                          privacy_unit=unit).settings()
    assert settings.min_devices == per_round
    assert settings.fraction_train == fraction
    assert settings.privacy_unit == unit
    assert settings.server_dir == tmp_path.resolve() / "server"
    assert population(SimOptions(devices=devices, rounds=1, out=tmp_path,
                                 privacy_unit=unit)).policy.privacy_unit == unit


def test_an_employee_day_run_needs_t_devices(tmp_path: Path) -> None:
    t = DevicePolicy().min_summed_devices
    with pytest.raises(SettingsError, match=f"at least {t} devices"):
        SimOptions(devices=t - 1, rounds=1, out=tmp_path).settings()
    assert SimOptions(devices=t - 1, rounds=1, out=tmp_path,
                      privacy_unit="record").settings().min_devices == t - 1


def test_run_config_overrides_are_validated_as_for_round_start(tmp_path: Path) -> None:
    options = SimOptions(devices=3, rounds=1, out=tmp_path,
                         run_config={"noise-multiplier": 3.0})
    assert options.settings().noise_multiplier == 3.0
    with pytest.raises(SettingsError, match="nosie"):
        SimOptions(devices=3, rounds=1, out=tmp_path, run_config={"nosie": 1}).settings()


def test_the_population_is_reproducible_and_mixes_roles(tmp_path: Path) -> None:
    a = population(SimOptions(devices=40, rounds=1, out=tmp_path, seed=5, days=4))
    b = population(SimOptions(devices=40, rounds=1, out=tmp_path, seed=5, days=4))
    c = population(SimOptions(devices=40, rounds=1, out=tmp_path, seed=6, days=4))
    assert a == b and a != c
    assert len({e.role for e in a.employees}) == 4
    assert all(len(e.day_events) == 4 for e in a.employees)


def test_enroll_puts_every_device_key_in_the_server_ledger_once(tmp_path: Path) -> None:
    options = SimOptions(devices=3, rounds=1, out=tmp_path)
    people, settings = population(options), options.settings()
    enroll(people, settings)
    enroll(people, settings)  # a second run in the same folder enrolls nothing new
    ids = {DeviceIdentity.open(people.device(i).data_dir).device_id for i in range(3)}
    with ServerLedger.open(settings.server_dir) as ledger:
        assert {d.device_id for d in ledger.devices()} == ids


def test_epsilon_means_average_the_days_of_verified_reports_of_the_round() -> None:
    class Report:
        def __init__(self, rnd: int, verified: bool, blocks: list[dict[str, float]]) -> None:
            self.server_round, self.verified = rnd, verified
            self.payload_json = json.dumps({"unit": "employee-day", "blocks": blocks})

    class Ledger:
        def reports(self, run_id: str) -> list[Report]:
            return [
                Report(2, True, [{"epsilon": 1.0, "epsilon_broken": 4.0}, {"epsilon": 3.0}]),
                Report(2, False, [{"epsilon": 100.0}]),
                Report(1, True, [{"epsilon": 50.0}]),
            ]

    means = epsilon_means(Ledger(), "run", 2)  # type: ignore[arg-type]
    assert means["epsilon_per_day_mean"] == {
        ASSUMPTIONS["epsilon"]: 2.0, ASSUMPTIONS["epsilon_broken"]: 4.0,
    }
    assert means["privacy_unit"] == ["employee-day"]


def test_backend_config_reserves_one_cpu_per_device_and_can_join_a_cluster(
    tmp_path: Path,
) -> None:
    local = backend_config(SimOptions(devices=1, rounds=1, out=tmp_path))
    assert local["client_resources"]["num_cpus"] == 1.0
    assert "address" not in local["init_args"]
    joined = backend_config(SimOptions(devices=1, rounds=1, out=tmp_path,
                                       ray_address="127.0.0.1:6390"))
    assert joined["init_args"]["address"] == "127.0.0.1:6390"


def test_large_employee_day_runs_widen_secagg_neighbourhoods(tmp_path: Path) -> None:
    wide = SimOptions(devices=100, rounds=1, fraction=0.5, out=tmp_path).settings()
    assert (wide.secagg_num_shares, wide.secagg_reconstruction_threshold) == WIDE_SHARES
    assert wide.secagg_reconstruction_threshold >= DevicePolicy().min_summed_devices
    small = SimOptions(devices=5, rounds=1, out=tmp_path).settings()
    asked = SimOptions(devices=100, rounds=1, out=tmp_path,
                       run_config={"secagg-num-shares": 7,
                                   "secagg-reconstruction-threshold": 4}).settings()
    assert (small.secagg_num_shares, asked.secagg_num_shares) == (5, 7)
