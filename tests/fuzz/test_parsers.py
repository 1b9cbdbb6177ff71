"""Fuzzed parsers: every bad input ends in the parser's own error, naming what is wrong.

Targets (examples per target in CI, ``--hypothesis-profile=fuzz-long`` for more):
the device's ``policy.toml`` (text, values, flipped bits), the server's run
config, enrollment requests (shape, fields, flipped bits), signed privacy
reports as the server ledger receives them (any field a malicious but enrolled
device could sign, flipped bits in payload and signature) and model
checkpoints (flipped bits, truncation, altered contents).

The contract under test is the one users see: a bad input raises the
documented error (``PolicyError``, ``SettingsError``, ``EnrollmentError``,
``ValueError``) with a sentence, or is recorded as unverifiable; no other
exception (which would reach the user as a traceback), and nothing accepted
that breaks the parser's own promises (finite numbers, a verified report only
when it is exactly what the device signed).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given
from hypothesis import strategies as st

from keystay.client.enroll import build_request
from keystay.client.identity import DeviceIdentity
from keystay.client.policy import DevicePolicy, PolicyError
from keystay.server.deploy.enrollment import EnrollmentError, EnrollmentRequest
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.settings import RunSettings, SettingsError

from .fuzzing import examples, flip_bits, json_scalars, json_values

# --- policy.toml --------------------------------------------------------------------

POLICY_KEYS = DevicePolicy.key_names()


def _check_policy(policy: DevicePolicy) -> None:
    for key in POLICY_KEYS:
        value = getattr(policy, key)
        if isinstance(value, float):
            assert math.isfinite(value), f"{key} accepted {value}"


def _load_text(tmp_path: Path, text: str | bytes) -> DevicePolicy | None:
    path = tmp_path / "policy.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        policy = DevicePolicy.load(path)
    except PolicyError as error:
        assert "policy" in str(error)  # names the file
        return None
    _check_policy(policy)
    return policy


@examples(300)
@given(text=st.text(max_size=300))
def test_policy_any_text(tmp_path: Path, text: str) -> None:
    _load_text(tmp_path, text)


def _toml(value: Any) -> str:
    """A TOML rendering of a JSON-ish value (NaN and infinities included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return '""'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


@examples(300)
@given(table=st.dictionaries(st.sampled_from(POLICY_KEYS) | st.text(min_size=1, max_size=10),
                             json_values, max_size=5))
def test_policy_any_values(tmp_path: Path, table: dict[str, Any]) -> None:
    body = "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in table.items())
    _load_text(tmp_path, "[policy]\n" + body)


@examples(200)
@given(positions=st.lists(st.integers(min_value=0), min_size=1, max_size=4))
def test_policy_flipped_bits(tmp_path: Path, positions: list[int]) -> None:
    good = DevicePolicy(epsilon_per_block=4.0).to_toml().encode()
    _load_text(tmp_path, flip_bits(good, positions))


# --- run config -----------------------------------------------------------------


def _run_config_keys() -> list[str]:
    with pytest.raises(SettingsError) as info:
        RunSettings.from_run_config({"no-such-key": 1})
    return info.value.args[0].split("allowed keys: ")[1].split(", ")


RUN_KEYS = _run_config_keys()


@examples(300)
@given(config=st.dictionaries(st.sampled_from(RUN_KEYS) | st.text(max_size=10),
                              json_scalars, max_size=6),
       base=st.booleans())
def test_run_config(tmp_path: Path, config: dict[str, Any], base: bool) -> None:
    if base:  # mostly-valid configs reach the value checks
        config = {"server-dir": str(tmp_path), "run-name": "r", **config}
    try:
        settings = RunSettings.from_run_config(config)
    except SettingsError as error:
        assert str(error)
        return
    assert settings.server_dir.is_absolute()


# --- enrollment requests ----------------------------------------------------------


@pytest.fixture(scope="module")
def enrollment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    identity = DeviceIdentity.open(tmp_path_factory.mktemp("device"))
    request, _ = build_request(identity, ec.generate_private_key(ec.SECP384R1()))
    EnrollmentRequest.parse(request)  # the unaltered one is accepted
    return request


@examples(200)
@given(data=json_values)
def test_enrollment_any_json(data: Any) -> None:
    with pytest.raises(EnrollmentError):
        EnrollmentRequest.parse(data)


@examples(300)
@given(field=st.sampled_from(["format", "device_id", "signing_public_key_pem",
                              "supernode_public_key", "created", "proof", "proof.signing",
                              "proof.supernode", "extra"]),
       value=json_values)
def test_enrollment_one_field_altered(enrollment: dict[str, Any], field: str, value: Any) -> None:
    request = json.loads(json.dumps(enrollment))
    if field.startswith("proof."):
        request["proof"][field[6:]] = value
        assume(value != enrollment["proof"][field[6:]])
    else:
        assume(request.get(field) != value)
        request[field] = value
    with pytest.raises(EnrollmentError):
        EnrollmentRequest.parse(request)


@examples(200)
@given(positions=st.lists(st.integers(min_value=0), min_size=1, max_size=3))
def test_enrollment_flipped_bits(tmp_path: Path, enrollment: dict[str, Any],
                                 positions: list[int]) -> None:
    good = json.dumps(enrollment).encode()
    bad = flip_bits(good, positions)
    path = tmp_path / "request.json"
    path.write_bytes(bad)
    try:
        parsed = EnrollmentRequest.load(path)
    except EnrollmentError:
        return
    # Accepted only if it still says what the device signed (a flip in JSON
    # whitespace or an escape that decodes the same).
    assert parsed.device_id == enrollment["device_id"]
    assert parsed.signing_public_key_pem == enrollment["signing_public_key_pem"]


# --- signed reports, as the server ledger receives them ------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


class Device:
    def __init__(self) -> None:
        from tests.unit.server.conftest import FakeDevice  # the server tests' signer

        self.fake = FakeDevice(Ed25519PrivateKey.generate())

    def report(self, **overrides: Any) -> dict[str, Any]:
        return self.fake.payload("run-1", 1, [("2026-01-01", 1.0, 8.0, False)], **overrides)


@pytest.fixture
def server(tmp_path: Path) -> tuple[ServerLedger, Device]:
    ledger = ServerLedger.open(tmp_path / "server")
    device = Device()
    ledger.enroll_device(device.fake.device_id, device.fake.pem)
    return ledger, device


REPORT_FIELDS = ["device_id", "run_id", "server_round", "noise_multiplier", "sample_rate",
                 "steps", "delta", "accountant", "epsilon_round", "epsilon_total",
                 "max_grad_norm", "format", "blocks", "blocks.0.block", "blocks.0.epsilon",
                 "blocks.0.budget", "blocks.0.retired", "blocks.0.epsilon_rdp", "blocks.0"]


@examples(300)
@given(field=st.sampled_from(REPORT_FIELDS), value=json_values)
def test_signed_report_any_field(tmp_path_factory: pytest.TempPathFactory, field: str,
                                 value: Any) -> None:
    """An enrolled device signs anything: recorded, never a traceback, counted only if sane."""
    ledger = ServerLedger.open(tmp_path_factory.mktemp("server"))
    device = Device()
    ledger.enroll_device(device.fake.device_id, device.fake.pem)
    fields = device.report()
    if field.startswith("blocks.0."):
        fields["blocks"][0][field[9:]] = value
    elif field == "blocks.0":
        fields["blocks"][0] = value
    else:
        fields[field] = value
    try:
        payload = _canonical(fields)
    except ValueError:  # NaN/inf: a device cannot sign that canonically; send it raw
        payload = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    verdict = ledger.record_report("run-1", 1, payload, device.fake.key.sign(payload))
    if verdict.verified:
        for entry in ledger.block_epsilons(device.fake.device_id):
            assert math.isfinite(entry.epsilon) and entry.epsilon >= 0
    ledger.close()


@examples(200)
@given(in_payload=st.lists(st.integers(min_value=0), max_size=3),
       in_signature=st.lists(st.integers(min_value=0), max_size=2),
       cut=st.none() | st.integers(min_value=0, max_value=63))
def test_signed_report_flipped_bits(server: tuple[ServerLedger, Device], in_payload: list[int],
                                    in_signature: list[int], cut: int | None) -> None:
    ledger, device = server
    payload = _canonical(device.report())
    signature = device.fake.key.sign(payload)
    bad_payload = flip_bits(payload, in_payload) if in_payload else payload
    bad_signature = flip_bits(signature, in_signature) if in_signature else signature
    if cut is not None:
        bad_signature = bad_signature[:cut]
    verdict = ledger.record_report("run-1", 1, bad_payload, bad_signature)
    if (bad_payload, bad_signature) != (payload, signature):
        assert not verdict.verified
    assert verdict.findings or verdict.verified


# --- checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from keystay.common.model import ModelConfig, initial_weights, save_checkpoint

    config = ModelConfig(embed_dim=4, channels=4, layers=1, hidden=4)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "c.pt", initial_weights(config),
                           config, {"round": 1})
    return path.read_bytes()


@examples(100)
@given(positions=st.lists(st.integers(min_value=0), max_size=4),
       cut=st.none() | st.floats(min_value=0.0, max_value=1.0))
def test_checkpoint_flipped_or_truncated(tmp_path: Path, checkpoint: bytes,
                                         positions: list[int], cut: float | None) -> None:
    from keystay.common.model import load_checkpoint

    data = flip_bits(checkpoint, positions) if positions else checkpoint
    if cut is not None:
        data = data[: int(len(data) * cut)]
    assume(data != checkpoint)
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    try:
        model = load_checkpoint(path)
    except ValueError as error:
        assert str(path) in str(error)
        return
    # Loaded: the flip was in bytes the container ignores; the model must be
    # exactly the one written, never a silently different one.
    original = tmp_path / "good.pt"
    original.write_bytes(checkpoint)
    good = load_checkpoint(original)
    for mine, theirs in zip(model.state_dict().values(), good.state_dict().values(), strict=True):
        assert bool((mine == theirs).all())
    assert model.meta == good.meta


@examples(100)
@given(key=st.sampled_from(["format", "version", "vocab_version", "config", "state_dict",
                            "meta", "config.layers", "config.arch", "config.window",
                            "state_dict.first"]),
       value=json_values)
def test_checkpoint_altered_contents(tmp_path: Path, checkpoint: bytes, key: str,
                                     value: Any) -> None:
    import io

    import torch

    from keystay.common.model import load_checkpoint

    payload = torch.load(io.BytesIO(checkpoint), weights_only=True)
    if key == "state_dict.first":
        first = next(iter(payload["state_dict"]))
        payload["state_dict"][first] = value
    elif "." in key:
        outer, inner = key.split(".")
        payload[outer][inner] = value
    else:
        payload[key] = value
    path = tmp_path / "altered.pt"
    torch.save(payload, path)
    try:
        load_checkpoint(path)
    except ValueError as error:
        assert str(path) in str(error)
