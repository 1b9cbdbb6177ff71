"""Round figures for the ML team: rounds.csv, TensorBoard events, and the progress display."""

from __future__ import annotations

import csv
import io
import struct
import time
from pathlib import Path
from typing import Any

from keystay.server.metrics import CSV_FILE, RoundMetrics, numeric_fields
from keystay.server.progress import RoundProgress

# Today's row shape, then the shape a parallel change moves to: per-device
# accuracy goes away, server-side held-out figures arrive, ε stays.
OLD_ROW: dict[str, Any] = {
    "round": 1, "seconds": 4.5, "devices_sampled": 2, "devices_reported": 2,
    "train_loss_mean": 3.2, "refusals": [], "central_epsilon": None, "delta": 1e-5,
    "checkpoint": "c1.pt",
    "devices": {"dev-a": {"heldout_accuracy": 0.31, "epsilon_total": 0.9, "flags": [],
                          "node": 8488502248447037000},
                "dev-b": {"heldout_accuracy": 0.29, "epsilon_total": 1.1, "flags": ["x"]}},
}
NEW_ROW: dict[str, Any] = {
    "round": 2, "seconds": 3.9, "devices_sampled": 2, "devices_reported": 1,
    "heldout_accuracy": 0.42, "heldout_loss": 2.7, "refusals": [{"node": 1, "reason": "r"}],
    "devices": {"dev-a": {"epsilon_total": 1.4}}, "secagg": True,
}


def test_numeric_fields_flatten_and_skip_non_numbers() -> None:
    values = numeric_fields(OLD_ROW)
    assert values["devices.dev-b.epsilon_total"] == 1.1
    assert values["train_loss_mean"] == 3.2
    assert "central_epsilon" not in values and "checkpoint" not in values
    assert "devices.dev-a.node" not in values  # an id, not a measurement
    assert "secagg" not in numeric_fields(NEW_ROW)  # a bool is not a metric
    assert numeric_fields({"x": float("nan"), "y": float("inf")}) == {}


def test_csv_takes_whatever_fields_each_round_has(tmp_path: Path) -> None:
    metrics = RoundMetrics(tmp_path)
    metrics.add(OLD_ROW)
    metrics.add(NEW_ROW)
    metrics.close()
    with (tmp_path / CSV_FILE).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert next(iter(rows[0])) == "round"
    assert rows[0]["devices.dev-a.heldout_accuracy"] == "0.31"
    assert rows[1]["devices.dev-a.heldout_accuracy"] == ""  # gone in round 2
    assert rows[0]["heldout_accuracy"] == "" and rows[1]["heldout_accuracy"] == "0.42"
    assert float(rows[1]["devices.dev-a.epsilon_total"]) == 1.4
    assert not list(tmp_path.glob("*.tmp"))


def _scalars(event_file: Path) -> dict[tuple[str, int], float]:
    """Read the TFRecord framing (length, crc, data, crc) and decode each Event."""
    from tensorboardX.proto.event_pb2 import Event

    data = event_file.read_bytes()
    out: dict[tuple[str, int], float] = {}
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            out[(value.tag, event.step)] = value.simple_value
    return out


def test_tensorboard_events_per_round(tmp_path: Path) -> None:
    metrics = RoundMetrics(tmp_path / "run", tmp_path / "tb", "run-x")
    metrics.add(OLD_ROW)
    metrics.add(NEW_ROW)
    metrics.close()
    [event_file] = (tmp_path / "tb" / "run-x").glob("events.out.tfevents.*")
    scalars = _scalars(event_file)
    assert abs(scalars[("device/dev-b/epsilon_total", 1)] - 1.1) < 1e-6
    assert abs(scalars[("round/heldout_accuracy", 2)] - 0.42) < 1e-6
    assert ("round/heldout_accuracy", 1) not in scalars
    assert ("round/round", 1) not in scalars  # the round is the step, not a scalar


def test_plain_progress_prints_rounds_and_waiting_lines() -> None:
    out = io.StringIO()
    with RoundProgress(3, out, connected=lambda: 2, live=False, poll=0.01,
                       heartbeat=0.0) as progress:
        progress.round_done(OLD_ROW, ["  1  round one"])
        line = progress.waiting_line()
    text = out.getvalue()
    assert "  1  round one" in text and "\x1b[" not in text
    assert line.startswith("waiting: round 2 of 3, devices connected 2, last round replies 2/2")


def test_unknown_device_count_is_shown_as_unknown() -> None:
    def broken() -> int:
        raise RuntimeError("SuperLink down")

    with RoundProgress(2, io.StringIO(), connected=broken, live=False, poll=0.01) as progress:
        assert "devices connected ?" in progress.waiting_line()


def test_terminal_progress_draws_a_bar() -> None:
    out = io.StringIO()
    with RoundProgress(3, out, live=True) as progress:
        progress.round_done(OLD_ROW, ["  1  round one"])
    text = out.getvalue()
    assert "rounds done 1/3" in text and "  1  round one" in text and "replies 2/2" in text


def test_activity_inside_a_round_replaces_the_device_count() -> None:
    asked: list[int] = []

    def activity(server_round: int) -> str:
        asked.append(server_round)
        return f"setup 7/9 of round {server_round}"

    with RoundProgress(3, io.StringIO(), activity=activity, live=False,
                       poll=0.01) as progress:
        progress.round_done(OLD_ROW, ["  1  round one"])
        deadline = time.monotonic() + 5
        while "of round 2" not in progress.waiting_line() and time.monotonic() < deadline:
            time.sleep(0.01)
        line = progress.waiting_line()
    assert line.startswith("waiting: round 2 of 3, setup 7/9 of round 2, last round")
    assert "devices connected" not in line and 2 in asked
