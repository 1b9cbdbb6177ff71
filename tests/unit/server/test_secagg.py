"""SecAgg+ runs, in one process: the real protocol, the real ClientApp, stub daemons.

The federation is conftest's :class:`InProcessGrid` (run by ``run_secagg``).
These tests check what the e2e test cannot see from outside: the sum the
server computes equals the survivors' updates, what the server received from
each device is masked, the strategy only ever holds the aggregate, and no
device is asked to evaluate anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_proxy import ClientProxy

from keystay.client import secagg as client_secagg
from keystay.client.daemon.secagg_stages import SecAggStages
from keystay.common.model import ModelConfig, initial_weights, read_checkpoint
from keystay.server import app as server_app
from keystay.server import secagg as server_secagg
from keystay.server.heldout import HELDOUT_SET
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.secagg import SecAggFedAvg, run_secagg
from keystay.server.settings import RunSettings

from .conftest import InProcessGrid, Node

RUN = "secagg-unit"
QUANTUM = 2 * server_secagg.CLIPPING_RANGE / server_secagg.QUANTIZATION_RANGE  # one step


def _settings(ledger: ServerLedger, **overrides: Any) -> RunSettings:
    values: dict[str, Any] = dict(
        server_dir=Path(ledger.path).parent,
        run_name=RUN, num_server_rounds=1, min_devices=2, secagg=True,
        secagg_num_shares=3, secagg_reconstruction_threshold=2, round_timeout=5.0,
        # A small held-out population: these tests check plumbing, not accuracy.
        heldout_employees=1, heldout_days=1, heldout_events_per_day=200,
    )
    values.update(overrides)
    return RunSettings(**values)


def _run(ledger: ServerLedger, grid: InProcessGrid, **overrides: Any) -> RunSettings:
    settings = _settings(ledger, **overrides)
    context = Context(run_id=7, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config={})
    run_secagg(grid, context, settings)
    return settings


def _rows(settings: RunSettings) -> list[dict[str, Any]]:
    lines = (settings.run_dir / "rounds.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _expected_mean_update(nodes: list[Node], start: list[np.ndarray]) -> list[np.ndarray]:
    updates = [
        [np.asarray(n, np.float64) - np.asarray(s, np.float64)
         for n, s in zip(node.daemon.sent[1], start, strict=True)]
        for node in nodes
    ]
    return [np.mean(arrays, axis=0) for arrays in zip(*updates, strict=True)]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("drop", [None, Stage.SETUP, Stage.SHARE_KEYS,
                                  Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_server_gets_the_survivors_mean_and_nothing_individual(
    task_identity: None, make_nodes: Any, ledger: ServerLedger, drop: str | None
) -> None:
    nodes = make_nodes(3)
    victim = 102
    grid = InProcessGrid(nodes, drop_at={victim: drop} if drop else {})
    settings = _run(ledger, grid)

    # Who is in the sum: everyone, except a device that left before its masked
    # vector arrived. One that leaves at unmask is in the sum (its neighbours
    # reveal its mask seed).
    summed_ids = sorted(nodes) if drop in (None, Stage.UNMASK) else sorted(set(nodes) - {victim})
    row = _rows(settings)[0]
    assert row["secagg"]["summed_nodes"] == summed_ids
    assert row["secagg"]["aggregate_only"] is True
    assert row["devices_reported"] == len(summed_ids)
    assert row["devices_sampled"] == 3

    start = initial_weights(ModelConfig(), settings.seed)
    final = read_checkpoint(settings.run_dir / "final.pt").weights
    expected = _expected_mean_update([nodes[i] for i in summed_ids], start)
    for s, f, e in zip(start, final, expected, strict=True):
        np.testing.assert_allclose(np.asarray(f, np.float64) - s, e, atol=2 * QUANTUM)
    # The device's training-loss entry is dropped unread: no loss in the row.
    assert "train_loss_mean" not in row
    # The server scored the new model itself, and asked no device to.
    assert row["heldout_set"] == HELDOUT_SET
    assert 0.0 <= row["heldout_accuracy"] <= 1.0 and row["heldout_loss"] > 0
    assert row["heldout_windows"] > 0
    assert MessageType.EVALUATE not in grid.sent_types

    # What the server received from each device in the masking stage: no
    # arrays, and a vector that looks nothing like a quantised update (those
    # sit near R/2, the encoding's zero; masked entries are uniform mod M).
    masked = [reply for stage, reply in grid.received
              if stage == Stage.COLLECT_MASKED_VECTORS and reply.has_content()]
    assert len(masked) == (3 if drop in (None, Stage.UNMASK) else 2)
    for reply in masked:
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        vector = [bytes_to_ndarray(b) for b in cast(list[bytes], configs[Key.MASKED_PARAMETERS])]
        flat = np.concatenate([np.asarray(v, dtype=np.int64).ravel() for v in vector[1:]])
        zero = server_secagg.QUANTIZATION_RANGE // 2
        near_zero_update = np.abs(flat - zero) < server_secagg.QUANTIZATION_RANGE // 8
        assert near_zero_update.mean() < 0.01, "masked vector looks unmasked"
        # ... while the report it carries is the device's, in clear, and verifies.
        metrics = reply.content.config_records["fitres.metrics"]
        assert json.loads(str(metrics["payload-json"]))["run_id"] == RUN
        # Nothing else in clear: every key is classified as a protocol constant.
        from keystay.client.federation_fields import FIELDS

        assert {f"clientapp.secagg.metrics.{k}" for k in metrics} <= FIELDS.keys(), metrics
    for device in row["devices"].values():
        if device["node"] in summed_ids:
            assert device["verified"] and device["epsilon_total"] == pytest.approx(0.5)
        # Nothing per device but what its signed report says.
        assert not {"train_loss", "num_examples", "heldout_accuracy"} & set(device)


def test_row_says_where_the_round_time_went(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    # Each masked-vector reply takes DELAY longer to come back: that time must
    # show in the masking stage, and only there.
    delay = 0.4
    nodes = make_nodes(3)

    def slow_masking(node_id: int, reply: Any) -> None:
        if "fitres.metrics" in reply.content.config_records:
            time.sleep(delay)

    settings = _run(ledger, InProcessGrid(nodes, tamper=slow_masking))
    row = _rows(settings)[0]
    stages = row["stage_seconds"]
    protocol = ("setup", "share_keys", "collect_masked_vectors", "unmask")
    assert set(stages) == {*protocol, "report_checks", "heldout_score"}
    assert all(seconds >= 0 for seconds in stages.values())
    assert stages["collect_masked_vectors"] >= 3 * delay
    assert max(stages[s] for s in protocol) == stages["collect_masked_vectors"]
    # The stages and the scoring after them are parts of the round's time.
    assert sum(stages[s] for s in (*protocol, "heldout_score")) <= row["seconds"] + 0.25


def test_too_few_survivors_halt_the_round_and_keep_the_model(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    nodes = make_nodes(3)
    grid = InProcessGrid(nodes, drop_at={102: Stage.COLLECT_MASKED_VECTORS,
                                         103: Stage.COLLECT_MASKED_VECTORS})
    settings = _run(ledger, grid)
    row = _rows(settings)[0]
    # One survivor cannot be unmasked alone (threshold 2): nothing is released.
    assert row["secagg"]["aggregate_only"] is False
    assert row["devices_reported"] == 0 and row["checkpoint"] == ""
    start = initial_weights(ModelConfig(), settings.seed)
    final = read_checkpoint(settings.run_dir / "final.pt").weights
    for s, f in zip(start, final, strict=True):
        np.testing.assert_array_equal(s, f)
    # The survivor's report was still recorded: its device spent the budget.
    assert [r.device_id for r in ledger.reports(run_id=RUN)] == [nodes[101].device.device_id]


def test_unverifiable_report_keeps_its_update_out_of_the_sum(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    nodes = make_nodes(3)
    ledger.revoke_device(nodes[103].device.device_id)
    settings = _run(ledger, InProcessGrid(nodes))
    row = _rows(settings)[0]
    assert row["secagg"]["summed_nodes"] == [101, 102]
    bad = row["devices"][nodes[103].device.device_id]
    assert not bad["verified"]
    start = initial_weights(ModelConfig(), settings.seed)
    final = read_checkpoint(settings.run_dir / "final.pt").weights
    expected = _expected_mean_update([nodes[101], nodes[102]], start)
    for s, f, e in zip(start, final, expected, strict=True):
        np.testing.assert_allclose(np.asarray(f, np.float64) - s, e, atol=2 * QUANTUM)


def test_refusal_is_recorded_and_the_others_are_summed(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    nodes = make_nodes(3, refuse=[0])
    settings = _run(ledger, InProcessGrid(nodes))
    row = _rows(settings)[0]
    assert row["secagg"]["summed_nodes"] == [102, 103]
    assert [r["reason"] for r in row["refusals"]] == ["refused: stub policy says no"]
    assert [r.reason for r in ledger.refusals(RUN)] == ["refused: stub policy says no"]


def test_unavailable_daemon_is_not_a_refusal(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    nodes = make_nodes(3, down=[0])
    settings = _run(ledger, InProcessGrid(nodes))
    row = _rows(settings)[0]
    assert row["secagg"]["summed_nodes"] == [102, 103]
    assert row["refusals"] == [] and row["failed"] == []
    assert [(u["node"], u["code"]) for u in row["unavailable"]] == [
        (101, server_app.ERROR_UNAVAILABLE)
    ]
    assert ledger.refusals(RUN) == []  # the ledger's refusals are policy decisions only


def test_strategy_refuses_individual_updates(tmp_path: Path, ledger: ServerLedger) -> None:
    settings = _settings(ledger)
    settings.run_dir.mkdir(parents=True)
    model = ModelConfig()
    start = initial_weights(model, 0)
    strategy = SecAggFedAvg(settings, ledger, model, start)
    vector = [np.zeros_like(w) for w in start]

    def fitres() -> FitRes:  # a fresh Parameters object each: individual updates
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), 1, {})

    proxies = [_Proxy(str(i)) for i in range(2)]
    with pytest.raises(RuntimeError, match="individual updates"):
        strategy.aggregate_fit(1, [(proxies[0], fitres()), (proxies[1], fitres())], [])
    shared = fitres()
    new, _ = strategy.aggregate_fit(1, [(proxies[0], shared), (proxies[1], shared)], [])
    assert new is not None


class _Proxy(ClientProxy):
    def __init__(self, cid: str) -> None:
        super().__init__(cid)
        self.node_id = int(cid)

    def get_properties(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_parameters(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def reconnect(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def test_wire_constants_are_the_shared_ones() -> None:
    from keystay.client import app as client_app
    from keystay.common import wire

    assert client_secagg.SECAGG_WEIGHT == server_secagg.MAX_WEIGHT
    for name in ("ERROR_REFUSED", "ERROR_UNAVAILABLE", "ERROR_FAILED"):
        assert getattr(server_app, name) == getattr(client_app, name) == getattr(wire, name)
    assert len({wire.ERROR_REFUSED, wire.ERROR_UNAVAILABLE, wire.ERROR_FAILED}) == 3




def _policy_t3(nodes: dict[int, Node]) -> None:
    for node in nodes.values():
        node.daemon.stages = SecAggStages(3)


def test_devices_with_t3_refuse_a_server_threshold_below_it(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    nodes = make_nodes(3)
    _policy_t3(nodes)
    settings = _run(ledger, InProcessGrid(nodes))  # shares 3, threshold 2
    row = _rows(settings)[0]
    assert row["secagg"]["aggregate_only"] is False and row["devices_reported"] == 0
    assert [r["reason"] for r in row["refusals"]] == [
        "refused by device policy: secagg-below-threshold"] * 3
    assert all(not node.daemon.sent for node in nodes.values())  # nothing trained


def test_with_t3_a_dropout_after_setup_leaves_nothing_aggregated(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    nodes = make_nodes(3)
    _policy_t3(nodes)
    grid = InProcessGrid(nodes, drop_at={103: Stage.COLLECT_MASKED_VECTORS})
    settings = _run(ledger, grid, secagg_num_shares=5, secagg_reconstruction_threshold=3)
    row = _rows(settings)[0]
    assert row["secagg"]["aggregate_only"] is False and row["checkpoint"] == ""
    start = initial_weights(ModelConfig(), settings.seed)
    final = read_checkpoint(settings.run_dir / "final.pt").weights
    for s, f in zip(start, final, strict=True):
        np.testing.assert_array_equal(s, f)
    # Two survivors never hand over the shares that would unmask a sum of two.
    assert not any(stage == Stage.UNMASK for stage, _ in grid.received)
