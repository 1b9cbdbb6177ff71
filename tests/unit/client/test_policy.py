"""DevicePolicy: defaults, file validation messages, request refusals, block selection."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

from keystay.client.policy import (
    DEFAULT_EXCLUDED_APPS,
    REFUSAL_CODES,
    DevicePolicy,
    PolicyError,
    Refusal,
    TrainingRequest,
)


def request(**changes: object) -> TrainingRequest:
    base = TrainingRequest(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        local_steps=100,
        sample_rate=0.05,
        learning_rate=0.01,
        dp=True,
        blocks=(),
        run_id="run-a",
        server_round=1,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and files ---------------------------------------------------------------


def test_defaults_are_safe_and_valid() -> None:
    policy = DevicePolicy()
    assert policy.delta == 1e-5
    assert policy.epsilon_per_block == 8.0
    assert policy.noise_multiplier_min == 0.8
    assert policy.raw_text is False
    assert policy.window_titles is False
    assert policy.accountant == "prv"
    assert {"keepassxc", "1password", "bitwarden"} <= set(policy.excluded_apps)
    assert policy.excluded_apps == DEFAULT_EXCLUDED_APPS


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert DevicePolicy.load(tmp_path / "policy.toml") == DevicePolicy()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert DevicePolicy.load(write(tmp_path, "")) == DevicePolicy()


def test_file_overrides_only_the_keys_it_sets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[policy]\nepsilon_per_block = 4\nexcluded_apps = ["keepassxc", "signal"]\n'
        'accountant = "rdp"\n',
    )
    policy = DevicePolicy.load(path)
    assert policy.epsilon_per_block == 4.0 and isinstance(policy.epsilon_per_block, float)
    assert policy.excluded_apps == ("keepassxc", "signal")
    assert policy.accountant == "rdp"
    assert policy.noise_multiplier_min == DevicePolicy().noise_multiplier_min


def test_to_toml_round_trips(tmp_path: Path) -> None:
    policy = DevicePolicy(
        delta=1e-7,
        epsilon_per_block=2.5,
        max_local_steps=50,
        min_participation_gap_seconds=3600,
        excluded_apps=('we"ird', "app"),
        raw_text=True,
        accountant="rdp",
    )
    path = write(tmp_path, policy.to_toml())
    assert DevicePolicy.load(path) == policy
    policy.save(tmp_path / "saved.toml")
    assert DevicePolicy.load(tmp_path / "saved.toml") == policy


def test_example_message_names_key_value_and_range(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy]\nnoise_multiplier_min = -1\n")
    with pytest.raises(PolicyError) as info:
        DevicePolicy.load(path)
    assert str(info.value) == (
        "policy.toml: noise_multiplier_min = -1 is out of range; "
        "allowed: a number > 0 (typical 0.5–2.0)"
    )


BAD_VALUES = [
    ("delta", "0", "> 0 and <= 0.001"),
    ("delta", "0.5", "> 0 and <= 0.001"),
    ("epsilon_per_block", "0", "> 0 and <= 32"),
    ("epsilon_per_block", "100", "> 0 and <= 32"),
    ("epsilon_per_block", "nan", "> 0 and <= 32"),
    ("epsilon_per_block", '"8"', "a number"),
    ("noise_multiplier_min", "0", "a number > 0"),
    ("noise_multiplier_min", "inf", "a number > 0"),
    ("noise_multiplier_max", "0", "> 0 and <= 1000"),
    ("noise_multiplier_max", "1001.0", "> 0 and <= 1000"),
    ("max_grad_norm_max", "-0.5", "a number > 0"),
    ("sample_rate_max", "0", "> 0 and <= 1"),
    ("sample_rate_max", "1.5", "> 0 and <= 1"),
    ("max_grad_norm_max", "true", "a number > 0"),
    ("max_local_steps", "0", "from 1 to 100000"),
    ("max_local_steps", "12.5", "from 1 to 100000"),
    ("min_participation_gap_seconds", "-1", ">= 0"),
    ("excluded_apps", '"keepassxc"', "a list of application names"),
    ("excluded_apps", '["ok", ""]', "a list of application names"),
    ("excluded_apps", "[1, 2]", "a list of application names"),
    ("raw_text", '"yes"', "true or false"),
    ("window_titles", "1", "true or false"),
    ("retention_days", "0", "from 1 to 3650"),
    ("retention_days", "99999", "from 1 to 3650"),
    ("min_block_windows", "0", ">= 1"),
    ("min_block_age_days", "-1", "from 0 to 3650"),
    ("accountant", '"gdp"', '"prv" or "rdp"'),
    ("accountant", "1", '"prv" or "rdp"'),
    ("privacy_unit", '"user"', '"employee-day" or "record"'),
    ("privacy_unit", "1", '"employee-day" or "record"'),
    ("epsilon_per_day", "0", "> 0 and <= 64"),
    ("epsilon_per_day", "65", "> 0 and <= 64"),
    ("epsilon_per_day_broken_aggregation", "-1", "> 0 and <= 256"),
    ("epsilon_per_day_broken_aggregation", "inf", "> 0 and <= 256"),
    ("min_summed_devices", "0", "from 1 to 1000000"),
    ("min_summed_devices", "2.5", "from 1 to 1000000"),
    ("update_clip_max", "0", "a number > 0"),
    ("day_sample_rate_max", "0", "> 0 and <= 1"),
    ("day_sample_rate_max", "1.01", "> 0 and <= 1"),
    ("record_level_dp", '"no"', "true or false"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_VALUES)
def test_each_bad_value_names_key_value_and_allowed(
    tmp_path: Path, key: str, value: str, allowed: str
) -> None:
    path = write(tmp_path, f"[policy]\n{key} = {value}\n")
    with pytest.raises(PolicyError) as info:
        DevicePolicy.load(path)
    message = str(info.value)
    # The value is shown as it was written in the file.
    assert message.startswith(f"policy.toml: {key} = {value} is ")
    assert "allowed: " in message and allowed in message


def test_every_key_has_a_bad_value_case() -> None:
    assert {k for k, _, _ in BAD_VALUES} == set(DevicePolicy.key_names())


def test_unknown_key_is_named_with_the_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy]\nnoise_multipler_min = 1.0\n")
    with pytest.raises(PolicyError) as info:
        DevicePolicy.load(path)
    message = str(info.value)
    assert "unknown key noise_multipler_min" in message
    assert all(key in message for key in DevicePolicy.key_names())


def test_misspelt_table_is_an_error_not_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "[polcy]\nepsilon_per_block = 100\n")
    with pytest.raises(PolicyError, match="unknown top-level entry polcy"):
        DevicePolicy.load(path)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[policy]\nepsilon_per_block = \n")
    with pytest.raises(PolicyError, match=r"policy.toml: not valid TOML"):
        DevicePolicy.load(path)


def test_policy_built_in_code_is_validated_too() -> None:
    with pytest.raises(PolicyError, match="DevicePolicy: max_local_steps = 0 is out of range"):
        DevicePolicy(max_local_steps=0)
    with pytest.raises(PolicyError, match="raw_text = 1 is not a boolean"):
        DevicePolicy(raw_text=1)  # type: ignore[arg-type]


def test_explain_states_the_values_in_words() -> None:
    text = DevicePolicy(epsilon_per_block=3.0, noise_multiplier_min=1.1, retention_days=9,
                        privacy_unit="record").explain()
    assert "ε = 3 per token window" in text
    assert "σ >= 1.1" in text
    assert "9 days" in text
    assert "keepassxc" in text
    assert "not stored" in text
    assert "refused, never adjusted" in text


def test_explain_states_both_employee_day_budgets_and_assumptions() -> None:
    text = DevicePolicy(epsilon_per_day=6.0, epsilon_per_day_broken_aggregation=24.0,
                        min_summed_devices=5, day_sample_rate_max=0.5).explain()
    flat = " ".join(text.split())
    assert "one employee-day" in flat
    assert "ε = 6 per day against an honest-but-curious server" in flat
    assert "ε = 24 per day against a server that breaks secure aggregation" in flat
    assert "at least 5" in flat and "√5" in flat
    assert "q <= 0.5" in flat
    assert "token window" not in flat  # DP-SGD per window is off by default
    inside = " ".join(DevicePolicy(record_level_dp=True).explain().split())
    assert "DP-SGD per token window" in inside


def test_default_policy_protects_the_employee_day() -> None:
    policy = DevicePolicy()
    assert policy.privacy_unit == "employee-day"
    assert (policy.epsilon_per_day, policy.epsilon_per_day_broken_aggregation) == (10.0, 40.0)
    assert policy.min_summed_devices == 3 and policy.record_level_dp is False
    assert (policy.update_clip_max, policy.day_sample_rate_max) == (1.0, 1.0)


def test_policy_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, keystay.client.policy; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- request checks --------------------------------------------------------------------


RECORD = DevicePolicy(privacy_unit="record")


def day_request(**changes: object) -> TrainingRequest:
    base = request(privacy_unit="employee-day", update_clip=0.5, day_sample_rate=0.5,
                   sample_rate=0.0, max_grad_norm=0.0, local_steps=20)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_valid_request_passes_including_the_boundaries() -> None:
    policy = RECORD
    policy.check_request(request())
    policy.check_request(
        request(noise_multiplier=0.8, max_grad_norm=1.0, local_steps=200, sample_rate=0.25)
    )
    policy.check_request(request(noise_multiplier=10.0, server_round=2**31 - 1,
                                 run_id="a" * 128, blocks=("2025-01-01",)))


@pytest.mark.parametrize(
    ("changes", "code", "words"),
    [
        ({"dp": False}, "no-dp", "without differential privacy"),
        (
            {"noise_multiplier": 0.3},
            "noise-below-floor",
            "refused: run asks noise_multiplier 0.3 but this device's floor is 0.8 "
            "(policy.toml noise_multiplier_min)",
        ),
        ({"noise_multiplier": math.nan}, "bad-request", "noise_multiplier must be a finite number"),
        ({"noise_multiplier": 1e6}, "noise-above-max", "ceiling is 10"),
        ({"noise_multiplier": 10.01}, "noise-above-max", "policy.toml noise_multiplier_max"),
        ({"sample_rate": 0.3}, "sample-rate-above-max", "policy.toml sample_rate_max"),
        ({"sample_rate": 0.0}, "bad-request", "sample_rate must be"),
        ({"sample_rate": math.nan}, "bad-request", "sample_rate must be"),
        ({"learning_rate": 0.0}, "bad-request", "learning_rate"),
        ({"learning_rate": -1.0}, "bad-request", "learning_rate"),
        ({"learning_rate": math.inf}, "bad-request", "learning_rate"),
        ({"server_round": 0}, "bad-request", "server_round"),
        ({"server_round": 2**63}, "bad-request", "server_round"),
        ({"run_id": ""}, "bad-request", "run_id"),
        ({"run_id": "x" * 129}, "bad-request", "run_id"),
        ({"run_id": "a b"}, "bad-request", "run_id"),
        ({"run_id": "é"}, "bad-request", "run_id"),
        ({"blocks": ("yesterday",)}, "bad-request", "YYYY-MM-DD"),
        ({"blocks": ("2025-02-30",)}, "bad-request", "YYYY-MM-DD"),
        ({"blocks": ("2025-01-01",) * 401}, "bad-request", "at most 400 blocks"),
        ({"max_grad_norm": 5.0}, "clip-above-max", "max_grad_norm 5 but"),
        ({"max_grad_norm": 0.0}, "clip-above-max", "> 0 and <= 1"),
        ({"max_grad_norm": math.inf}, "bad-request", "max_grad_norm must be a finite number"),
        ({"local_steps": 201}, "too-many-steps", "201 local steps but this device allows at most"),
        ({"local_steps": 0}, "bad-request", "at least 1"),
        ({"learning_rate": math.nan}, "bad-request", "learning_rate"),
    ],
)
def test_each_request_rule_refuses_with_its_code(
    changes: dict[str, object], code: str, words: str
) -> None:
    with pytest.raises(Refusal) as info:
        RECORD.check_request(request(**changes))
    assert info.value.code == code
    assert words in info.value.reason
    assert str(info.value) == info.value.reason


def test_no_dp_is_refused_first_even_with_other_faults() -> None:
    with pytest.raises(Refusal) as info:
        RECORD.check_request(request(dp=False, noise_multiplier=0.1, local_steps=10_000))
    assert info.value.code == "no-dp"


def test_valid_employee_day_request_passes_including_the_boundaries() -> None:
    policy = DevicePolicy()
    policy.check_request(day_request())
    policy.check_request(day_request(noise_multiplier=0.8, update_clip=1.0, day_sample_rate=1.0,
                                     local_steps=200))


@pytest.mark.parametrize(
    ("changes", "code", "words"),
    [
        ({"noise_multiplier": 0.5}, "noise-below-floor", "floor is 0.8"),
        ({"noise_multiplier": 11.0}, "noise-above-max", "ceiling is 10"),
        ({"update_clip": 1.5}, "clip-above-max",
         "update_clip 1.5 but this device allows a per-day update clip > 0 and <= 1 "
         "(policy.toml update_clip_max)"),
        ({"update_clip": 0.0}, "clip-above-max", "policy.toml update_clip_max"),
        ({"update_clip": math.nan}, "bad-request", "update_clip must be a finite number"),
        ({"day_sample_rate": 0.0}, "bad-request", "day_sample_rate must be"),
        ({"day_sample_rate": 1.5}, "bad-request", "day_sample_rate must be"),
        ({"sample_rate": -0.1}, "bad-request", "sample_rate must be a number >= 0"),
        ({"privacy_unit": "record", "sample_rate": 0.05, "max_grad_norm": 1.0}, "unit-mismatch",
         "protects the privacy unit 'record' but this device protects 'employee-day' "
         "(policy.toml privacy_unit)"),
        ({"privacy_unit": "user"}, "bad-request", "privacy_unit must be one of"),
        ({"local_steps": 201}, "too-many-steps", "policy.toml max_local_steps"),
        ({"dp": False}, "no-dp", "without differential privacy"),
    ],
)
def test_each_employee_day_rule_refuses_with_its_code(
    changes: dict[str, object], code: str, words: str
) -> None:
    with pytest.raises(Refusal) as info:
        DevicePolicy().check_request(day_request(**changes))
    assert info.value.code == code
    assert words in info.value.reason


def test_a_lower_day_sample_rate_ceiling_refuses_a_larger_q() -> None:
    with pytest.raises(Refusal) as info:
        DevicePolicy(day_sample_rate_max=0.25).check_request(day_request(day_sample_rate=0.3))
    assert info.value.code == "sample-rate-above-max"
    assert "day_sample_rate 0.3" in info.value.reason
    assert "policy.toml day_sample_rate_max" in info.value.reason


def test_record_requests_are_refused_by_an_employee_day_device_and_vice_versa() -> None:
    with pytest.raises(Refusal) as info:
        DevicePolicy().check_request(request())
    assert info.value.code == "unit-mismatch"
    assert info.value.grpc_status == "PERMISSION_DENIED"
    with pytest.raises(Refusal) as info:
        RECORD.check_request(day_request())
    assert info.value.code == "unit-mismatch"


def test_record_level_dp_inside_days_checks_the_record_rules_too() -> None:
    inside = DevicePolicy(record_level_dp=True)
    with pytest.raises(Refusal) as info:
        inside.check_request(day_request(max_grad_norm=1.0))  # no record-level rate asked
    assert info.value.code == "sample-rate-above-max"
    with pytest.raises(Refusal) as info:
        inside.check_request(day_request(sample_rate=0.1, max_grad_norm=3.0))
    assert info.value.code == "clip-above-max"
    inside.check_request(day_request(sample_rate=0.1, max_grad_norm=1.0))


def test_refusal_codes_are_closed_and_map_to_grpc_status() -> None:
    with pytest.raises(ValueError, match="unknown refusal code"):
        Refusal("nope", "x")  # type: ignore[arg-type]
    assert Refusal("noise-below-floor", "x").grpc_status == "PERMISSION_DENIED"
    assert Refusal("budget-exceeded", "x").grpc_status == "FAILED_PRECONDITION"
    assert Refusal("bad-request", "x").grpc_status == "INVALID_ARGUMENT"
    assert Refusal("noise-above-max", "x").grpc_status == "PERMISSION_DENIED"


def test_public_reason_names_only_the_code_except_for_malformed_requests() -> None:
    # A state refusal's sentence names window counts and days held; the
    # federation is told the code only.
    thin = Refusal("block-excluded", "refused: block(s) 2025-01-02 (10) hold fewer ...")
    assert thin.public_reason == "refused by device policy: block-excluded"
    assert "10" not in thin.public_reason
    bad = Refusal("bad-request", "invalid request: server_round must be ...")
    assert bad.public_reason == bad.reason


def test_sigma_ceiling_below_the_floor_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="noise_multiplier_max"):
        DevicePolicy(noise_multiplier_min=2.0, noise_multiplier_max=1.5)
    assert {"no-dp", "too-soon", "block-excluded", "no-data"} <= set(REFUSAL_CODES)


# --- block selection ---------------------------------------------------------------------


WINDOWS = {"2025-01-01": 500, "2025-01-02": 10, "2025-01-03": 300, "2025-01-04": 64}


def test_select_blocks_default_takes_every_eligible_block() -> None:
    chosen = DevicePolicy().select_blocks((), WINDOWS, retired={"2025-01-03"})
    assert chosen == ("2025-01-01", "2025-01-04")


@pytest.mark.parametrize(
    ("requested", "retired", "code", "blocks"),
    [
        (("2025-02-01",), set(), "block-unknown", ("2025-02-01",)),
        (("2025-01-01", "2025-01-03"), {"2025-01-03"}, "block-retired", ("2025-01-03",)),
        (("2025-01-02",), set(), "block-excluded", ("2025-01-02",)),
        ((), set(WINDOWS) - {"2025-01-02"}, "no-data", ()),
    ],
)
def test_select_blocks_refusals(
    requested: tuple[str, ...], retired: set[str], code: str, blocks: tuple[str, ...]
) -> None:
    with pytest.raises(Refusal) as info:
        DevicePolicy().select_blocks(requested, WINDOWS, retired)
    assert info.value.code == code
    assert info.value.blocks == blocks
    for block in blocks:
        assert block in info.value.reason


def test_select_blocks_requested_and_eligible() -> None:
    chosen = DevicePolicy().select_blocks(["2025-01-03", "2025-01-01", "2025-01-03"], WINDOWS, ())
    assert chosen == ("2025-01-01", "2025-01-03")


def test_select_blocks_leaves_out_days_still_being_recorded() -> None:
    from datetime import date

    today = date(2025, 1, 3)
    chosen = DevicePolicy().select_blocks((), WINDOWS, (), today=today)
    assert "2025-01-03" not in chosen and chosen
    with pytest.raises(Refusal) as refused:
        DevicePolicy().select_blocks(["2025-01-03"], WINDOWS, (), today=today)
    assert refused.value.code == "block-excluded" and "min_block_age_days" in refused.value.reason
    same_day = DevicePolicy(min_block_age_days=0).select_blocks((), WINDOWS, (), today=today)
    assert "2025-01-03" in same_day
