"""The shipped run defaults: one set of numbers everywhere, and one a default device accepts.

The defaults were chosen by ``bench/bench_tuning.py``; these tests keep every
place that states them in agreement and check that a default run passes every
privacy check of a default device for all of its rounds: the σ bounds, the
rate and step ceilings, and the per-day budget its charges compose to.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import click
import pytest

from keystay.client.employee_day.mechanism import (
    DayRoundSpec,
    Encoding,
    check_scale,
    mechanisms,
)
from keystay.client.ledger.accounting import (
    EMPTY_STATE,
    Mechanism,
    compose_state,
    enforced,
    state_epsilons,
)
from keystay.client.policy import DevicePolicy, Refusal, TrainingRequest
from keystay.common.model import ModelConfig, initial_weights
from keystay.server.cli import round_start
from keystay.server.demo import demo
from keystay.server.secagg import CLIPPING_RANGE, QUANTIZATION_RANGE
from keystay.server.settings import RECORD_NOISE_MULTIPLIER, RUN_DEFAULTS, RunSettings

APP_TOML = Path(__file__).parents[3] / "server" / "flwr_app" / "pyproject.toml"


def _request(settings: RunSettings, server_round: int = 1) -> TrainingRequest:
    return TrainingRequest(
        noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
        local_steps=settings.local_steps, sample_rate=settings.sample_rate,
        learning_rate=settings.learning_rate, dp=settings.dp, blocks=(),
        run_id="defaults", server_round=server_round, privacy_unit=settings.privacy_unit,
        update_clip=settings.update_clip, day_sample_rate=settings.day_sample_rate,
    )


def _option_defaults(command: click.Command) -> dict[str, object]:
    return {p.name: p.default for p in command.params if p.name}


def test_flower_app_config_repeats_the_run_defaults() -> None:
    config = tomllib.loads(APP_TOML.read_text())["tool"]["flwr"]["app"]["config"]
    expected = RUN_DEFAULTS.as_run_config()
    for key in ("server-dir", "run-name"):  # set per run by `keystay round start`
        expected.pop(key)
        config.pop(key)
    assert config == expected


def test_round_start_options_default_to_the_run_defaults() -> None:
    options = _option_defaults(round_start)
    assert options["rounds"] == RUN_DEFAULTS.num_server_rounds
    for name in ("noise_multiplier", "max_grad_norm", "local_steps", "sample_rate",
                 "learning_rate"):
        assert options[name] == getattr(RUN_DEFAULTS, name), name


def test_demo_runs_the_default_rounds_and_steps() -> None:
    options = _option_defaults(demo)
    assert options["rounds"] == RUN_DEFAULTS.num_server_rounds
    assert options["local_steps"] == RUN_DEFAULTS.local_steps


def test_a_default_device_accepts_every_round_of_a_default_run() -> None:
    policy = DevicePolicy()
    rounds = RUN_DEFAULTS.num_server_rounds
    for server_round in range(1, rounds + 1):
        policy.check_request(_request(RUN_DEFAULTS, server_round))
    # Every round charges every eligible day both mechanisms of the
    # employee-day round (at the server's SecAgg+ encoding): the day's ε after
    # the run is the composition of all rounds, and it must fit both budgets.
    # Composed charge by charge, as the device ledger prices them.
    assert RUN_DEFAULTS.privacy_unit == policy.privacy_unit == "employee-day"
    assert RUN_DEFAULTS.secagg_reconstruction_threshold >= policy.min_summed_devices
    spec = DayRoundSpec(RUN_DEFAULTS.noise_multiplier, RUN_DEFAULTS.update_clip,
                        RUN_DEFAULTS.day_sample_rate, policy.min_summed_devices)
    encoding = Encoding(CLIPPING_RANGE, QUANTIZATION_RANGE)
    dim = sum(w.size for w in initial_weights(ModelConfig(), 0))
    assert check_scale(spec, encoding, dim, RUN_DEFAULTS.min_devices) is None
    for per_round, budget in zip(mechanisms(spec, encoding, dim),
                                 (policy.epsilon_per_day,
                                  policy.epsilon_per_day_broken_aggregation), strict=True):
        state = EMPTY_STATE
        for _ in range(rounds):
            state = compose_state(state, per_round)
            spent = enforced(state_epsilons(state, delta=policy.delta))
            assert spent <= budget
    # The defaults use the honest-server budget rather than a sliver of it:
    # one more round would bring a day past half of it.
    honest = mechanisms(spec, encoding, dim)[0]
    state = EMPTY_STATE
    for _ in range(rounds + 1):
        state = compose_state(state, honest)
    assert enforced(state_epsilons(state, delta=policy.delta)) > policy.epsilon_per_day / 2


def test_the_check_above_can_fail() -> None:
    # A σ under the floor is refused: the test above is not vacuous.
    below = replace(RUN_DEFAULTS, noise_multiplier=DevicePolicy().noise_multiplier_min / 2)
    with pytest.raises(Refusal):
        DevicePolicy().check_request(_request(below))


def test_a_default_record_level_device_accepts_a_default_record_level_run() -> None:
    """RECORD_NOISE_MULTIPLIER with the other defaults fits a record-level policy's blocks."""
    settings = replace(RUN_DEFAULTS, privacy_unit="record",
                       noise_multiplier=RECORD_NOISE_MULTIPLIER)
    policy = DevicePolicy(privacy_unit="record")
    state = EMPTY_STATE
    for server_round in range(1, settings.num_server_rounds + 1):
        policy.check_request(_request(settings, server_round))
        # Every round charges each block it trains on its DP-SGD steps.
        state = compose_state(state, Mechanism(settings.noise_multiplier, settings.sample_rate,
                                               settings.local_steps))
    spent = enforced(state_epsilons(state, delta=policy.delta))
    # Within the block budget, and not a sliver of it: σ was solved for it.
    assert policy.epsilon_per_block / 2 < spent <= policy.epsilon_per_block
    # The employee-day sum's σ (noise_multiplier's default) in its place
    # would overspend the block: the two σ are not interchangeable.
    wrong = Mechanism(RUN_DEFAULTS.noise_multiplier, settings.sample_rate,
                      settings.local_steps * settings.num_server_rounds)
    assert enforced(state_epsilons(compose_state(EMPTY_STATE, wrong), delta=policy.delta)) \
        > policy.epsilon_per_block
