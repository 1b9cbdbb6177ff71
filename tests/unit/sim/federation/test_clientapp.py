"""The virtual node's ClientApp picks its employee by partition and replies as the deployment's."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy
from keystay.common.model import ModelConfig, initial_weights
from keystay.server.settings import RUN_DEFAULTS
from keystay.sim.federation.clientapp import (
    PARTITION_ID,
    SESSIONS_RECORD,
    Population,
    client_app,
)
from keystay.sim.federation.device import EmployeeData
from keystay.sim.federation.progress import StageTally
from tests.e2e.secagg_grid import (
    Node,
    NodesGrid,
    node_context,
    reports,
    secagg_round,
    superlink_identity,
)


def test_each_partition_is_its_own_employee_and_folder(tmp_path: Path) -> None:
    employees = tuple(EmployeeData(seed=s, role="support", day_events=(100,),
                                   end_day=date(2026, 1, 1)) for s in (11, 12))
    people = Population(tmp_path, employees)
    a, b = people.device(0), people.device(1)
    assert a.employee.seed == 11 and b.employee.seed == 12
    assert a.data_dir != b.data_dir and a.data_dir.parent == tmp_path


def test_the_app_pickles_for_ray_actors(tmp_path: Path) -> None:
    from ray import cloudpickle

    app = client_app(Population(tmp_path, ()))
    assert cloudpickle.loads(cloudpickle.dumps(app)) is not None


def _employee_day_population(tmp_path: Path, count: int) -> Population:
    yesterday = date.today() - timedelta(days=1)
    employees = tuple(EmployeeData(seed=20 + i, role="developer", day_events=(2600, 2600),
                                   end_day=yesterday) for i in range(count))
    return Population(tmp_path, employees, DevicePolicy())  # the default: employee-day


def _virtual_node(app_train: Node, partition: int) -> Node:
    def answer(msg: Message, context: Context) -> Message:
        context.node_config[PARTITION_ID] = partition
        return app_train(msg, context)
    return answer


def _train_function(people: Population) -> Node:
    app = client_app(people)

    def call(msg: Message, context: Context) -> Message:
        reply: Message = app(msg, context)  # dispatched by message type, as Flower does
        return reply
    return call


def test_virtual_nodes_run_secagg_through_the_daemon_stages(tmp_path: Path) -> None:
    # Three employee-day devices answer Flower's unchanged SecAgg+ workflow through
    # the virtual node's ClientApp (the daemon's SecAggStage servicer in-process);
    # every node's context crosses a pickle between stages, as between Ray actors.
    people = _employee_day_population(tmp_path / "devices", 3)
    for i in range(3):
        people.device(i).prepare()
    train = _train_function(people)
    nodes = {100 + i: _virtual_node(train, i) for i in range(3)}
    grid = NodesGrid(nodes, {n: node_context(n) for n in nodes})
    initial = initial_weights(ModelConfig(), seed=0)
    config = {**RUN_DEFAULTS.train_config(), "run-name": "unit", "local-steps": 2}
    strategy = secagg_round(grid, initial, config)
    assert strategy.summed == 3 and strategy.mean is not None
    assert all(np.all(np.isfinite(m)) for m in strategy.mean)
    assert [np.shape(m) for m in strategy.mean] == [np.shape(w) for w in initial]
    signed = reports(grid)
    assert len(signed) == 3
    for i in range(3):
        payload = json.loads(next(r["payload-json"] for r in signed
                                  if r["device-id"] == people.device(i).prepare().device_id))
        assert payload["unit"] == "employee-day"
        with Ledger.open(people.device(i).data_dir) as ledger:
            totals = ledger.totals()
        assert len(totals) == 2  # both days charged, whether sampled or not
    # Sessions are gone from every node's context once unmasked.
    for context in grid.contexts.values():
        assert not dict(context.state.config_records.get(SESSIONS_RECORD, {}))
    # Every answered stage was counted for the driver's progress line.
    assert StageTally(tmp_path / "devices", 3).counts(1) == {
        "setup": 3, "share_keys": 3, "collect_masked_vectors": 3, "unmask": 3}


def test_a_refused_stage_comes_back_as_a_flower_error(tmp_path: Path) -> None:
    people = _employee_day_population(tmp_path / "devices", 3)
    people.device(0).prepare()
    train = _train_function(people)
    # A masking stage with no setup before it: the daemon's state machine refuses.
    configs = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1],
                            Key.DEAD_NODE_ID_LIST: []})
    with superlink_identity():
        msg = Message(RecordDict({RECORD_KEY_CONFIGS: configs}), dst_node_id=1,
                      message_type="train", group_id="1")
    reply = _virtual_node(train, 0)(msg, node_context(1))
    assert reply.has_error()
    assert reply.error.reason == "refused by device policy: secagg-protocol"
    assert StageTally(tmp_path / "devices", 3).counts(1) == {"unmask": 1}  # refusals count
