"""The device policy: the privacy rules this machine enforces, whoever asks.

The policy is local configuration (``policy.toml`` in the device's data
folder). The server cannot change it: a training request that would weaken it
is *refused*, never adjusted, and the refusal carries a sentence meant for a
person (the employee reading ``keystay device status``, the ML engineer whose
round failed, the security reviewer reading a log).

Defaults are embedded in code, so a device with no ``policy.toml`` is
protected by the safe values below, and every key an employee or an
administrator may set is validated with a message that names the key, the
value given and the values allowed.

This module never imports torch (the always-on daemon stays light).

The file format::

    [policy]
    delta = 1e-05
    epsilon_per_block = 8.0
    noise_multiplier_min = 0.8
    noise_multiplier_max = 10.0
    max_grad_norm_max = 1.0
    sample_rate_max = 0.25
    max_local_steps = 200
    min_participation_gap_seconds = 0.0
    excluded_apps = ["keepassxc", "1password", "bitwarden"]
    raw_text = false
    window_titles = false
    retention_days = 30
    min_block_windows = 64
    min_block_age_days = 1
    accountant = "prv"
    privacy_unit = "employee-day"
    epsilon_per_day = 10.0
    epsilon_per_day_broken_aggregation = 40.0
    min_summed_devices = 3
    update_clip_max = 1.0
    day_sample_rate_max = 1.0
    record_level_dp = false
"""

from __future__ import annotations

import json
import math
import textwrap
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import tomli_w

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.windows import PRIVACY_UNIT_SENTENCE, WINDOW

POLICY_FILE = "policy.toml"
"""The policy's file name inside the device data folder."""

Accountant = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)

PrivacyUnit = Literal["employee-day", "record"]
PRIVACY_UNITS: tuple[str, ...] = get_args(PrivacyUnit)
#: The two trust assumptions an employee-day ε is stated under, as reports,
#: status and the budget report name them.
ASSUMPTION_HONEST = "honest-but-curious server"
ASSUMPTION_BROKEN = "server that breaks secure aggregation"

RefusalCode = Literal[
    "no-dp",
    "noise-below-floor",
    "noise-above-max",
    "sample-rate-above-max",
    "clip-above-max",
    "too-many-steps",
    "bad-request",
    "too-soon",
    "block-retired",
    "block-unknown",
    "block-excluded",
    "budget-exceeded",
    "no-data",
    "unit-mismatch",
    # SecAgg+ in the daemon (keystay.client.daemon.secagg_stages):
    "secure-aggregation-only",  # Train asked of an employee-day device
    "secagg-below-threshold",   # fewer than min_summed_devices could be unmasked together
    "secagg-protocol",          # a stage out of order or inconsistent
]
REFUSAL_CODES: tuple[str, ...] = get_args(RefusalCode)

# Codes for requests that ask the device to weaken its policy: the caller may
# not do that (PERMISSION_DENIED). "bad-request" is a malformed request
# (INVALID_ARGUMENT). The others depend on the device's state (budget spent,
# too soon, no data yet) and may succeed later (FAILED_PRECONDITION).
_POLICY_CODES = frozenset(
    {
        "no-dp",
        "noise-below-floor",
        "noise-above-max",
        "sample-rate-above-max",
        "clip-above-max",
        "too-many-steps",
        "block-excluded",
        "unit-mismatch",
        "secure-aggregation-only",
        "secagg-below-threshold",
    }
)

#: Longest run id the device accepts, and its characters: a run id is stored
#: in the ledger and signed into every report, so it is a short name, not a
#: channel for arbitrary bytes.
RUN_ID_MAX = 128
_RUN_ID_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-"
)
#: Largest server round accepted: rounds count from 1; the ledger stores them
#: as SQLite integers (signed 64-bit), and no run needs more than 2**31 - 1.
SERVER_ROUND_MAX = 2**31 - 1
#: Most blocks one request may name (a year of days and then some).
MAX_REQUESTED_BLOCKS = 400
#: Largest learning rate accepted. Not a privacy parameter (the optimizer only
#: post-processes noised gradients); the ceiling refuses nonsense early.
LEARNING_RATE_MAX = 100.0

# Password managers and keyrings: nothing typed or clicked in them is ever
# tokenized. Names are matched by the tokenizer against the focused
# application's name (lower-cased).
DEFAULT_EXCLUDED_APPS: tuple[str, ...] = (
    "keepassxc",
    "keepass",
    "1password",
    "bitwarden",
    "lastpass",
    "dashlane",
    "enpass",
    "seahorse",
    "kwalletmanager",
    "pinentry",
)


class PolicyError(KeystayError, ValueError):
    """The policy file (or a value given in code) is not a valid policy.

    The message names the file and key, the value given and what is allowed,
    e.g. ``policy.toml: noise_multiplier_min = -1 is out of range; allowed:
    a number > 0 (typical 0.5–2.0)``.
    """

    exit_code = ExitCode.DEVICE_POLICY


# The name is the interface's (a refusal is a decision, not an error).
class Refusal(Exception):  # noqa: N818
    """The device refuses a training request; nothing was trained or charged.

    Parameters
    ----------
    code : RefusalCode
        A short machine-readable kind (see :data:`REFUSAL_CODES`).
    reason : str
        A sentence for a person: what was asked, what this device allows,
        and which policy key says so.
    blocks : tuple of str, optional
        The blocks the refusal is about (e.g. the block whose budget would be
        exceeded), so the daemon can leave them out and try again.
    """

    def __init__(self, code: RefusalCode, reason: str, blocks: tuple[str, ...] = ()) -> None:
        if code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {code!r}; allowed: {', '.join(REFUSAL_CODES)}")
        super().__init__(reason)
        self.code: RefusalCode = code
        self.reason = reason
        self.blocks = tuple(blocks)

    @property
    def public_reason(self) -> str:
        """What the federation is told: the code only, never the full reason.

        The full :attr:`reason` can name window counts, which blocks exist,
        their ages or budgets: facts about the employee's data that no DP
        mechanism paid for. It stays in the device log and the refusal log the
        employee's controls read (:mod:`keystay.client.daemon.refusals`). A
        ``bad-request`` reason restates only what the request itself got wrong,
        so it travels in full.
        """
        if self.code == "bad-request":
            return self.reason
        return f"refused by device policy: {self.code}"

    @property
    def grpc_status(self) -> str:
        """``"PERMISSION_DENIED"`` when the request would weaken the policy,
        ``"FAILED_PRECONDITION"`` when the device's state refuses it (it may
        succeed later). The name of a ``grpc.StatusCode`` member; this module
        does not import grpc."""
        if self.code == "bad-request":
            return "INVALID_ARGUMENT"
        return "PERMISSION_DENIED" if self.code in _POLICY_CODES else "FAILED_PRECONDITION"

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True)
class TrainingRequest:
    """What a run asks this device to do in one round (from ``TrainSpec``).

    The daemon converts the protobuf ``TrainRequest`` into this, so the policy
    and the ledger never see protobuf types.

    Attributes
    ----------
    noise_multiplier : float
        σ of DP-SGD: Gaussian noise std divided by the clip norm.
    max_grad_norm : float
        Per-sample clip norm C.
    local_steps : int
        Optimizer steps this round (T).
    sample_rate : float
        Poisson sampling rate q, chosen by the run and bounded by the policy.
        The expected batch is q·n for n training windows; q never depends on
        n, so the signed report (which names q) says nothing about the data.
    learning_rate : float
        Optimizer learning rate (not a privacy parameter).
    dp : bool
        False asks to train without DP; always refused.
    blocks : tuple of str
        Blocks (employee-days, ``YYYY-MM-DD``) to train on; empty lets the
        daemon choose every eligible block.
    run_id : str
        The run asking.
    server_round : int
        The run's round number.
    privacy_unit : {"record", "employee-day"}
        The unit the run's mechanism protects; must equal the policy's
        ``privacy_unit``. Default ``"record"`` (DP-SGD per window, the fields
        above), so callers written before the employee-day unit keep working.
    update_clip : float
        Employee-day unit: the L2 norm C each day's clipped update is held to
        (bounded by ``update_clip_max``). 0 for the record unit.
    day_sample_rate : float
        Employee-day unit: the probability q with which each eligible day
        joins a round (bounded by ``day_sample_rate_max``). 0 for the record
        unit.

    Notes
    -----
    ``TrainSpec.seed`` has no place here on purpose: the device draws its
    sampling and noise from fresh OS entropy, and a seed chosen by the server
    would let it predict (and subtract) the noise.
    """

    noise_multiplier: float
    max_grad_norm: float
    local_steps: int
    sample_rate: float
    learning_rate: float
    dp: bool
    blocks: tuple[str, ...]
    run_id: str
    server_round: int
    privacy_unit: str = "record"
    update_clip: float = 0.0
    day_sample_rate: float = 0.0


# --- validation ---------------------------------------------------------------


def _toml_value(value: object) -> str:
    """Show a value as it would be written in TOML (what the person typed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _is_number(value: object) -> bool:
    # bool is an int subclass; `raw_text = true` must not pass as a number.
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one policy key is checked: a test and the sentence saying what is allowed."""

    allowed: str
    check: Callable[[Any], bool]
    convert: Callable[[Any], Any]
    typ: str  # "number", "integer", "boolean", "string", "list of strings"


def _finite(value: float) -> bool:
    """Finite as a float: TOML integers are unbounded, and one past float range
    (``delta = 1`` followed by 400 zeros) must be out of range, not an OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(test: Callable[[float], bool], allowed: str) -> _Rule:
    return _Rule(
        allowed=allowed,
        check=lambda v: _finite(v) and test(float(v)),
        convert=float,
        typ="number",
    )


def _integer(test: Callable[[int], bool], allowed: str) -> _Rule:
    return _Rule(allowed=allowed, check=test, convert=int, typ="integer")


def _boolean(allowed: str) -> _Rule:
    return _Rule(allowed=allowed, check=lambda v: True, convert=bool, typ="boolean")


def _string_list(v: Any) -> bool:
    return all(isinstance(x, str) and x.strip() for x in v)


_RULES: dict[str, _Rule] = {
    "delta": _number(
        lambda v: 0.0 < v <= 1e-3,
        "a number > 0 and <= 0.001 (typical 1e-5 to 1e-7; keep it below 1 / windows per block)",
    ),
    "epsilon_per_block": _number(
        lambda v: 0.0 < v <= 32.0, "a number > 0 and <= 32 (typical 1–10)"
    ),
    "noise_multiplier_min": _number(lambda v: v > 0.0, "a number > 0 (typical 0.5–2.0)"),
    "noise_multiplier_max": _number(
        lambda v: 0.0 < v <= 1000.0, "a number > 0 and <= 1000 (typical 5–20)"
    ),
    "max_grad_norm_max": _number(lambda v: v > 0.0, "a number > 0 (typical 0.1–10)"),
    "sample_rate_max": _number(
        lambda v: 0.0 < v <= 1.0, "a number > 0 and <= 1 (typical 0.01–0.25)"
    ),
    "max_local_steps": _integer(
        lambda v: 1 <= v <= 100_000, "a whole number from 1 to 100000 (typical 50–1000)"
    ),
    "min_participation_gap_seconds": _number(
        lambda v: v >= 0.0, "a number of seconds >= 0 (0: no minimum gap)"
    ),
    "excluded_apps": _Rule(
        allowed='a list of application names, e.g. ["keepassxc", "1password"]',
        check=_string_list,
        convert=lambda v: tuple(x.strip() for x in v),
        typ="list of strings",
    ),
    "raw_text": _boolean("true or false"),
    "window_titles": _boolean("true or false"),
    "retention_days": _integer(
        lambda v: 1 <= v <= 3650, "a whole number of days from 1 to 3650 (typical 7–90)"
    ),
    "min_block_windows": _integer(
        lambda v: 1 <= v <= 10_000_000, "a whole number >= 1 (typical 32–1000)"
    ),
    "min_block_age_days": _integer(
        lambda v: 0 <= v <= 3650, "a whole number of days from 0 to 3650 (typical 1)"
    ),
    "accountant": _Rule(
        allowed=" or ".join(json.dumps(a) for a in ACCOUNTANTS),
        check=lambda v: v in ACCOUNTANTS,
        convert=str,
        typ="string",
    ),
    "privacy_unit": _Rule(
        allowed=" or ".join(json.dumps(u) for u in PRIVACY_UNITS),
        check=lambda v: v in PRIVACY_UNITS,
        convert=str,
        typ="string",
    ),
    "epsilon_per_day": _number(
        lambda v: 0.0 < v <= 64.0, "a number > 0 and <= 64 (typical 1–10)"
    ),
    "epsilon_per_day_broken_aggregation": _number(
        lambda v: 0.0 < v <= 256.0, "a number > 0 and <= 256 (typical 10–50)"
    ),
    "min_summed_devices": _integer(
        lambda v: 1 <= v <= 1_000_000,
        "a whole number from 1 to 1000000 (typical 3–100; 1 trusts no aggregation)",
    ),
    "update_clip_max": _number(lambda v: v > 0.0, "a number > 0 (typical 0.1–10)"),
    "day_sample_rate_max": _number(
        lambda v: 0.0 < v <= 1.0, "a number > 0 and <= 1 (typical 0.1–1)"
    ),
    "record_level_dp": _boolean("true or false"),
}


def _type_ok(rule: _Rule, value: object) -> bool:
    if rule.typ == "number":
        return _is_number(value)
    if rule.typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if rule.typ == "boolean":
        return isinstance(value, bool)
    if rule.typ == "string":
        return isinstance(value, str)
    return isinstance(value, list | tuple)


def _validated(key: str, value: object, source: str) -> Any:
    """Check one key's value and return it in its stored type.

    Raises
    ------
    PolicyError
        Naming ``source``, the key, the value given and what is allowed.
    """
    rule = _RULES[key]
    shown = _toml_value(value)
    if not _type_ok(rule, value):
        raise PolicyError(f"{source}: {key} = {shown} is not a {rule.typ}; allowed: {rule.allowed}")
    if not rule.check(value):
        raise PolicyError(f"{source}: {key} = {shown} is out of range; allowed: {rule.allowed}")
    return rule.convert(value)


# --- the policy -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """The privacy rules this device enforces.

    Every request is checked against these values; a request that would
    weaken them is refused with a :class:`Refusal`, never adjusted.

    Attributes
    ----------
    delta : float
        δ of every (ε, δ) statement the device makes. Default 1e-5: well
        below 1/N for the number N of token windows in an employee-day block
        (hundreds to a few thousand), the usual requirement for δ.
    epsilon_per_block : float
        Privacy budget ε of one block (an employee-day), composed over every
        round and every run that ever trains on it. Default 8.0: the common
        operating point of DP-SGD on deep models (Abadi et al. 2016 report
        ε = 2 and 8; De et al. 2022 report at ε = 8), where accuracy comes
        close to non-private training. Each day has its own budget and a
        spent day retires, so this bounds the loss for any record (token
        window) of that day for good. Lower it for stronger protection at
        the cost of accuracy.
    noise_multiplier_min : float
        Floor on σ (noise std / clip norm). Default 0.8: below it each step
        costs so much ε that a block's budget buys only a handful of steps.
    noise_multiplier_max : float
        Ceiling on σ. Default 10. Without it a run could ask for a huge σ
        with q = 1 and one step: a round that costs almost no ε yet reads
        every window, repeated as often as the server likes. Whatever such a
        round returns is DP-noised and charged, but a round whose noise
        drowns the signal buys nothing for the model and is a cheap probe of
        the device's behaviour (timing, refusals, failures). At σ = 10 the
        noise on a step is ten clip norms; useful DP-SGD runs at 0.5–5.
    max_grad_norm_max : float
        Ceiling on the per-sample clip norm C. ε does not depend on C (the
        noise scales with it); the ceiling bounds how far one record can move
        the model in a step and keeps updates comparable across devices (the
        server's central DP clips them again). Default 1.0.
    sample_rate_max : float
        Ceiling on the Poisson sampling rate q the run asks for. Default
        0.25: privacy amplification by sampling needs q well below 1 (at
        q = 1 every window is in every batch and a round costs as much as
        full-batch training); the run chooses q, never the device's data.
    max_local_steps : int
        Most optimizer steps in one round. Default 200.
    min_participation_gap_seconds : float
        Least time between two charged rounds on this device (wall clock,
        survives restarts). Default 0: no gap; the ε budget already bounds
        the total.
    excluded_apps : tuple of str
        Applications whose input is never tokenized (password managers by
        default).
    raw_text : bool
        Store typed characters (default False: only key kinds are stored).
    window_titles : bool
        Store window titles (default False: only application names).
    retention_days : int
        Blocks older than this many days are deleted. Default 30.
    min_block_windows : int
        A block needs at least this many training windows (non-overlapping
        runs of ``WINDOW + 1`` events, see :mod:`keystay.common.windows`) to
        be trained on. Default 64 (about 2,100 events, an hour or two of
        work): with fewer, the expected batch q·n is a handful of windows, so
        the noise drowns each step, and there is too little to learn from.
    min_block_age_days : int
        A day is trained on only once it is this many days old. Default 1:
        today's block is still being written, and charging a block whose
        contents are not final would spend its budget on a moving target.
        0 allows training on today (tests and demos).
    accountant : {"prv", "rdp"}
        Which ε bound is enforced against the budget. Default ``"prv"`` (the
        name is kept for existing policy files): the tight numerical bound,
        now a certified privacy loss distribution (PLD) bound kept per block
        (:mod:`keystay.client.ledger.pld`; it replaced the PRV accountant of
        Gopi et al. 2021), or the RDP bound wherever that is lower, i.e.
        ``min(rdp, pld)``; both are valid upper bounds, so their minimum is
        one too, and it is the tightest the device can certify. ``"rdp"``: the
        RDP bound alone (Mironov 2017), looser, so budgets are spent sooner.
        Both are always computed and recorded.
    privacy_unit : {"employee-day", "record"}
        What one ε protects. Default ``"employee-day"``: everything one
        employee did on one day. Each round every eligible day is charged, a
        day joins the round's training with probability q, its update is
        clipped to norm C on its own and the device adds Gaussian noise of
        std σ·C/√t before secure aggregation (SECURITY.md, "Employee-day
        accounting"). ``"record"``: the older unit, one token window under
        DP-SGD, budgeted by ``epsilon_per_block``.
    epsilon_per_day : float
        Employee-day budget against an honest-but-curious server (it sees only
        the sum over at least ``min_summed_devices`` devices, noise std ≥ σ·C),
        composed over every round and run that ever charged the day. Default
        10: the user-level operating point production federated learning
        reports (Gboard's ρ-zCDP ≈ 0.8 is ε ≈ 8–10 at δ = 1e-5).
    epsilon_per_day_broken_aggregation : float
        Employee-day budget against a server that breaks secure aggregation
        and sees this device's share alone (noise std σ·C/√t). Default 40:
        the same noise read without the other t − 1 devices' shares costs
        about √t times more per round; a day retires when either budget is
        spent.
    min_summed_devices : int
        t: the fewest devices whose updates must be summed before anything is
        unmasked. The device's share carries noise σ·C/√t, so the sum over t
        devices carries σ·C. Default 3.
    update_clip_max : float
        Ceiling on the per-day update clip norm C the run asks for. Default
        1.0. ε does not depend on C (the noise scales with it); the ceiling
        bounds how far one day can move the model.
    day_sample_rate_max : float
        Ceiling on the probability q with which each eligible day joins a
        round. Default 1.0 (no amplification by sampling is then claimed).
    record_level_dp : bool
        Employee-day unit: also run DP-SGD per window inside each day's local
        training. Default False: the employee-day guarantee does not need it.
    """

    delta: float = 1e-5
    epsilon_per_block: float = 8.0
    noise_multiplier_min: float = 0.8
    noise_multiplier_max: float = 10.0
    max_grad_norm_max: float = 1.0
    sample_rate_max: float = 0.25
    max_local_steps: int = 200
    min_participation_gap_seconds: float = 0.0
    excluded_apps: tuple[str, ...] = DEFAULT_EXCLUDED_APPS
    raw_text: bool = False
    window_titles: bool = False
    retention_days: int = 30
    min_block_windows: int = 64
    min_block_age_days: int = 1
    accountant: Accountant = "prv"
    privacy_unit: PrivacyUnit = "employee-day"
    epsilon_per_day: float = 10.0
    epsilon_per_day_broken_aggregation: float = 40.0
    min_summed_devices: int = 3
    update_clip_max: float = 1.0
    day_sample_rate_max: float = 1.0
    record_level_dp: bool = False

    def __post_init__(self) -> None:
        # A policy built in code is held to the same rules as one read from a
        # file; values are normalised (int -> float, list -> tuple).
        for key in _RULES:
            object.__setattr__(self, key, _validated(key, getattr(self, key), "DevicePolicy"))
        if self.noise_multiplier_max < self.noise_multiplier_min:
            raise PolicyError(
                f"DevicePolicy: noise_multiplier_max = {self.noise_multiplier_max!r} is below "
                f"noise_multiplier_min = {self.noise_multiplier_min!r}; allowed: a ceiling at "
                "or above the floor"
            )

    # --- file I/O --------------------------------------------------------------

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        """The keys a ``[policy]`` table may set, in file order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, object], *, source: str = POLICY_FILE
    ) -> DevicePolicy:
        """Build a policy from a ``[policy]`` table; missing keys keep their defaults.

        Raises
        ------
        PolicyError
            For an unknown key (naming the allowed keys) or a bad value.
        """
        allowed = cls.key_names()
        unknown = sorted(k for k in table if k not in allowed)
        if unknown:
            raise PolicyError(
                f"{source}: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)} in [policy]; allowed keys: {', '.join(allowed)}"
            )
        values = {key: _validated(key, value, source) for key, value in table.items()}
        try:
            return cls(**values)
        except PolicyError as error:
            # A rule across keys (ceiling below floor) names the class; the
            # employee must be told which file to fix.
            message = str(error).removeprefix("DevicePolicy: ")
            raise PolicyError(f"{source}: {message}") from None

    @classmethod
    def load(cls, path: Path) -> DevicePolicy:
        """Read a policy from a TOML file's ``[policy]`` table.

        A missing file gives the defaults (a device is protected before anyone
        writes a policy). The file may contain only the ``[policy]`` table, so
        a misspelt table name is an error rather than a silently ignored
        policy.

        Parameters
        ----------
        path : Path
            Usually ``DATA_DIR/policy.toml``.

        Raises
        ------
        PolicyError
            If the file is not valid TOML, has other tables, or any key or
            value is not allowed; the message names the file and the key.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError(f"{path}: cannot read the policy file ({error})") from error
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise PolicyError(f"{path.name}: not valid TOML ({error})") from error
        extra = sorted(k for k in document if k != "policy")
        if extra:
            raise PolicyError(
                f"{path.name}: unknown top-level {'entries' if len(extra) > 1 else 'entry'} "
                f"{', '.join(extra)}; the file holds only a [policy] table with keys: "
                f"{', '.join(cls.key_names())}"
            )
        table = document.get("policy", {})
        if not isinstance(table, dict):
            raise PolicyError(f"{path.name}: policy must be a table ([policy]), not a value")
        return cls.from_mapping(table, source=path.name)

    def to_toml(self) -> str:
        """The policy as a ``policy.toml`` document that :meth:`load` reads back equal."""
        # tomli-w writes a list one item a line (the list an employee is most
        # likely to edit) and floats by repr, which round-trips exactly.
        return tomli_w.dumps({"policy": {key: getattr(self, key) for key in self.key_names()}})

    def save(self, path: Path) -> None:
        """Write :meth:`to_toml` to ``path`` (replacing it atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_toml(), encoding="utf-8")
        tmp.replace(path)

    # --- explanation -----------------------------------------------------------------

    def explain(self) -> str:
        """What each setting means, in words for the employee whose device this is."""
        apps = ", ".join(self.excluded_apps) if self.excluded_apps else "(none)"
        gap = (
            "no minimum; the privacy budget alone limits training."
            if self.min_participation_gap_seconds == 0
            else f"at least {self.min_participation_gap_seconds:g} seconds between two rounds."
        )
        accountant = {
            "prv": "a certified privacy-loss-distribution bound (or RDP's, where lower)",
            "rdp": "the RDP accountant's bound (looser: a day's budget is spent sooner)",
        }[self.accountant]
        items = self._explain_unit(accountant)
        items += [
            ("Steps per round", f"at most {self.max_local_steps}."),
            ("Time between rounds", gap),
            (
                "Smallest day used",
                f"{self.min_block_windows} training windows "
                f"({self.min_block_windows * (WINDOW + 1)} events); thinner days are left out.",
            ),
            (
                "Youngest day used",
                "today's is used too." if self.min_block_age_days == 0 else
                f"{self.min_block_age_days} day(s) old; newer days are still being recorded.",
            ),
            ("Never recorded", f"input while one of these applications has focus: {apps}."),
            (
                "Typed characters",
                "stored." if self.raw_text else "not stored; only the kind of key is kept.",
            ),
            (
                "Window titles",
                "stored." if self.window_titles else "not stored; only application names.",
            ),
            ("Kept for", f"{self.retention_days} days, then deleted."),
        ]
        lines = [f"What this device allows ({POLICY_FILE}; the server cannot change it):", ""]
        for title, text in items:
            lines.extend(
                textwrap.wrap(
                    text,
                    width=88,
                    initial_indent=f"  {title:<22}",
                    subsequent_indent=" " * 24,
                )
            )
        lines += [
            "",
            "Requests that ask for less (or far more) noise, a larger clip, a higher",
            "sampling rate, more steps, another privacy unit or no DP are",
            "refused, never adjusted. Raw events never leave this machine: only a clipped,",
            "noised model update and a signed report of the ε it cost.",
        ]
        return "\n".join(lines)

    def budget_sentence(self) -> str:
        """The budgets in force, with their keys, for refusal reasons."""
        if self.privacy_unit == "record":
            return f"ε {self.epsilon_per_block:g} per block, {POLICY_FILE} epsilon_per_block"
        return (
            f"ε {self.epsilon_per_day:g} per day against an {ASSUMPTION_HONEST}, "
            f"{self.epsilon_per_day_broken_aggregation:g} against a {ASSUMPTION_BROKEN}, "
            f"{POLICY_FILE} epsilon_per_day and epsilon_per_day_broken_aggregation"
        )

    def _explain_unit(self, accountant: str) -> list[tuple[str, str]]:
        """The settings that depend on the privacy unit, explained."""
        counted = (
            "How ε is counted",
            f"{accountant}, composed over every round and every run, never reset.",
        )
        noise = [
            (
                "Noise floor",
                f"noise multiplier σ >= {self.noise_multiplier_min:g}: the noise added, "
                "relative to the clip norm.",
            ),
            (
                "Noise ceiling",
                f"σ <= {self.noise_multiplier_max:g}: a round whose noise drowns everything "
                "would cost almost nothing and teach the model nothing.",
            ),
        ]
        record = [
            (
                "Sampling rate",
                f"each window joins a step's batch with probability q <= "
                f"{self.sample_rate_max:g}, a rate the run chooses, never your data.",
            ),
            (
                "Clip ceiling",
                f"each window's gradient is clipped to norm <= {self.max_grad_norm_max:g} "
                "before noise is added.",
            ),
        ]
        if self.privacy_unit == "record":
            return [
                (
                    "Privacy budget",
                    f"ε = {self.epsilon_per_block:g} per token window, δ = {self.delta:g}. "
                    "Your activity is grouped by day. Every training round that reads a day "
                    "spends part of that day's budget; once it is spent the day is retired and "
                    f"never trained on again. {PRIVACY_UNIT_SENTENCE}",
                ),
                counted,
                *noise,
                *record,
            ]
        t = self.min_summed_devices
        items = [
            (
                "Privacy unit",
                "one employee-day: everything you did on one day. Nobody who sees what this "
                "device sends can tell what you did on a given day beyond the ε below.",
            ),
            (
                "Privacy budget",
                f"ε = {self.epsilon_per_day:g} per day against an {ASSUMPTION_HONEST} (it sees "
                f"only the sum of at least {t} devices' updates), and ε = "
                f"{self.epsilon_per_day_broken_aggregation:g} per day against a "
                f"{ASSUMPTION_BROKEN} (it sees this device's update alone); δ = {self.delta:g}. "
                "Every round charges every day it could read, before training; a day retires "
                "when either budget is spent and is never trained on again.",
            ),
            counted,
            (
                "Devices summed",
                f"at least {t}: the device adds noise σ·C/√{t} to its update, so the sum of "
                f"{t} carries σ·C (policy min_summed_devices).",
            ),
            *noise,
            (
                "Day sampling rate",
                f"each eligible day joins a round with probability q <= "
                f"{self.day_sample_rate_max:g}, drawn on this device and never revealed.",
            ),
            (
                "Update clip ceiling",
                f"each day's update is clipped to norm C <= {self.update_clip_max:g} on its own, "
                "so one day moves what is sent by at most C.",
            ),
        ]
        if self.record_level_dp:
            items += [("Inside each day", "DP-SGD per token window as well:"), *record]
        return items

    # --- request checks --------------------------------------------------------------

    def check_request(self, req: TrainingRequest) -> None:
        """Refuse a malformed request, or one that would weaken this policy.

        Called before anything else, the ledger included: a refused request
        costs nothing and changes nothing. Rules, in order (the first broken
        one is reported):

        1. Well-formed (``bad-request``, INVALID_ARGUMENT): ``run_id`` 1 to
           :data:`RUN_ID_MAX` characters of ``A-Z a-z 0-9 . _ : -``;
           ``1 <= server_round <=`` :data:`SERVER_ROUND_MAX`; at most
           :data:`MAX_REQUESTED_BLOCKS` blocks, each a ``YYYY-MM-DD`` date;
           ``local_steps >= 1``; a learning rate that is finite, > 0 and
           <= :data:`LEARNING_RATE_MAX`; a known ``privacy_unit``; for the
           record unit a finite sample rate > 0, for the employee-day unit a
           finite update clip and a day sample rate > 0.
        2. The request's ``privacy_unit`` is the policy's (``unit-mismatch``):
           a run may not choose a weaker unit than the device protects.
        3. ``dp`` must be true (``no-dp``).
        4. ``noise_multiplier_min`` <= σ <= ``noise_multiplier_max``, finite
           (``noise-below-floor``, ``noise-above-max``).
        5. Record unit: 0 < C <= ``max_grad_norm_max`` (``clip-above-max``),
           q <= ``sample_rate_max`` (``sample-rate-above-max``).
           Employee-day unit: 0 < C <= ``update_clip_max``
           (``clip-above-max``), q <= ``day_sample_rate_max``
           (``sample-rate-above-max``), and, when ``record_level_dp`` is on,
           the record rules above for DP-SGD inside each day.
        6. T <= ``max_local_steps`` (``too-many-steps``).

        Raises
        ------
        Refusal
            Never adjusts the request; the reason names what was asked, what
            this device allows and the policy key.
        """
        check_well_formed(req)
        where = POLICY_FILE
        if req.privacy_unit != self.privacy_unit:
            raise Refusal(
                "unit-mismatch",
                f"refused: run {req.run_id!r} protects the privacy unit {req.privacy_unit!r} but "
                f"this device protects {self.privacy_unit!r} ({where} privacy_unit); a run may "
                "not choose the unit",
            )
        if not req.dp:
            raise Refusal(
                "no-dp",
                f"refused: run {req.run_id!r} asks to train without differential privacy; "
                "this device only trains with DP (no policy setting turns it off)",
            )
        sigma = req.noise_multiplier
        if not (math.isfinite(sigma) and sigma >= self.noise_multiplier_min):
            raise Refusal(
                "noise-below-floor",
                f"refused: run asks noise_multiplier {sigma:g} but this device's floor is "
                f"{self.noise_multiplier_min:g} ({where} noise_multiplier_min)",
            )
        if sigma > self.noise_multiplier_max:
            raise Refusal(
                "noise-above-max",
                f"refused: run asks noise_multiplier {sigma:g} but this device's ceiling is "
                f"{self.noise_multiplier_max:g} ({where} noise_multiplier_max): a round that "
                "noisy costs almost no ε and teaches the model nothing",
            )
        if req.privacy_unit == "employee-day":
            self._check_day_mechanism(req)
        if req.privacy_unit == "record" or self.record_level_dp:
            self._check_record_mechanism(req)
        if req.local_steps > self.max_local_steps:
            raise Refusal(
                "too-many-steps",
                f"refused: run asks {req.local_steps} local steps but this device allows at most "
                f"{self.max_local_steps} per round ({where} max_local_steps)",
            )

    def _check_record_mechanism(self, req: TrainingRequest) -> None:
        """DP-SGD per window: the per-sample clip and the window sampling rate."""
        clip = req.max_grad_norm
        if not (math.isfinite(clip) and 0.0 < clip <= self.max_grad_norm_max):
            raise Refusal(
                "clip-above-max",
                f"refused: run asks max_grad_norm {clip:g} but this device allows a clip norm "
                f"> 0 and <= {self.max_grad_norm_max:g} ({POLICY_FILE} max_grad_norm_max)",
            )
        if not 0.0 < req.sample_rate <= self.sample_rate_max:
            raise Refusal(
                "sample-rate-above-max",
                f"refused: run asks sample_rate {req.sample_rate:g} but this device allows a "
                f"rate > 0 and at most {self.sample_rate_max:g} ({POLICY_FILE} sample_rate_max)",
            )

    def _check_day_mechanism(self, req: TrainingRequest) -> None:
        """The employee-day mechanism: the per-day update clip and the day sampling rate."""
        clip = req.update_clip
        if not (math.isfinite(clip) and 0.0 < clip <= self.update_clip_max):
            raise Refusal(
                "clip-above-max",
                f"refused: run asks update_clip {clip:g} but this device allows a per-day "
                f"update clip > 0 and <= {self.update_clip_max:g} ({POLICY_FILE} "
                "update_clip_max)",
            )
        if req.day_sample_rate > self.day_sample_rate_max:
            raise Refusal(
                "sample-rate-above-max",
                f"refused: run asks day_sample_rate {req.day_sample_rate:g} but this device "
                f"allows at most {self.day_sample_rate_max:g} ({POLICY_FILE} "
                "day_sample_rate_max)",
            )

    def select_blocks(
        self,
        requested: Collection[str],
        windows: Mapping[str, int],
        retired: Collection[str],
        *,
        today: date | None = None,
    ) -> tuple[str, ...]:
        """Which blocks a round may read, or a refusal saying why none/some may not.

        Parameters
        ----------
        requested : collection of str
            The blocks the run asks for; empty lets the device choose every
            eligible block.
        windows : mapping of str to int
            Token windows per block the device holds (from the store).
        retired : collection of str
            Blocks whose budget is spent (:meth:`Ledger.retired_blocks`).
        today : date, optional
            The device's date (default: today); blocks younger than
            ``min_block_age_days`` are still being recorded.

        Returns
        -------
        tuple of str
            Sorted blocks to train on: held, not retired, old enough, with at
            least ``min_block_windows`` windows.

        Raises
        ------
        Refusal
            ``block-unknown`` if a requested block is not held on this device;
            ``block-retired`` if a requested block's budget is spent;
            ``block-excluded`` if a requested block has too few windows or is
            too young;
            ``no-data`` if nothing is eligible.
        """
        retired_set = set(retired)
        newest = ((today or date.today()) - timedelta(days=self.min_block_age_days)).isoformat()
        if requested:
            wanted = sorted(set(requested))
            unknown = tuple(b for b in wanted if b not in windows)
            if unknown:
                raise Refusal(
                    "block-unknown",
                    f"refused: run asks for block(s) {', '.join(unknown)} which this device "
                    "does not hold (never recorded, forgotten, or past retention)",
                    unknown,
                )
            spent = tuple(b for b in wanted if b in retired_set)
            if spent:
                raise Refusal(
                    "block-retired",
                    f"refused: block(s) {', '.join(spent)} have spent their privacy budget "
                    f"({self.budget_sentence()}) and are retired: never trained on again",
                    spent,
                )
            thin = tuple(b for b in wanted if windows[b] < self.min_block_windows)
            if thin:
                detail = ", ".join(f"{b} ({windows[b]})" for b in thin)
                raise Refusal(
                    "block-excluded",
                    f"refused: block(s) {detail} hold fewer token windows than this device's "
                    f"minimum of {self.min_block_windows} ({POLICY_FILE} min_block_windows)",
                    thin,
                )
            young = tuple(b for b in wanted if b > newest)
            if young:
                raise Refusal(
                    "block-excluded",
                    f"refused: block(s) {', '.join(young)} are younger than "
                    f"{self.min_block_age_days} day(s) and still being recorded "
                    f"({POLICY_FILE} min_block_age_days)",
                    young,
                )
            return tuple(wanted)
        eligible = tuple(
            b
            for b in sorted(windows)
            if b not in retired_set and windows[b] >= self.min_block_windows and b <= newest
        )
        if not eligible:
            raise Refusal(
                "no-data",
                f"refused: no block is eligible for training: {len(windows)} held, "
                f"{sum(1 for b in windows if b in retired_set)} retired, the rest have fewer "
                f"than {self.min_block_windows} token windows ({POLICY_FILE} "
                f"min_block_windows) or are younger than {self.min_block_age_days} day(s) "
                f"({POLICY_FILE} min_block_age_days)",
            )
        return eligible


# --- request well-formedness ---------------------------------------------------------


def _bad(reason: str) -> Refusal:
    return Refusal("bad-request", f"invalid request: {reason}")


def _is_day(text: str) -> bool:
    if len(text) != 10 or text[4] != "-" or text[7] != "-":
        return False
    try:
        return date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def check_well_formed(req: TrainingRequest) -> None:
    """Refuse a request whose fields are malformed, whatever the policy says.

    Every reason restates only what the request itself carried (never a fact
    about the device's data), so it may travel back to the caller in full.

    Raises
    ------
    Refusal
        ``bad-request`` (gRPC INVALID_ARGUMENT), naming the field.
    """
    run_id = req.run_id
    if not isinstance(run_id, str) or not 1 <= len(run_id) <= RUN_ID_MAX:
        size = len(run_id) if isinstance(run_id, str) else "?"
        raise _bad(f"run_id must be 1 to {RUN_ID_MAX} characters, got {size}")
    if not set(run_id) <= _RUN_ID_CHARS:
        raise _bad("run_id may hold only letters, digits and . _ : -")
    if isinstance(req.server_round, bool) or not isinstance(req.server_round, int) or not (
        1 <= req.server_round <= SERVER_ROUND_MAX
    ):
        raise _bad(f"server_round must be from 1 to {SERVER_ROUND_MAX}, got {req.server_round}")
    if len(req.blocks) > MAX_REQUESTED_BLOCKS:
        raise _bad(f"at most {MAX_REQUESTED_BLOCKS} blocks may be named, got {len(req.blocks)}")
    for block in req.blocks:
        if not isinstance(block, str) or not _is_day(block):
            shown = block[:16] if isinstance(block, str) else "?"
            raise _bad(f"block {shown!r} is not a day written YYYY-MM-DD")
    if req.local_steps < 1:
        raise _bad(f"local_steps must be at least 1, got {req.local_steps}")
    lr = req.learning_rate
    if not (_is_number(lr) and math.isfinite(lr) and 0.0 < lr <= LEARNING_RATE_MAX):
        raise _bad(f"learning_rate must be a finite number > 0 and <= {LEARNING_RATE_MAX:g}, "
                   f"got {lr!r}")
    unit = req.privacy_unit
    if unit not in PRIVACY_UNITS:
        shown = unit[:32] if isinstance(unit, str) else "?"
        raise _bad(f"privacy_unit must be one of {', '.join(PRIVACY_UNITS)}, got {shown!r}")
    q = req.sample_rate
    if unit == "record":
        if not (_is_number(q) and math.isfinite(q) and 0.0 < q <= 1.0):
            raise _bad(f"sample_rate must be a number > 0 and <= 1, got {q!r}")
    else:
        # The record-level rate is used only when the device runs DP-SGD
        # inside each day (record_level_dp); 0 says "not asked".
        if not (_is_number(q) and math.isfinite(q) and 0.0 <= q <= 1.0):
            raise _bad(f"sample_rate must be a number >= 0 and <= 1, got {q!r}")
        day_q = req.day_sample_rate
        if not (_is_number(day_q) and math.isfinite(day_q) and 0.0 < day_q <= 1.0):
            raise _bad(f"day_sample_rate must be a number > 0 and <= 1, got {day_q!r}")
    for name in ("noise_multiplier", "max_grad_norm", "update_clip"):
        value = getattr(req, name)
        if not (_is_number(value) and math.isfinite(value)):
            raise _bad(f"{name} must be a finite number, got {value!r}")
