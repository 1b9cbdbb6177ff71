"""DeviceCore: validate, then charge; only the update and the signed report come back.

The core runs here with a real store, ledger, policy and identity, and a fake
trainer (no torch): it returns the weights plus a little noise, counts its
calls, and prices rounds with an additive accountant so figures are exact.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sqlite3
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from keystay.client.daemon.core import DeviceCore, check_weights, window_count
from keystay.client.daemon.refusals import REFUSALS_FILE
from keystay.client.daemon.secagg_stages import SessionKey
from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.accounting import Epsilons, Mechanism
from keystay.client.ledger.ledger import LEDGER_FILE, Ledger
from keystay.client.policy import DevicePolicy, Refusal, TrainingRequest
from keystay.client.store import EventStore
from keystay.client.trainer.job import TrainJob, TrainOutcome
from keystay.common.digest import weights_sha256
from keystay.common.windows import TRAIN_STRIDE, WINDOW, make_windows
from keystay.sim.employees import fill_store

SPEC = (((4, 3), "<f4"), ((3,), "<f4"))
YESTERDAY = date.today() - timedelta(days=1)
DAY = YESTERDAY.isoformat()


def additive(history: Sequence[Mechanism], delta: float) -> Epsilons:
    total = sum(m.steps * m.sample_rate / m.noise_multiplier for m in history)
    return Epsilons(rdp=1.25 * total, prv=0.99 * total, prv_upper=total)


class FakeTrainer:
    """What DeviceCore needs of a WarmTrainer, without torch."""

    ready = True

    def __init__(self) -> None:
        self.jobs: list[TrainJob] = []

    def weight_spec(self) -> list[tuple[tuple[int, ...], str]]:
        return [(shape, dtype) for shape, dtype in SPEC]

    def epsilons(self, history: Sequence[Mechanism], delta: float) -> Epsilons:
        return additive(history, delta)

    def train(self, job: TrainJob) -> TrainOutcome:
        self.jobs.append(job)
        rng = np.random.default_rng()
        weights = [w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in job.weights]
        return TrainOutcome(
            weights=weights, train_loss=1.234, heldout_accuracy=0.5, heldout_loss=2.0,
            steps=job.steps, sample_rate=job.sample_rate, num_examples=len(job.train),
            seconds=0.1,
        )


def weights() -> list[np.ndarray]:
    return [np.zeros(shape, dtype=np.dtype(dtype)) for shape, dtype in SPEC]


def request(**changes: Any) -> TrainingRequest:
    base = TrainingRequest(
        noise_multiplier=1.0, max_grad_norm=1.0, local_steps=10, sample_rate=0.05,
        learning_rate=0.01, dp=True, blocks=(), run_id="run-a", server_round=1,
    )
    return dataclasses.replace(base, **changes)


def make_core(data_dir: Path, *, events_per_day: int = 100 * (WINDOW + 1),
              days: int = 2, unit: str = "record") -> tuple[DeviceCore, FakeTrainer]:
    store = EventStore.open(data_dir)
    fill_store(store, seed=7, days=days, events_per_day=events_per_day, end_day=YESTERDAY)
    trainer = FakeTrainer()
    # Record-level unless a test asks: most tests here are about Train.
    policy = DevicePolicy(privacy_unit=unit)  # type: ignore[arg-type]
    core = DeviceCore(data_dir, store, policy, Ledger.open(data_dir),
                      DeviceIdentity.open(data_dir), trainer)  # type: ignore[arg-type]
    return core, trainer


def ledger_rows(data_dir: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every ledger table, read through a separate connection."""
    conn = sqlite3.connect(data_dir / LEDGER_FILE)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in tables}
    finally:
        conn.close()


@pytest.fixture
def device(tmp_path: Path) -> tuple[DeviceCore, FakeTrainer]:
    return make_core(tmp_path / "device")


# --- what comes back ----------------------------------------------------------------


def test_a_round_returns_the_update_and_a_report_with_no_count_of_data(
    device: tuple[DeviceCore, FakeTrainer],
) -> None:
    core, trainer = device
    result = core.train(request(), weights())
    assert len(trainer.jobs) == 1
    assert [w.shape for w in result.weights] == [s for s, _ in SPEC]
    # Only these leave; the loss, count and time the trainer measured do not.
    assert {f.name for f in dataclasses.fields(result)} == {
        "weights", "report", "payload", "signature"}
    payload = json.loads(result.payload)
    assert "num_examples" not in payload
    assert payload["sample_rate"] == 0.05
    assert "33 consecutive input events" in payload["unit"]
    assert core.ledger.totals()  # charged


def test_the_sampling_rate_is_the_runs_whatever_the_window_count(tmp_path: Path) -> None:
    small, small_trainer = make_core(tmp_path / "small", events_per_day=80 * (WINDOW + 1))
    large, large_trainer = make_core(tmp_path / "large", events_per_day=400 * (WINDOW + 1))
    reports = [json.loads(c.train(request(), weights()).payload) for c in (small, large)]
    # Same request, very different n: the signed figures cannot tell them apart.
    assert reports[0]["sample_rate"] == reports[1]["sample_rate"] == 0.05
    assert reports[0]["epsilon_total"] == reports[1]["epsilon_total"]
    small_n, large_n = len(small_trainer.jobs[0].train), len(large_trainer.jobs[0].train)
    assert large_n > 4 * small_n
    for job in (small_trainer.jobs[0], large_trainer.jobs[0]):
        assert job.sample_rate == 0.05  # Poisson rate q; the batch is q·n on average


def test_training_windows_do_not_overlap(device: tuple[DeviceCore, FakeTrainer]) -> None:
    core, trainer = device
    core.train(request(blocks=(DAY,)), weights())
    job = trainer.jobs[0]
    tokens = core.store.block_tokens(DAY)
    # Rebuild which positions each training window covers: they tile the day.
    starts = np.arange(len(job.train)) * TRAIN_STRIDE
    for start, window in zip(starts, job.train, strict=True):
        assert np.array_equal(window, tokens[start:start + WINDOW + 1])
    assert len(job.train) + len(job.heldout) <= window_count(len(tokens))


def test_window_count_matches_the_windows_cut() -> None:
    for events in (0, WINDOW, WINDOW + 1, 2 * (WINDOW + 1) - 1, 2 * (WINDOW + 1), 1000):
        cut = make_windows(np.zeros(events, dtype=np.int64), WINDOW, stride=TRAIN_STRIDE)
        assert window_count(events) == len(cut)


# --- validate, then charge ------------------------------------------------------------


def _nan() -> list[np.ndarray]:
    w = weights()
    w[1][0] = math.nan
    return w


BAD = [
    ("lr-zero", request(learning_rate=0.0), weights(), "bad-request"),
    ("lr-negative", request(learning_rate=-0.1), weights(), "bad-request"),
    ("lr-nan", request(learning_rate=math.nan), weights(), "bad-request"),
    ("round-huge", request(server_round=2**63), weights(), "bad-request"),
    ("round-zero", request(server_round=0), weights(), "bad-request"),
    ("run-id-long", request(run_id="r" * 500), weights(), "bad-request"),
    ("run-id-chars", request(run_id="run\n../x"), weights(), "bad-request"),
    ("block-format", request(blocks=("../../etc",)), weights(), "bad-request"),
    ("sigma-huge", request(noise_multiplier=1e6), weights(), "noise-above-max"),
    ("q-above-max", request(sample_rate=1.0), weights(), "sample-rate-above-max"),
    ("no-dp", request(dp=False), weights(), "no-dp"),
    ("nan-weights", request(), _nan(), "bad-request"),
    ("wrong-shape", request(), [np.zeros((3, 4), np.float32), np.zeros(3, np.float32)],
     "bad-request"),
    ("wrong-order", request(), list(reversed(weights())), "bad-request"),
    ("wrong-count", request(), weights()[:1], "bad-request"),
    ("wrong-dtype", request(), [w.astype(np.float64) for w in weights()], "bad-request"),
    ("unknown-block", request(blocks=("1999-01-01",)), weights(), "block-unknown"),
]


@pytest.mark.parametrize(("name", "req", "ws", "code"), BAD, ids=[b[0] for b in BAD])
def test_a_refused_request_touches_neither_ledger_nor_trainer(
    device: tuple[DeviceCore, FakeTrainer], name: str, req: TrainingRequest,
    ws: list[np.ndarray], code: str,
) -> None:
    core, trainer = device
    core.train(request(server_round=1), weights())  # a history to keep unchanged
    before = ledger_rows(core.data_dir)
    with pytest.raises(Refusal) as info:
        core.train(dataclasses.replace(req, server_round=req.server_round + 1)
                   if name not in ("round-huge", "round-zero") else req, ws)
    assert info.value.code == code, info.value.reason
    assert ledger_rows(core.data_dir) == before
    assert len(trainer.jobs) == 1


def test_every_refusal_is_kept_in_full_for_the_employee(
    device: tuple[DeviceCore, FakeTrainer],
) -> None:
    core, _ = device
    with pytest.raises(Refusal) as info:
        core.train(request(blocks=("1999-01-01",)), weights())
    assert "1999-01-01" not in info.value.public_reason
    logged = core.refusals.recent()
    assert logged[-1]["code"] == "block-unknown"
    assert logged[-1]["reason"] == info.value.reason and "1999-01-01" in logged[-1]["reason"]


def test_check_weights_accepts_the_model_and_names_the_first_fault() -> None:
    check_weights(weights(), SPEC)
    with pytest.raises(Refusal, match="weight array 1 has shape"):
        check_weights([weights()[0], np.zeros(4, np.float32)], SPEC)


def test_the_employees_show_lists_refusals_with_full_reasons(
    device: tuple[DeviceCore, FakeTrainer],
) -> None:
    from keystay.client.daemon.controls import Controls

    core, _ = device
    with pytest.raises(Refusal):
        core.train(request(noise_multiplier=0.1), weights())
    summary = Controls(core, None, "none", "test").show(None)
    [entry] = summary["refusals"]
    assert entry["code"] == "noise-below-floor" and "floor is 0.8" in entry["reason"]
    assert entry["run_id"] == "run-a" and entry["server_round"] == 1


# --- the employee-day unit: SecAgg+ only ------------------------------------------------


def test_train_is_refused_when_the_unit_is_the_employee_day(tmp_path: Path) -> None:
    core, trainer = make_core(tmp_path / "d", unit="employee-day")
    before = ledger_rows(tmp_path / "d")
    with pytest.raises(Refusal) as refused:
        core.train(request(), weights())
    assert refused.value.code == "secure-aggregation-only"
    assert refused.value.public_reason == "refused by device policy: secure-aggregation-only"
    assert trainer.jobs == [] and ledger_rows(tmp_path / "d") == before


def _stage(stage: str, **values: Any) -> ConfigRecord:
    return ConfigRecord({Key.STAGE: stage, **values})


def _open_round(core: DeviceCore) -> dict[int, SessionKey]:
    """Three sessions (nodes 1-3) in one daemon through setup and share keys."""
    keys = {n: SessionKey("flwr-run", 1, n) for n in (1, 2, 3)}
    setup = _stage(Stage.SETUP, **{
        Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 5, Key.THRESHOLD: 3,
        Key.CLIPPING_RANGE: 64.0, Key.TARGET_RANGE: 2**24, Key.MOD_RANGE: 2**40,
        Key.MAX_WEIGHT: 1.0})
    pks = {n: core.secagg_stage(k, copy.deepcopy(setup)).configs for n, k in keys.items()}
    record = {str(n): [pk[Key.PUBLIC_KEY_1], pk[Key.PUBLIC_KEY_2]] for n, pk in pks.items()}
    inbox: dict[int, list[tuple[int, bytes]]] = {n: [] for n in keys}
    for n, k in keys.items():
        out = core.secagg_stage(k, _stage(Stage.SHARE_KEYS, **record)).configs
        for dst, ct in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST],  # type: ignore[arg-type]
                           strict=True):
            inbox[dst].append((n, ct))
    core._inbox = inbox  # type: ignore[attr-defined]
    return keys


def _masking(core: DeviceCore, node: int) -> ConfigRecord:
    inbox = core._inbox[node]  # type: ignore[attr-defined]
    return _stage(Stage.COLLECT_MASKED_VECTORS, **{
        Key.SOURCE_LIST: [s for s, _ in inbox], Key.CIPHERTEXT_LIST: [c for _, c in inbox]})


def _day_request() -> TrainingRequest:
    return request(privacy_unit="employee-day", update_clip=0.5, day_sample_rate=1.0,
                   noise_multiplier=1.0)


def test_an_employee_day_round_charges_every_day_both_series_and_sends_masked(
    tmp_path: Path,
) -> None:
    core, trainer = make_core(tmp_path / "d", unit="employee-day")
    keys = _open_round(core)
    result = core.secagg_stage(keys[1], _masking(core, 1), _day_request(), weights())
    assert result.report is not None
    payload = json.loads(result.payload)
    days = [b["block"] for b in payload["blocks"]]
    assert len(days) == 2  # every eligible day charged, under both assumptions
    totals = {t.block: t for t in core.ledger.totals()}
    assert sorted(totals) == sorted(days)
    for total in totals.values():
        assert total.unit == "employee-day"
        assert total.epsilon_broken is not None and total.epsilon_broken > total.epsilon > 0
    # q = 1: every day trained, separately, without DP-SGD (the policy's default).
    assert len(trainer.jobs) == 2 and not any(j.record_level_dp for j in trainer.jobs)
    # What leaves is the masked vector (Flower's factor first), bound to the report.
    masked = [bytes_to_ndarray(b) for b in result.configs[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
    assert [m.shape for m in masked] == [(1,), *(s for s, _ in SPEC)]
    assert payload["update_sha256"] == weights_sha256(masked)
    assert all(m.dtype == np.int64 and np.all((m >= 0) & (m < 2**40)) for m in masked)


def test_masking_with_too_few_shares_charges_nothing(tmp_path: Path) -> None:
    core, trainer = make_core(tmp_path / "d", unit="employee-day")
    keys = _open_round(core)
    core._inbox[1] = core._inbox[1][:1]  # type: ignore[attr-defined]
    before = ledger_rows(tmp_path / "d")
    with pytest.raises(Refusal) as refused:
        core.secagg_stage(keys[1], _masking(core, 1), _day_request(), weights())
    assert refused.value.code == "secagg-below-threshold"
    assert trainer.jobs == [] and ledger_rows(tmp_path / "d") == before
    assert "secagg-below-threshold" in (tmp_path / "d" / REFUSALS_FILE).read_text()


def test_the_daemon_never_seeds_its_core() -> None:
    # DeviceCore's seed is a test-only seam (a simulated device against a real
    # daemon): the daemon builds its core without it, and its CLI offers no
    # option that could reach it.
    import ast
    import inspect

    import keystay.client.daemon.main as daemon_main
    from keystay.cli.main import main
    from keystay.client.device_cli import device

    assert inspect.signature(DeviceCore).parameters["seed"].default is None
    tree = ast.parse(inspect.getsource(daemon_main))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "DeviceCore"]
    assert calls, "the daemon builds its core somewhere"
    for call in calls:
        assert len(call.args) == 6 and not call.keywords, ast.dump(call)
    run = device.get_command(None, "run")  # type: ignore[arg-type]
    assert run is not None and main is not None
    names = {name for param in run.params for name in (*param.opts, param.name or "")}
    assert not any("seed" in name and "employee" not in name for name in names), names


def test_only_a_seeded_core_hands_its_seed_to_the_trainer(tmp_path: Path) -> None:
    # Unseeded (the daemon): every day's job draws OS entropy (seed None).
    # Seeded (a test): every job carries the seed, so a real daemon and a
    # simulated device can be compared bit for bit.
    seen = {}
    for name, seed in (("os", None), ("seeded", 11)):
        core, trainer = make_core(tmp_path / name, unit="employee-day")
        core._seed = seed  # as DeviceCore(..., seed=seed) sets it
        keys = _open_round(core)
        core.secagg_stage(keys[1], _masking(core, 1), _day_request(), weights())
        seen[name] = [job.seed for job in trainer.jobs]
    assert seen["os"] and set(seen["os"]) == {None}
    assert seen["seeded"] and set(seen["seeded"]) == {11}
