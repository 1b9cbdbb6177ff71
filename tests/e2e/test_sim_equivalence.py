"""A simulated device and a real daemon, given the same day, weights, request and seed,
send the same update and charge the same ε (issue 11: the seam is defined once).

The real daemon is ``keystay device run`` in its own process, with its warm
trainer child, answering over its federation socket through the deployment's
ClientApp relay (:func:`keystay.client.secagg.secagg_train`). Its core is
given the test-only seed by a wrapper that binds ``DeviceCore(seed=…)``
before the CLI runs: the daemon's CLI itself has no way to set it (checked in
``tests/unit/client/daemon/test_core.py``). The simulated device is
:class:`~keystay.sim.federation.device.SimulatedDevice` answering through the
virtual node's :func:`~keystay.sim.federation.clientapp.secagg_reply`.

Each answers one round of Flower's unchanged SecAgg+ workflow, beside two
neighbours that send a zero update without noise, so the decoded sum is the
device's own clipped, noised update (masks cancel whatever keys the two
setups drew). Both stores hold the same simulated employee's days.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message

from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy
from keystay.client.secagg import secagg_train
from keystay.client.store import EventStore
from keystay.common.model import ModelConfig, initial_weights
from keystay.server.deploy.superlink import flower_env
from keystay.server.settings import RUN_DEFAULTS
from keystay.sim.employees import fill_store
from keystay.sim.federation.clientapp import secagg_reply
from keystay.sim.federation.device import FILLED_MARK, EmployeeData, SimulatedDevice
from tests.e2e.secagg_grid import Node, NodesGrid, node_context, reports, secagg_round, zero_peer

pytestmark = pytest.mark.e2e

SEED = 20261207
EMPLOYEE = 5

#: Runs the daemon's CLI with its core bound to the test seed (argv[1]).
SEEDED_DAEMON = (
    "import functools, sys\n"
    "import keystay.client.daemon.main as daemon\n"
    "daemon.DeviceCore = functools.partial(daemon.DeviceCore, seed=int(sys.argv.pop(1)))\n"
    "from keystay.cli.main import run\n"
    "sys.argv[0] = 'keystay'\n"
    "run()\n"
)


def _fill(folder: Path) -> None:
    store = EventStore.open(folder)
    try:
        fill_store(store, seed=EMPLOYEE, days=2, events_per_day=2600,
                   end_day=date.today() - timedelta(days=1))
    finally:
        store.close()


def _round(node: Node, node_config: dict[str, Any]) -> tuple[list[np.ndarray], dict[str, Any]]:
    initial = initial_weights(ModelConfig(), seed=0)
    shapes = [tuple(w.shape) for w in initial]
    nodes = {1: node, 2: zero_peer(shapes), 3: zero_peer(shapes)}
    contexts = {n: node_context(n, node_config if n == 1 else None) for n in nodes}
    grid = NodesGrid(nodes, contexts)
    config = {**RUN_DEFAULTS.train_config(), "run-name": "equivalence", "local-steps": 3}
    strategy = secagg_round(grid, initial, config)
    assert strategy.summed == 3 and strategy.mean is not None
    signed = reports(grid)
    assert len(signed) == 1
    return strategy.mean, json.loads(signed[0]["payload-json"])


def _charges(folder: Path) -> list[dict[str, Any]]:
    with Ledger.open(folder) as ledger:
        totals = [asdict(t) for t in ledger.totals()]
    for total in totals:
        total.pop("retired_at"), total.pop("forgotten_at")
    return totals


def _compared(payload: dict[str, Any]) -> dict[str, Any]:
    # What differs by construction: who signed, when, and the digest of the
    # masked bytes (masks come from keys each setup draws afresh).
    return {k: v for k, v in payload.items()
            if k not in ("device_id", "update_sha256", "created")}


def test_a_simulated_device_and_a_real_daemon_send_the_same_update(tmp_path: Path) -> None:
    real, sim = tmp_path / "daemon", tmp_path / "sim"
    for folder in (real, sim):
        folder.mkdir()
        _fill(folder)
    (sim / FILLED_MARK).touch()

    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-c", SEEDED_DAEMON, str(SEED), "device", "run", "--data",
             str(real), "--source", "none"],
            stdout=out, stderr=subprocess.STDOUT, env=flower_env(), start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not (real / "federation.sock").exists():
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "daemon did not come up"
            time.sleep(0.2)

        def relay(msg: Message, context: Context) -> Message:
            reply: Message = secagg_train(msg, context)
            return reply

        real_mean, real_report = _round(relay, {"socket": str(real / "federation.sock")})
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(5)

    employee = EmployeeData(seed=EMPLOYEE, role="developer", day_events=(2600, 2600),
                            end_day=date.today() - timedelta(days=1))
    device = SimulatedDevice(sim, employee, policy=DevicePolicy(), seed=SEED)

    def virtual(msg: Message, context: Context) -> Message:
        return secagg_reply(msg, context, device)

    sim_mean, sim_report = _round(virtual, {})

    # The same clipped, noised update decoded from the secure sum, bit for bit ...
    assert len(sim_mean) == len(real_mean)
    for a, b in zip(sim_mean, real_mean, strict=True):
        assert np.array_equal(a, b)
    assert any(np.any(a != 0) for a in sim_mean)  # something was trained and noised
    # ... and the same charge: each day's ε under both assumptions, in the
    # ledger and in the signed report.
    assert _charges(sim) == _charges(real)
    assert len(_charges(real)) == 2
    assert _compared(sim_report) == _compared(real_report)


def test_a_different_seed_sends_a_different_update(tmp_path: Path) -> None:
    # The comparison above can fail: two seeds give two noise draws.
    means = []
    for seed in (1, 2):
        folder = tmp_path / str(seed)
        folder.mkdir()
        _fill(folder)
        (folder / FILLED_MARK).touch()
        employee = EmployeeData(seed=EMPLOYEE, role="developer", day_events=(2600, 2600),
                                end_day=date.today() - timedelta(days=1))
        device = SimulatedDevice(folder, employee, policy=DevicePolicy(), seed=seed)

        def virtual(msg: Message, context: Context, device: SimulatedDevice = device) -> Message:
            return secagg_reply(msg, context, device)

        means.append(_round(virtual, {})[0])
    assert not all(np.array_equal(a, b) for a, b in zip(*means, strict=True))
