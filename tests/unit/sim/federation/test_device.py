"""A simulated device answers Federation.Train in-process: the daemon's servicer and core."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.app.user_config import UserConfig

from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy
from keystay.client.requests import train_request
from keystay.client.serde import weights_from_proto
from keystay.common.model import ModelConfig, initial_weights
from keystay.server.settings import RUN_DEFAULTS
from keystay.sim.federation.device import (
    FILLED_MARK,
    TIMINGS_FILE,
    EmployeeData,
    InProcessTrainer,
    RoundAborted,
    SimulatedDevice,
)
from keystay.v1 import device_pb2

#: The plain Train path is the record unit's (employee-day devices answer only
#: through SecAgg+; see test_secagg_stages below).
RECORD = DevicePolicy(privacy_unit="record")


def request(**overrides: object) -> device_pb2.TrainRequest:
    config = {**RUN_DEFAULTS.train_config(), "run-name": "unit", "server-round": 1,
              "local-steps": 2, "privacy-unit": "record", **overrides}
    context = Context(run_id=1, node_id=1, node_config=UserConfig(), state=RecordDict(),
                      run_config=UserConfig())
    return train_request(ConfigRecord(config), initial_weights(ModelConfig(), seed=0), context)


def device(tmp_path: Path, seed: int | None = 7,
           policy: DevicePolicy = RECORD) -> SimulatedDevice:
    employee = EmployeeData(seed=3, role="developer", day_events=(2600, 0, 2600),
                            end_day=date.today() - timedelta(days=1))
    return SimulatedDevice(tmp_path / "dev", employee, policy=policy,
                           trainer=InProcessTrainer(), seed=seed)


def test_a_round_trains_charges_and_signs(tmp_path: Path) -> None:
    dev = device(tmp_path)
    identity = dev.prepare()
    reply = dev.train(request())
    weights = weights_from_proto(reply.weights)
    assert len(weights) == len(initial_weights(ModelConfig(), seed=0))
    assert reply.report.device_id == identity.device_id
    assert reply.report.epsilon_total > 0
    assert (dev.data_dir / FILLED_MARK).exists()
    with Ledger.open(dev.data_dir) as ledger:
        # The empty middle day holds no block; the other two were charged.
        assert len(ledger.totals()) == 2


def test_a_seeded_trainer_gives_the_same_update_for_the_same_round(tmp_path: Path) -> None:
    a, b = device(tmp_path / "a"), device(tmp_path / "b")
    wa = weights_from_proto(a.train(request()).weights)
    wb = weights_from_proto(b.train(request()).weights)
    assert all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


def test_a_refusal_ends_the_call_as_the_daemon_would(tmp_path: Path) -> None:
    dev = device(tmp_path)
    with pytest.raises(RoundAborted) as refused:
        dev.train(request(**{"noise-multiplier": 0.01}))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details().startswith("refused by device policy")
    # A grpc.RpcError like the socket's, so error_reply files it as a policy refusal.
    assert isinstance(refused.value, grpc.RpcError)
    with Ledger.open(dev.data_dir) as ledger:
        assert ledger.totals() == []  # refused before anything was charged


def test_each_call_appends_its_seconds_and_training_seconds(tmp_path: Path) -> None:
    dev = device(tmp_path)
    dev.prepare()
    dev.train(request())
    with pytest.raises(RoundAborted):
        dev.train(request(**{"noise-multiplier": 0.01}))
    lines = [json.loads(x) for x in (dev.data_dir / TIMINGS_FILE).read_text().splitlines()]
    assert [x["call"] for x in lines] == ["train", "train"]
    assert 0 < lines[0]["training_seconds"] <= lines[0]["seconds"]
    assert lines[1]["training_seconds"] == 0  # refused before training
