"""A hostile ServerApp and ClientApp, submitted with ``flwr run`` to a real federation.

A :class:`~keystay.server.deploy.local.LocalFederation` (TLS, enrolled devices,
real daemons and SuperNodes, live simulated recording) runs the app in
``tests/adversarial/hostile_app/``: a malicious server's ServerApp, and the
ClientApp it ships to every device, which tries every channel towards the
device's data and sends back what it got (see its module docstring). From
the JSON the ServerApp wrote, and from each device's own status and ledger,
the test asserts that

* every Control RPC name called on the federation socket, under every
  service name, was UNIMPLEMENTED, and the device was neither paused nor
  made to forget (asked on the control socket by the test itself);
* every Train request meant as an exact query was refused with a refusal
  code (INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED) and a
  generic detail, or, where the policy admits it, answered with classified
  fields only (:data:`keystay.client.federation_fields.FIELDS`);
* the ledger charged exactly the accepted requests: no refused one;
* the evaluate message got an error reply (nothing answered Evaluate).

The devices run single-user (``--accept-server-code-access``): the ClientApp
runs as the daemon's uid and so may use ``control.sock`` too. keystay
documents that mode as no guarantee against the server (SECURITY.md), so the
ClientApp only tries read-only calls there, the test records what they
returned and asserts nothing about them; the two-user set-up is what closes
that channel (tests/adversarial/test_surfaces.py covers the uid gate).
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from keystay.client.federation_fields import FIELDS
from keystay.client.ledger.ledger import LEDGER_FILE
from keystay.server.deploy.local import LocalFederation
from keystay.server.deploy.superlink import FEDERATION_NAME, ServerConfig, executable, flower_env
from keystay.server.rounds import run_config_arg

pytestmark = pytest.mark.e2e

APP = Path(__file__).resolve().parent / "hostile_app"
DEVICES = 2
RUN_NAME = "hostile-run"
REFUSED = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED"}
#: Probes the default policy may admit (then only classified fields may come back).
MAY_BE_ADMITTED = {"policy-edge", "seed-field"}
#: A policy refusal's whole detail: the code, never the sentence behind it.
POLICY_DETAIL = re.compile(r"^refused by device policy: [a-z0-9-]+$")


def _status(data: Path) -> dict[str, Any]:
    out = subprocess.run([executable("keystay"), "device", "status", "--data", str(data),
                          "--json"], capture_output=True, text=True, env=flower_env(),
                         check=True, timeout=60)
    return json.loads(out.stdout)


def _kept(status: dict[str, Any], today: str) -> dict[str, int]:
    """Events kept per past day (today's block grows with live recording)."""
    return {b["block"]: int(b.get("events", 0)) for b in status["blocks"] if b["block"] < today}


def _charges(data: Path) -> set[tuple[str, int]]:
    """``(run_id, server_round)`` of every charge in the device's ledger."""
    conn = sqlite3.connect(f"file:{data / LEDGER_FILE}?mode=ro", uri=True)
    try:
        return {(r, int(n)) for r, n in conn.execute(
            "SELECT DISTINCT run_id, server_round FROM charges")}
    finally:
        conn.close()


def _submit(federation: LocalFederation, out: Path) -> subprocess.CompletedProcess[str]:
    """``flwr run`` of the hostile app, as :func:`keystay.server.rounds.start_run` does."""
    home = ServerConfig.load(federation.server_dir).write_flwr_home(federation.server_dir)
    config = {"out": str(out), "nodes": DEVICES, "run-name": RUN_NAME,
              "wait-seconds": 60.0, "round-timeout": 240.0}
    return subprocess.run(
        [executable("flwr"), "run", str(APP), FEDERATION_NAME, "--run-config",
         run_config_arg(config), "--stream"],
        capture_output=True, text=True, env=flower_env(home), stdin=subprocess.DEVNULL,
        check=False, timeout=400,
    )


def _wait_for(path: Path, proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert path.exists(), (
        f"the hostile ServerApp wrote no {path.name}; flwr run said:\n"
        f"{(proc.stdout + proc.stderr)[-3000:]}"
    )
    return json.loads(path.read_text())


def _check_accepted(name: str, entry: dict[str, Any]) -> None:
    unclassified = [f for f in entry["fields"] if f not in FIELDS]
    assert not unclassified, f"{name}: reply fields no one classified: {unclassified}"
    payload = [f"payload.{k}" for k in entry["payload_keys"]]
    payload += [f"payload.blocks[].{k}" for k in entry["payload_blocks_keys"]]
    unclassified = [k for k in payload if k not in FIELDS]
    assert not unclassified, f"{name}: signed payload keys no one classified: {unclassified}"


def test_hostile_apps_find_every_channel_closed(tmp_path: Path) -> None:
    federation = LocalFederation(tmp_path / "fed", devices=DEVICES, simulate_days=2,
                                 events_per_day=2500, source="simulated")
    try:
        federation.start()
        federation.wait_online(DEVICES)
        before = {d.data_dir: _status(d.data_dir) for d in federation.device_list}
        out = tmp_path / "hostile.json"
        proc = _submit(federation, out)
        result = _wait_for(out, proc)
        after = {d.data_dir: _status(d.data_dir) for d in federation.device_list}
        charges = {d.data_dir: _charges(d.data_dir) for d in federation.device_list}
    finally:
        federation.stop()
    print(json.dumps(result, indent=1))  # what each channel returned, for the record
    today = max(b["block"] for s in before.values() for b in s["blocks"])

    nodes = result["nodes"]
    assert len(nodes) == DEVICES, nodes
    seen = set()
    for node, replies in nodes.items():
        train = replies.get("train", {})
        assert "error" not in train, f"node {node}: the hostile ClientApp failed: {train}"
        probes = train["configs"]["probes"]
        # The socket the SuperNode named tells which device this node is.
        data = Path(probes["socket"]).parent
        assert data in charges and data not in seen, (data, list(charges))
        seen.add(data)

        channels = json.loads(probes["channels"])
        federation_calls = {k: v for k, v in channels.items() if k.startswith("federation:")}
        assert len(federation_calls) == 3 * 8, federation_calls
        opened = {k: v for k, v in federation_calls.items() if v["code"] != "UNIMPLEMENTED"}
        assert not opened, f"node {node}: control calls the federation socket served: {opened}"

        trains = json.loads(probes["train"])
        accepted = set()
        for name, entry in trains.items():
            if entry["code"] == "OK":
                assert name in MAY_BE_ADMITTED, f"node {node}: exact query {name} was answered"
                _check_accepted(name, entry)
                accepted.add(int(entry["round"]))
                continue
            assert entry["code"] in REFUSED, f"node {node}: {name} ended with {entry}"
            detail = entry["details"]
            if entry["code"] == "INVALID_ARGUMENT":
                # About the request only: it says nothing of the data.
                assert detail.startswith("invalid request"), (name, detail)
            else:
                assert POLICY_DETAIL.match(detail), f"{name}: detail says too much: {detail!r}"
        # No masked update without the protocol behind it: every SecAgg+ probe
        # is refused with the code only (the default policy's t is 3).
        secagg = json.loads(probes["secagg"])
        assert set(secagg) == {"mask-without-setup", "forged-setup-then-mask",
                               "unmask-without-vector"}, secagg
        for name, calls in secagg.items():
            for call in calls:
                assert call["code"] in REFUSED and call["reply_bytes"] == 0, (name, call)
                assert POLICY_DETAIL.match(call["details"]), (name, call)
        assert secagg["forged-setup-then-mask"][0]["details"].endswith("secagg-below-threshold")
        # The ledger charged exactly the admitted requests: no refused one.
        charged = {r for run, r in charges[data] if run == RUN_NAME}
        assert charged == accepted, f"{data.name}: charged rounds {charged}, admitted {accepted}"

        evaluate = replies.get("evaluate", {})
        assert "error" in evaluate, f"node {node}: evaluate got an answer: {evaluate}"
        tried = json.loads(evaluate["error"]["reason"])
        assert set(tried.values()) == {"UNIMPLEMENTED"}, tried

        # Not paused, nothing forgotten (asked on the control socket by the test).
        assert before[data]["recording"] is True, before[data]
        assert after[data]["recording"] is True, f"{data.name} was paused: {after[data]}"
        assert _kept(after[data], today) == _kept(before[data], today), (
            f"{data.name}: kept days changed: {_kept(before[data], today)} -> "
            f"{_kept(after[data], today)}"
        )
