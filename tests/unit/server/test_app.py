"""The plain ServerApp, in one process: real ClientApp, stub daemons (conftest).

What it must do since devices stopped answering evaluate messages: send none,
score each round's global model on its own held-out set, weigh every device
the same without reading its example count, and tell a policy refusal from a
device it could not reach.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from keystay.common.model import ModelConfig, initial_weights, read_checkpoint
from keystay.server import app as server_app
from keystay.server.app import (
    FAILED,
    REFUSED,
    UNAVAILABLE,
    RoundLog,
    equal_mean,
    error_kind,
)
from keystay.server.heldout import HELDOUT_SET, HeldoutScore
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.rounds import TABLE_HEADER, format_round
from keystay.server.settings import RunSettings

from .conftest import InProcessGrid

RUN = "plain-unit"


def _run(ledger: ServerLedger, grid: InProcessGrid, **overrides: Any) -> RunSettings:
    values: dict[str, Any] = dict(
        server_dir=Path(ledger.path).parent, run_name=RUN, num_server_rounds=2,
        min_devices=len(grid.nodes), round_timeout=5.0, privacy_unit="record",
        heldout_employees=1, heldout_days=1, heldout_events_per_day=200,
    )
    values.update(overrides)
    settings = RunSettings(**values)
    context = Context(run_id=7, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=settings.as_run_config())
    server_app.main(grid, context)
    return settings


def _rows(settings: RunSettings) -> list[dict[str, Any]]:
    lines = (settings.run_dir / server_app.ROUNDS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------- a run


def test_round_is_scored_by_the_server_and_no_device_is_asked_to_evaluate(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    nodes = make_nodes(3)
    grid = InProcessGrid(nodes)
    settings = _run(ledger, grid, num_server_rounds=1)

    assert MessageType.EVALUATE not in grid.sent_types
    assert set(grid.sent_types) == {MessageType.TRAIN}
    (row,) = _rows(settings)
    assert row["heldout_set"] == HELDOUT_SET
    assert 0.0 <= row["heldout_accuracy"] <= 1.0 and row["heldout_loss"] > 0
    assert row["heldout_windows"] > 0
    assert row["heldout_population"]["employees"] == 1
    assert (row["devices_sampled"], row["devices_answered"], row["devices_reported"]) == (3, 3, 3)
    assert "train_loss_mean" not in row
    for device in row["devices"].values():
        assert device["verified"] and device["epsilon_total"] == pytest.approx(0.5)
        assert not {"train_loss", "num_examples", "heldout_accuracy"} & set(device)


def test_devices_weigh_the_same_whatever_example_count_they_send(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    # The ClientApp sends the constant 1, but its code comes from the server
    # and is not trusted: replies claiming 100, 101 and 102 examples must not
    # change the mean. An example-weighted mean would differ from the equal
    # mean by ~1e-5 here, far above float32 rounding.
    nodes = make_nodes(3)

    def claim_examples(node_id: int, reply: Message) -> None:
        if reply.has_content() and "metrics" in reply.content.metric_records:
            reply.content.metric_records["metrics"]["num-examples"] = node_id

    grid = InProcessGrid(nodes, tamper=claim_examples)
    settings = _run(ledger, grid, num_server_rounds=1)
    start = initial_weights(ModelConfig(), settings.seed)
    final = read_checkpoint(settings.run_dir / "final.pt").weights
    for i, (s, f) in enumerate(zip(start, final, strict=True)):
        updates = [np.asarray(n.daemon.sent[1][i], np.float64) - s for n in nodes.values()]
        np.testing.assert_allclose(np.asarray(f, np.float64) - s, np.mean(updates, axis=0),
                                   atol=1e-6)


def test_unavailable_daemon_is_not_recorded_as_a_refusal(
    task_identity: None, make_nodes: Any, ledger: ServerLedger
) -> None:
    nodes = make_nodes(3, refuse=[1], down=[0])
    settings = _run(ledger, InProcessGrid(nodes), num_server_rounds=1, min_devices=3)
    (row,) = _rows(settings)
    assert [(u["node"], u["code"]) for u in row["unavailable"]] == [
        (101, server_app.ERROR_UNAVAILABLE)
    ]
    assert [r["node"] for r in row["refusals"]] == [102]
    assert row["failed"] == []
    # Only the policy refusal is in the ledger's refusals.
    assert [r.reason for r in ledger.refusals(RUN)] == ["refused: stub policy says no"]
    assert (row["devices_answered"], row["devices_reported"]) == (1, 1)
    table = "\n".join(format_round(row))
    assert "node 101 unavailable:" in table and "node 102 refused:" in table
    assert "declined" not in table


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (server_app.ERROR_REFUSED, REFUSED),
        (server_app.ERROR_UNAVAILABLE, UNAVAILABLE),
        (server_app.ERROR_FAILED, FAILED),
        (ErrorCode.NODE_UNAVAILABLE, UNAVAILABLE),
        (ErrorCode.REPLY_MESSAGE_UNAVAILABLE, UNAVAILABLE),
        (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, FAILED),
        (ErrorCode.UNKNOWN, FAILED),
        (12345, FAILED),
    ],
)
def test_error_kinds(code: int, kind: str) -> None:
    assert error_kind(code) == kind


def test_round_log_files_errors_by_kind_and_carries_the_heldout_figures() -> None:
    log = RoundLog(server_round=4, started=0.0)
    log.record_error(1, server_app.ERROR_REFUSED, "policy: noise below floor")
    log.record_error(2, server_app.ERROR_UNAVAILABLE, "Stream removed (Socket closed)")
    log.record_error(3, server_app.ERROR_FAILED, "boom")
    row = json.loads(log.as_json())
    assert [e["node"] for e in row["refusals"]] == [1]
    assert [e["node"] for e in row["unavailable"]] == [2]
    assert [e["node"] for e in row["failed"]] == [3]
    # Not scored yet: explicit nulls, never a stale figure.
    assert row["heldout_accuracy"] is None and row["heldout_windows"] == 0
    log.heldout = HeldoutScore(accuracy=0.25, loss=3.5, windows=40)
    row = json.loads(log.as_json())
    assert (row["heldout_accuracy"], row["heldout_loss"], row["heldout_windows"]) == (
        0.25, 3.5, 40)
    assert row["heldout_set"] == "server-owned simulated employees"


def test_table_shows_what_the_server_honestly_has() -> None:
    assert "train loss" not in TABLE_HEADER and "held-out" in TABLE_HEADER
    assert "simulated employees" in TABLE_HEADER
    log = RoundLog(server_round=2, started=0.0, devices_sampled=3, devices_answered=2,
                   devices_reported=2)
    log.devices["dev-aaaaaaaaaaaa"] = {"node": 5, "epsilon_total": 1.25, "flags": []}
    log.record_error(9, server_app.ERROR_UNAVAILABLE, "Stream removed (Socket closed)")
    log.heldout = HeldoutScore(accuracy=0.4321, loss=2.5, windows=10)
    lines = format_round(json.loads(log.as_json()))
    assert lines[0].split() == ["2", "3", "2", "2", "0", "1", "0", "0.432", "2.5000"]
    assert "dev-aaaaaaaaaaaa" in lines[1] and "1.250" in lines[1]
    assert lines[2].strip() == "node 9 unavailable: Stream removed (Socket closed)"


def test_equal_mean_ignores_how_much_data_a_device_had() -> None:
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    b = [np.array([3.0, 6.0], np.float32), np.array([[1.0]], np.float32)]
    mean = equal_mean([a, b])
    np.testing.assert_allclose(mean[0], [2.0, 4.0])
    np.testing.assert_allclose(mean[1], [[0.5]])
    assert mean[0].dtype == np.float32


def test_a_reply_without_a_report_is_a_failure_not_a_crash(
    task_identity: None, ledger: ServerLedger
) -> None:
    settings = RunSettings(server_dir=Path(ledger.path).parent, run_name=RUN)
    strategy = server_app.KeystayFedAvg(settings, ledger, ModelConfig())
    sent = Message(RecordDict({}), dst_node_id=42, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = "m1"
    reply = Message(RecordDict({"arrays": ArrayRecord(initial_weights())}), reply_to=sent)
    arrays, _ = strategy.aggregate_train(1, [reply])
    assert arrays is None
    row = json.loads(strategy._round(1).as_json())
    assert [(f["node"], f["code"]) for f in row["failed"]] == [(42, server_app.ERROR_FAILED)]
    assert "report" in row["failed"][0]["reason"]
    assert row["devices_answered"] == 0 and ledger.refusals() == []


def test_a_sampled_device_that_never_replies_is_unavailable(
    task_identity: None, ledger: ServerLedger
) -> None:
    # A ClientApp, SuperNode or daemon SIGKILLed mid-round sends nothing at all
    # (tests/e2e/test_fault_matrix.py); before, the row listed it nowhere.
    settings = RunSettings(server_dir=Path(ledger.path).parent, run_name=RUN,
                           round_timeout=30.0)
    strategy = server_app.KeystayFedAvg(settings, ledger, ModelConfig())
    strategy._sampled = {42, 43}  # what configure_train sent this round
    sent = Message(RecordDict({}), dst_node_id=42, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = "m1"
    reply = Message(RecordDict({"arrays": ArrayRecord(initial_weights())}), reply_to=sent)
    strategy.aggregate_train(1, [reply])
    row = json.loads(strategy._round(1).as_json())
    assert [f["node"] for f in row["failed"]] == [42]
    assert [u["node"] for u in row["unavailable"]] == [43]
    assert "no reply within the round timeout (30 s)" in row["unavailable"][0]["reason"]
    assert "node 43 unavailable: no reply" in "\n".join(format_round(row))
