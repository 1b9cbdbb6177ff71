"""The daemon's SecAgg+ stages against Flower's unchanged server workflow.

Each node is a :class:`SecAggStages` fed the stage messages Flower's
``SecAggPlusWorkflow`` sends (through a Grid stand-in, no ClientApp): the
server's decoded mean must equal the mean of what the devices encoded, so the
daemon's own masking stage is byte-compatible with Flower 1.39. Then every
refusal the brief names, one by one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.supercore.task_identity import TaskIdentity

from keystay.client.daemon import secagg_stages
from keystay.client.daemon.secagg_stages import SecAggStages, SessionKey
from keystay.client.policy import Refusal
from tests.e2e.secagg_grid import OneProcessGrid

C_RANGE = 16.0
Q_RANGE = 2**20
MODULUS = 2**40
SHAPES = [(3, 4), (5,)]


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Flower's workflow creates messages as the SuperLink of run 7."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@dataclass
class StageGrid(OneProcessGrid):
    """SuperLink + SuperNodes where each SuperNode is a daemon's SecAggStages."""

    daemons: dict[int, SecAggStages]
    encoded: dict[int, list[np.ndarray]]
    drop_at: dict[int, str] = field(default_factory=dict)
    refused: list[tuple[int, str]] = field(default_factory=list)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.daemons)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            configs = copy.deepcopy(msg.content.config_records[RECORD_KEY_CONFIGS])
            stage = str(configs[Key.STAGE])
            if self.drop_at.get(node) == stage:
                self.daemons.pop(node)
            if node not in self.daemons:
                continue
            daemon, key = self.daemons[node], SessionKey("run", 1, node)
            content = RecordDict()
            try:
                if stage == Stage.SETUP:
                    result = daemon.setup(key, configs)
                elif stage == Stage.SHARE_KEYS:
                    result = daemon.share_keys(key, configs)
                elif stage == Stage.UNMASK:
                    result = daemon.unmask(key, configs)
                else:
                    masking = daemon.open_masking(key, configs)
                    result = daemon.masked_result(masking.mask(self.encoded[node]))
                    content = compat.fitres_to_recorddict(
                        FitRes(Status(Code.OK, ""), Parameters([], ""), 1, {}), False)
            except Refusal as refusal:
                self.refused.append((node, refusal.code))
                replies.append(Message(Error(code=1, reason=refusal.public_reason),
                                       reply_to=msg))
                continue
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(result, False)
            replies.append(Message(content, reply_to=msg))
        return replies


class Capture(FedAvg):
    def __init__(self) -> None:
        super().__init__(fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                         initial_parameters=ndarrays_to_parameters(
                             [np.zeros(s) for s in SHAPES]))
        self.mean: list[np.ndarray] | None = None

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.mean = to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}


def _run(grid: StageGrid, shares: int, threshold: int) -> Capture:
    strategy = Capture()
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = SecAggPlusWorkflow(shares, threshold, max_weight=1.0, clipping_range=C_RANGE,
                                  quantization_range=Q_RANGE, modulus_range=MODULUS)
    DefaultWorkflow(fit_workflow=workflow, evaluate_workflow=lambda g, c: None)(grid, legacy)
    return strategy


def _encoded(rng: np.random.Generator, low: int = 0) -> list[np.ndarray]:
    # Values anywhere around the offset, noise included: one device's may be
    # negative, as long as the sum is not (else it wraps: accuracy, not privacy).
    return [rng.integers(low, 2 * Q_RANGE, size=s).astype(np.int64) for s in SHAPES]


def _decoded_mean(encoded: list[list[np.ndarray]]) -> list[np.ndarray]:
    gamma = Q_RANGE / (2 * C_RANGE)
    return [np.mean([e[i] / gamma - C_RANGE for e in encoded], axis=0)
            for i in range(len(SHAPES))]


@pytest.mark.parametrize(("t", "shares", "threshold", "drop"),
                         [(2, 3, 2, None), (3, 5, 3, None), (2, 3, 2, Stage.UNMASK),
                          (2, 3, 2, Stage.COLLECT_MASKED_VECTORS)])
def test_flower_workflow_decodes_the_mean_of_what_the_daemons_encoded(
    t: int, shares: int, threshold: int, drop: str | None
) -> None:
    rng = np.random.default_rng(1)
    nodes = [11, 12, 13]
    encoded = {n: _encoded(rng, low=Q_RANGE if n == 11 else -Q_RANGE // 4) for n in nodes}
    grid = StageGrid({n: SecAggStages(t) for n in nodes}, encoded)
    if drop is not None:
        grid.drop_at[13] = drop
    strategy = _run(grid, shares, threshold)
    assert strategy.mean is not None and not grid.refused
    # A device that drops after sending its masked vector is still in the sum.
    summed = nodes[:2] if drop == Stage.COLLECT_MASKED_VECTORS else nodes
    for got, want in zip(strategy.mean, _decoded_mean([encoded[n] for n in summed]), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_every_session_ends_after_unmask() -> None:
    rng = np.random.default_rng(2)
    daemons = {n: SecAggStages(2) for n in (1, 2, 3)}
    _run(StageGrid(dict(daemons), {n: _encoded(rng) for n in daemons}), 3, 2)
    assert all(len(d) == 0 for d in daemons.values())


@pytest.mark.parametrize(("sample", "shares", "threshold"), [(2, 3, 3), (3, 3, 2), (3, 4, 2)])
def test_setup_below_the_policy_or_at_half_is_refused(
    sample: int, shares: int, threshold: int
) -> None:
    stages = SecAggStages(3)
    with pytest.raises(Refusal) as refused:
        stages.setup(SessionKey("r", 1, 1), _setup(sample, shares, threshold))
    assert refused.value.code == "secagg-below-threshold"
    assert refused.value.public_reason == "refused by device policy: secagg-below-threshold"
    assert len(stages) == 0


def test_setup_with_a_weight_other_than_one_is_refused() -> None:
    with pytest.raises(Refusal, match="max_weight"):
        SecAggStages(2).setup(SessionKey("r", 1, 1), _setup(3, 3, 2, max_weight=1000.0))


def _setup(sample: int, shares: int, threshold: int, max_weight: float = 1.0) -> ConfigRecord:
    return ConfigRecord({
        Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sample, Key.SHARE_NUMBER: shares,
        Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: C_RANGE, Key.TARGET_RANGE: Q_RANGE,
        Key.MOD_RANGE: MODULUS, Key.MAX_WEIGHT: max_weight,
    })


class Trio:
    """Three daemons taken through setup and share-keys by hand (no server)."""

    def __init__(self, t: int = 3) -> None:
        self.ids = [1, 2, 3]
        self.daemons = {n: SecAggStages(t) for n in self.ids}
        self.keys = {n: SessionKey("r", 1, n) for n in self.ids}
        pks = {n: self.daemons[n].setup(self.keys[n], _setup(3, 5 if t == 3 else 3, t))
               for n in self.ids}
        record = {str(n): [pks[n][Key.PUBLIC_KEY_1], pks[n][Key.PUBLIC_KEY_2]]
                  for n in self.ids}
        self.inbox: dict[int, list[tuple[int, bytes]]] = {n: [] for n in self.ids}
        for n in self.ids:
            out = self.daemons[n].share_keys(
                self.keys[n], ConfigRecord({**record, Key.STAGE: Stage.SHARE_KEYS}))
            for dst, ct in zip(cast(list[int], out[Key.DESTINATION_LIST]),
                               cast(list[bytes], out[Key.CIPHERTEXT_LIST]), strict=True):
                self.inbox[dst].append((n, ct))

    def masking(self, n: int, keep: int | None = None) -> ConfigRecord:
        inbox = self.inbox[n][:keep]
        return ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                             Key.SOURCE_LIST: [s for s, _ in inbox],
                             Key.CIPHERTEXT_LIST: [c for _, c in inbox]})

    def mask(self, n: int) -> None:
        masking = self.daemons[n].open_masking(self.keys[n], self.masking(n))
        masking.mask([np.zeros(s, np.int64) for s in SHAPES])


def _unmask(active: list[int], dead: list[int]) -> ConfigRecord:
    return ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                         Key.DEAD_NODE_ID_LIST: dead})


def test_masking_with_too_few_neighbours_shares_is_refused_before_anything_else() -> None:
    trio = Trio(t=3)
    with pytest.raises(Refusal) as refused:
        trio.daemons[1].open_masking(trio.keys[1], trio.masking(1, keep=1))
    assert refused.value.code == "secagg-below-threshold"


@pytest.mark.parametrize(("active", "dead", "code"), [
    ([1, 2], [3], "secagg-below-threshold"),   # fewer than t alive
    ([1, 2, 3], [3], "secagg-protocol"),       # alive and dropped at once
    ([2, 3], [1], "secagg-protocol"),          # this device reported dropped
    ([1, 2, 3, 99], [], "secagg-protocol"),    # not a neighbour
])
def test_unsafe_unmask_is_refused(active: list[int], dead: list[int], code: str) -> None:
    trio = Trio(t=3)
    trio.mask(1)
    with pytest.raises(Refusal) as refused:
        trio.daemons[1].unmask(trio.keys[1], _unmask(active, dead))
    assert refused.value.code == code


def test_a_full_unmask_answers_once() -> None:
    trio = Trio(t=3)
    for n in trio.ids:
        trio.mask(n)
    assert trio.daemons[1].unmask(trio.keys[1], _unmask([1, 2, 3], []))[Key.SHARE_LIST]
    with pytest.raises(Refusal, match="without a setup"):
        trio.daemons[1].unmask(trio.keys[1], _unmask([1, 2, 3], []))


def test_stages_out_of_order_are_refused() -> None:
    stages = SecAggStages(2)
    key = SessionKey("r", 1, 1)
    with pytest.raises(Refusal, match="without a setup"):
        stages.open_masking(key, ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
                                               Key.SOURCE_LIST: [], Key.CIPHERTEXT_LIST: []}))
    trio = Trio(t=2)
    with pytest.raises(Refusal, match="after share_keys"):
        trio.daemons[1].unmask(trio.keys[1], _unmask([1, 2, 3], []))
    trio.mask(1)
    # A second masking, or a new setup once the vector left: a second vector.
    with pytest.raises(Refusal, match="after collect_masked_vectors"):
        trio.daemons[1].open_masking(trio.keys[1], trio.masking(1))
    with pytest.raises(Refusal, match="already sent"):
        trio.daemons[1].setup(trio.keys[1], _setup(3, 3, 2))


def test_forged_share_is_refused() -> None:
    trio = Trio(t=2)
    record = trio.masking(1)
    record[Key.CIPHERTEXT_LIST] = [b"\0" * 64 for _ in trio.inbox[1]]
    with pytest.raises(Refusal, match="does not decrypt"):
        trio.daemons[1].open_masking(trio.keys[1], record)


def test_sessions_expire_and_are_bounded() -> None:
    now = [0.0]
    stages = SecAggStages(2, clock=lambda: now[0])
    for i in range(secagg_stages.MAX_SESSIONS + 5):
        stages.setup(SessionKey("r", i, 1), _setup(3, 3, 2))
    assert len(stages) == secagg_stages.MAX_SESSIONS
    now[0] = secagg_stages.SESSION_TTL_S + 1
    stages.setup(SessionKey("r", 999, 1), _setup(3, 3, 2))
    assert len(stages) == 1


def test_an_exported_session_resumes_in_another_object_and_its_state_machine_holds() -> None:
    # The simulation carries a virtual node's session between Ray actors: the
    # session leaves one SecAggStages (which then knows nothing of it) and the
    # next stage runs in another, with every rule of the state machine intact.
    import pickle

    trio = Trio(t=3)
    key = trio.keys[1]
    session = trio.daemons[1].export_session(key)
    assert session is not None and trio.daemons[1].export_session(key) is None
    with pytest.raises(Refusal, match="without a setup"):
        trio.daemons[1].open_masking(key, trio.masking(1))
    elsewhere = SecAggStages(3)
    elsewhere.import_session(key, pickle.loads(pickle.dumps(session)))
    with pytest.raises(Refusal, match="after share_keys"):
        elsewhere.unmask(key, _unmask([1, 2, 3], []))
    masking = elsewhere.open_masking(key, trio.masking(1))
    masking.mask([np.zeros(s, np.int64) for s in SHAPES])
    with pytest.raises(Refusal, match="after collect_masked_vectors"):
        elsewhere.open_masking(key, trio.masking(1))
