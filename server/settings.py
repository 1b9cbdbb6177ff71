"""The run configuration of a keystay federation, validated in one place.

A run configuration arrives as Flower's flat ``key = value`` mapping (the
``[tool.flwr.app.config]`` table of the app, overridden by ``flwr run
--run-config``). :class:`RunSettings` checks every key once, with a message
that names the key and the values it accepts, so a typo fails at submission
instead of in round three.

What a run *asks* of devices (noise, clip, steps, blocks) is only a request:
each device checks it against its own ``DevicePolicy`` and refuses what would
weaken it.

The privacy unit (issue 10). ``privacy-unit = "employee-day"`` (the default)
runs every round through SecAgg+ with the device's own mechanism: each
sampled day's update clipped to ``update-clip`` C, days sampled at
``day-sample-rate`` q, and ``noise-multiplier`` σ is the noise the sum over
at least t devices carries (in units of C; each device adds σC/√t of it).
``secagg`` is then implied, ``central-dp`` is refused (the devices' noise is
the mechanism), and the SecAgg+ threshold must be at least the devices'
``min_summed_devices`` (3 by default, hence 5 shares and threshold 3).
``privacy-unit = "record"`` is DP-SGD per window with plain rounds (σ, C of
DP-SGD, ``sample-rate``, the tuned record-level defaults of
``bench/bench_tuning.py``: pass ``noise-multiplier =`` :data:`RECORD_NOISE_MULTIPLIER`).

The training defaults (σ, q, steps, learning rate, for ``num_server_rounds``
rounds) come from ``bench/bench_tuning.py``: on simulated employees, the
setting with the best held-out accuracy at a target ε per day, σ solved from
that target over all the run's rounds (every round charges every day a device
trains on). :data:`RUN_DEFAULTS` holds them for ``keystay round start`` and
``keystay demo``; ``server/flwr_app/pyproject.toml`` repeats them (a test keeps
the two equal, and checks a default device accepts every round of a default
run within its per-day budget). A run with more rounds must raise σ or lower
q or steps, or devices refuse its last rounds once a day's budget is spent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode

#: The privacy units a run may ask for (the devices' policies name theirs).
PRIVACY_UNITS = ("employee-day", "record")


class SettingsError(KeystayError, ValueError):
    """A run configuration value is missing or outside what keystay accepts."""

    exit_code = ExitCode.SERVER_CONFIG


@dataclass(frozen=True)
class RunSettings:
    """Everything a keystay round needs to know, with the run config's key names."""

    server_dir: Path
    run_name: str
    num_server_rounds: int = 3
    min_devices: int = 3
    # The share of connected devices each round is sent to (Flower's
    # fraction_train; at least min-devices). Below 1 this is sampling without
    # replacement, a fixed count: no privacy amplification is claimed for it.
    fraction_train: float = 1.0
    # Tuned by bench/bench_tuning.py (README, Performance): ε ≈ 8 per day after
    # the 3 default rounds; see the module docstring.
    privacy_unit: str = "employee-day"
    # Employee-day: the sum's σ (issue 10's default). Record level: DP-SGD's σ
    # (the tuned record-level figure is RECORD_NOISE_MULTIPLIER, below).
    noise_multiplier: float = 1.0
    update_clip: float = 0.5
    day_sample_rate: float = 0.5
    max_grad_norm: float = 1.0
    local_steps: int = 60
    sample_rate: float = 0.25
    learning_rate: float = 0.005
    dp: bool = True
    blocks: str = ""
    seed: int = 0
    round_timeout: float = 1800.0
    central_dp: bool = False
    central_noise_multiplier: float = 0.0
    central_clip: float = 1.0
    secagg: bool = False
    secagg_num_shares: int = 5
    secagg_reconstruction_threshold: int = 3
    # The server-owned held-out population (keystay.server.heldout): a few
    # simulated employees that never train, scored after every round.
    heldout_employees: int = 3
    heldout_days: int = 2
    heldout_events_per_day: int = 2000

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Validate a Flower run config.

        Raises
        ------
        SettingsError
            Naming the first bad key, the value given and what is allowed.
        """
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise SettingsError(
                f"unknown run config key(s) {', '.join(unknown)}; "
                f"allowed keys: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for key, field in known.items():
            if key not in config:
                continue
            values[field.name] = config[key]
        for required in ("server-dir", "run-name"):
            if not str(config.get(required, "")):
                raise SettingsError(
                    f"run config key '{required}' is empty; 'keystay round start' sets it — "
                    "start rounds with that command, or pass it with --run-config"
                )
        values["server_dir"] = Path(str(values["server_dir"]))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        _check(self.server_dir.is_absolute(), "server-dir", self.server_dir, "an absolute path")
        _check(_positive_int(self.num_server_rounds), "num-server-rounds",
               self.num_server_rounds, "an integer >= 1")
        _check(_positive_int(self.min_devices), "min-devices", self.min_devices,
               "an integer >= 1")
        _check(_number(self.fraction_train) and 0 < self.fraction_train <= 1,
               "fraction-train", self.fraction_train, "a number > 0 and <= 1")
        _check(_number(self.noise_multiplier) and self.noise_multiplier >= 0,
               "noise-multiplier", self.noise_multiplier, "a number >= 0 (devices enforce a floor)")
        _check(_number(self.max_grad_norm) and self.max_grad_norm > 0,
               "max-grad-norm", self.max_grad_norm, "a number > 0")
        _check(_positive_int(self.local_steps), "local-steps", self.local_steps,
               "an integer >= 1")
        # The run chooses q, not a batch size: a rate B / n would depend on
        # each device's window count n, which its signed report would reveal.
        _check(_number(self.sample_rate) and 0 < self.sample_rate <= 1, "sample-rate",
               self.sample_rate, "a number > 0 and <= 1 (devices enforce a ceiling, "
               "0.25 by default)")
        _check(_number(self.learning_rate) and self.learning_rate > 0,
               "learning-rate", self.learning_rate, "a number > 0")
        _check(isinstance(self.dp, bool), "dp", self.dp, "true or false")
        _check(isinstance(self.central_dp, bool), "central-dp", self.central_dp, "true or false")
        _check(_number(self.central_noise_multiplier) and self.central_noise_multiplier >= 0,
               "central-noise-multiplier", self.central_noise_multiplier, "a number >= 0")
        _check(_number(self.central_clip) and self.central_clip > 0,
               "central-clip", self.central_clip, "a number > 0")
        _check(isinstance(self.secagg, bool), "secagg", self.secagg, "true or false")
        _check(self.privacy_unit in PRIVACY_UNITS, "privacy-unit", self.privacy_unit,
               " or ".join(repr(u) for u in PRIVACY_UNITS))
        _check(_number(self.update_clip) and self.update_clip > 0, "update-clip",
               self.update_clip, "a number > 0 (devices enforce a ceiling, 1.0 by default)")
        _check(_number(self.day_sample_rate) and 0 < self.day_sample_rate <= 1,
               "day-sample-rate", self.day_sample_rate, "a number > 0 and <= 1")
        _check(_positive_int(self.secagg_num_shares) and self.secagg_num_shares >= 2,
               "secagg-num-shares", self.secagg_num_shares, "an integer >= 2")
        _check(_positive_int(self.secagg_reconstruction_threshold)
               and self.secagg_reconstruction_threshold <= self.secagg_num_shares,
               "secagg-reconstruction-threshold", self.secagg_reconstruction_threshold,
               "an integer between 1 and secagg-num-shares")
        for key, value in (("heldout-employees", self.heldout_employees),
                           ("heldout-days", self.heldout_days)):
            _check(_positive_int(value), key, value, "an integer >= 1")
        # More than one model window (32 tokens) per day, or a day gives no window.
        _check(_positive_int(self.heldout_events_per_day) and self.heldout_events_per_day > 32,
               "heldout-events-per-day", self.heldout_events_per_day, "an integer > 32")
        _check(_number(self.round_timeout) and self.round_timeout > 0,
               "round-timeout", self.round_timeout, "seconds, > 0")
        _check(isinstance(self.run_name, str) and bool(self.run_name)
               and "/" not in self.run_name, "run-name", self.run_name,
               "a non-empty name without '/'")
        if self.employee_day:
            if self.central_dp:
                raise SettingsError(
                    "run config 'central-dp' = true is not allowed with privacy-unit "
                    "'employee-day': the devices add the noise themselves before secure "
                    "aggregation; use privacy-unit 'record' for central DP"
                )
            self.check_secagg()
        elif self.secagg:
            raise SettingsError(
                "run config 'secagg' = true is not allowed with privacy-unit 'record': "
                "secure aggregation runs in the device daemons, with the employee-day "
                "mechanism; record-level rounds are plain (DP-SGD on each device)"
            )

    def check_secagg(self) -> None:
        """Refuse SecAgg+ parameters Flower rejects or that weaken the masking.

        Raises
        ------
        SettingsError
            Naming the key, the value and what is allowed.
        """
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if shares < 3:
            raise SettingsError(
                f"run config 'secagg-num-shares' = {shares} is not allowed; expected an "
                "integer >= 3 (Flower's SecAgg+ needs more than 2 shares)"
            )
        if not (2 * threshold > shares and threshold < shares):
            raise SettingsError(
                f"run config 'secagg-reconstruction-threshold' = {threshold} is not allowed "
                f"with secagg-num-shares = {shares}; expected more than half of the shares and "
                f"fewer than all of them (e.g. {shares // 2 + 1}): at half or below, a server "
                "could collect both of a device's secrets, and devices refuse such a round"
            )
        if self.min_devices < 2:
            raise SettingsError(
                f"run config 'min-devices' = {self.min_devices} is not allowed with secagg; "
                "expected >= 2 (the secure sum of one device is that device's update)"
            )

    @property
    def employee_day(self) -> bool:
        """True when rounds go through SecAgg+ with the employee-day mechanism."""
        return self.privacy_unit == "employee-day"

    @property
    def run_dir(self) -> Path:
        return self.server_dir / "runs" / self.run_name

    def train_config(self) -> dict[str, Any]:
        """What every device receives with each training round."""
        return {
            "run-name": self.run_name,
            "noise-multiplier": float(self.noise_multiplier),
            "max-grad-norm": float(self.max_grad_norm),
            "local-steps": int(self.local_steps),
            "sample-rate": float(self.sample_rate),
            "learning-rate": float(self.learning_rate),
            "dp": bool(self.dp),
            "blocks": self.blocks,
            "privacy-unit": self.privacy_unit,
            "update-clip": float(self.update_clip),
            "day-sample-rate": float(self.day_sample_rate),
        }

    def as_run_config(self) -> dict[str, Any]:
        """The Flower run config that reproduces these settings."""
        return {
            _key(k): (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
        }


#: The defaults of every run setting (``keystay round start``'s option defaults
#: read them; ``server/flwr_app/pyproject.toml`` repeats them, checked by a test).
RUN_DEFAULTS = RunSettings(server_dir=Path("/"), run_name="defaults")

#: DP-SGD's σ for a record-level run (``privacy_unit = "record"``) with the
#: other defaults: ``bench/bench_tuning.py``'s best held-out accuracy at ε 8
#: per block after the default rounds. ``noise_multiplier``'s default is the
#: employee-day sum's σ, a different mechanism; a record-level run asks for
#: this one (a test checks a default record-level device accepts the run).
RECORD_NOISE_MULTIPLIER = 2.19


def _key(name: str) -> str:
    return name.replace("_", "-")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise SettingsError(f"run config '{key}' = {value!r} is not allowed; expected {allowed}")
