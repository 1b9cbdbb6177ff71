"""Transport and identity, with real processes: TLS, enrolled SuperNodes only, revocation.

Every test starts a real ``flower-superlink`` through ``keystay server init/start``
(TLS + ``--enable-supernode-auth``), enrolls devices with the real commands
(``keystay device enroll`` on the device side, ``keystay server enroll`` with the
fingerprint on the server side, which runs ``flwr supernode register`` over TLS),
and runs real ``flower-supernode`` processes, either once (to see a refusal) or
under the daemon's own :class:`SuperNodeSupervisor` (to see it join, get
dropped, and come back).

"Joined" is checked on the SuperLink's side, with ``flwr supernode list``
(node status ``online``) and ``keystay server devices``. A full training round
needs the whole spine (daemon, trainer, ServerApp); tests/e2e/test_federation.py
covers that over the same secure LocalFederation.

Each test stops what it started, by PID / process group, in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keystay.client.daemon.supernode import SuperNodeConfig, SuperNodeSupervisor
from keystay.server.deploy.enrollment import Registry
from keystay.server.deploy.local import LocalFederation
from keystay.server.deploy.superlink import executable, flower_env, free_port

pytestmark = pytest.mark.e2e

REFUSAL_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """One secure SuperLink for the module (each test uses its own devices)."""
    federation = LocalFederation(tmp_path_factory.mktemp("transport") / "fed", devices=0,
                                 startup_timeout=90)
    try:
        federation.start_server()
        yield federation
    finally:
        federation.stop()


def _keystay(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([executable("keystay"), *args], capture_output=True, text=True,
                            env=flower_env(), timeout=120, check=False)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _config(device: Path, superlink: str, **kw: object) -> SuperNodeConfig:
    return SuperNodeConfig(superlink=superlink, socket=device / "federation.sock",
                           runtime_port=free_port(), flwr_home=device / "flwr",
                           log_file=device / "logs" / "supernode.log",
                           **kw)  # type: ignore[arg-type]


def _secure(device: Path, superlink: str) -> SuperNodeConfig:
    return _config(device, superlink, root_certificates=device / "tls" / "ca.pem",
                   auth_private_key=device / "supernode.key")


def run_supernode_once(config: SuperNodeConfig,
                       timeout: float = REFUSAL_TIMEOUT_S) -> tuple[int | None, str]:
    """Run one ``flower-supernode`` until it exits or ``timeout``; its group is killed after.

    Returns ``(exit code or None if it was still trying, its log)``.
    """
    config.log_file.parent.mkdir(parents=True, exist_ok=True)
    config.flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(config.flwr_home)
    with config.log_file.open("wb") as log:
        process = subprocess.Popen(config.command(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        code: int | None = process.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its SuperExec child too
        process.wait(10)
    return code, config.log_file.read_text()


def _refused(config: SuperNodeConfig) -> str:
    """Run a SuperNode that must be refused: it exits non-zero and never gets a node id."""
    code, log = run_supernode_once(config)
    assert code is not None, f"not refused within {REFUSAL_TIMEOUT_S:.0f} s:\n{log[-2000:]}"
    assert code != 0
    assert "SuperNode ID:" not in log
    return log


def _statuses(fed: LocalFederation) -> dict[int, str]:
    return {node: str(info.get("status")) for node, info in fed.supernodes().items()}


def _node_id(fed: LocalFederation, name: str) -> int:
    entry = next(e for e in Registry.open(fed.server_dir).all() if e.name == name)
    assert entry.node_id is not None
    return entry.node_id


def _wait_status(fed: LocalFederation, node_id: int, wanted: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = _statuses(fed).get(node_id)
        if status == wanted:
            return
        time.sleep(1.0)
    raise AssertionError(f"node {node_id} is {status!r}, not {wanted!r}, after {timeout:.0f} s")


def _devices_json(fed: LocalFederation) -> dict[str, dict[str, object]]:
    out = _keystay("server", "devices", "--dir", str(fed.server_dir), "--json", check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return {str(r["name"]): r for r in rows}


# --------------------------------------------------------------------------- tests


def test_the_superlink_runs_with_tls_and_node_auth(fed: LocalFederation) -> None:
    toml = (fed.server_dir / "server.toml").read_text()
    assert "insecure = false" in toml and "supernode_auth = true" in toml
    out = (fed.server_dir / "logs" / "server-start.log").read_text()
    assert "TLS, enrolled devices only" in out
    assert "WITHOUT TLS" not in out
    # The Control API answers over TLS only: plain HTTP to it gets no HTTP answer.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", fed.control_port, timeout=5)
    try:
        conn.request("GET", "/")
        status = conn.getresponse().status
    except (ConnectionError, http.client.HTTPException, OSError):
        status = None
    finally:
        conn.close()
    assert status in (None, 400), f"plain HTTP to the Control API got HTTP {status}"


def test_an_enrolled_device_joins(fed: LocalFederation, tmp_path: Path) -> None:
    device = tmp_path / "laptop-1"
    fingerprint = fed.enroll_device(device, "laptop-1")
    node_id = _node_id(fed, "laptop-1")
    assert _statuses(fed)[node_id] == "registered"  # enrolled, never connected
    supervisor = SuperNodeSupervisor(_secure(device, fed.fleet))
    try:
        supervisor.start()
        _wait_status(fed, node_id, "online")
        row = _devices_json(fed)["laptop-1"]
        assert row["online"] is True and row["revoked"] is False
        assert row["node_id"] == str(node_id) and row["fingerprint"] == fingerprint
        assert f"SuperNode ID: {node_id}" in (device / "logs" / "supernode.log").read_text()
    finally:
        supervisor.stop()


def test_an_unenrolled_key_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    # The device side runs (key made, server verified), the operator never enrolls it.
    device = tmp_path / "stranger"
    _keystay("device", "enroll", "--data", str(device), "--server", fed.fleet, "--ca",
             str(fed.server_ca), check=True)
    online_before = {n for n, s in _statuses(fed).items() if s == "online"}
    log = _refused(_secure(device, fed.fleet))
    assert "Failed to activate SuperNode" in log
    # Without any key the SuperNode tries to register itself: refused too.
    anonymous = tmp_path / "anonymous"
    (anonymous / "tls").mkdir(parents=True)
    (anonymous / "tls" / "ca.pem").write_bytes(fed.server_ca.read_bytes())
    log = _refused(_config(anonymous, fed.fleet, root_certificates=anonymous / "tls" / "ca.pem"))
    assert "Failed to initialize the connection" in log
    assert {n for n, s in _statuses(fed).items() if s == "online"} == online_before


@pytest.mark.parametrize("trust", ["system-store", "attacker-ca", "plaintext"])
def test_a_device_without_the_ca_cannot_connect(fed: LocalFederation, tmp_path: Path,
                                                trust: str) -> None:
    device = tmp_path / "laptop"
    fed.enroll_device(device, "laptop")  # enrolled: only the trust anchor is wrong
    node_id = _node_id(fed, "laptop")
    if trust == "system-store":
        config = _config(device, fed.fleet, auth_private_key=device / "supernode.key")
    elif trust == "attacker-ca":
        other = tmp_path / "attacker"
        _keystay("server", "init", "--dir", str(other), check=True)
        config = _config(device, fed.fleet, root_certificates=other / "tls" / "ca.pem",
                         auth_private_key=device / "supernode.key")
    else:
        config = _config(device, fed.fleet, insecure=True)
    if trust == "plaintext":
        # No TLS handshake ever completes; Flower keeps retrying "unavailable".
        code, log = run_supernode_once(config, timeout=15.0)
        assert code != 0 and "SuperNode ID:" not in log
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in _refused(config)
    assert _statuses(fed)[node_id] == "registered"  # never came online


def test_a_rogue_superlink_is_refused(fed: LocalFederation, tmp_path: Path) -> None:
    """Someone else's SuperLink (its own CA, a certificate for the same address) answering."""
    device = tmp_path / "laptop"
    fed.enroll_device(device, "laptop")
    rogue = LocalFederation(tmp_path / "rogue", devices=0, startup_timeout=90)
    try:
        rogue.start_server()
        # Enrolling against it with the real CA is stopped before any key is sent.
        out = _keystay("device", "enroll", "--data", str(tmp_path / "new"), "--server",
                       rogue.fleet, "--ca", str(fed.server_ca))
        assert out.returncode == 31, out.stdout + out.stderr
        # The enrolled device's SuperNode, pointed at it, refuses its certificate.
        assert "CERTIFICATE_VERIFY_FAILED" in _refused(_secure(device, rogue.fleet))
        assert not rogue.supernodes()
    finally:
        rogue.stop()


def test_a_revoked_device_is_dropped_and_refused(fed: LocalFederation, tmp_path: Path) -> None:
    device = tmp_path / "laptop-2"
    fed.enroll_device(device, "laptop-2")
    node_id = _node_id(fed, "laptop-2")
    supervisor = SuperNodeSupervisor(_secure(device, fed.fleet))
    try:
        supervisor.start()
        _wait_status(fed, node_id, "online")
        restarts = supervisor.restarts
        out = _keystay("server", "revoke", "--dir", str(fed.server_dir), "laptop-2", check=True)
        assert "unregistered" in out.stdout
        assert _statuses(fed)[node_id] == "unregistered"
        row = _devices_json(fed)["laptop-2"]
        assert row["revoked"] is True and row["status"] == "revoked"
        # The running SuperNode is dropped, and its next connection is refused.
        deadline = time.monotonic() + 90
        log = device / "logs" / "supernode.log"
        while time.monotonic() < deadline:
            if supervisor.restarts >= restarts + 2 and \
                    "Failed to activate SuperNode" in log.read_text():
                break
            time.sleep(1.0)
        else:
            raise AssertionError("the revoked SuperNode was not refused:\n"
                                 + log.read_text()[-2000:])
        assert _statuses(fed)[node_id] == "unregistered"
    finally:
        supervisor.stop()
    # The same request cannot be enrolled again.
    again = _keystay("server", "enroll", "--dir", str(fed.server_dir),
                     str(device / "enrollment-request.json"))
    assert again.returncode == 23
    assert "never admitted again" in again.stderr


def test_the_supernode_reconnects_after_the_superlink_restarts(fed: LocalFederation,
                                                               tmp_path: Path) -> None:
    device = tmp_path / "laptop-3"
    fed.enroll_device(device, "laptop-3")
    node_id = _node_id(fed, "laptop-3")
    supervisor = SuperNodeSupervisor(_secure(device, fed.fleet))
    try:
        supervisor.start()
        _wait_status(fed, node_id, "online")
        fed.stop_server()
        time.sleep(2.0)
        fed.start_server()
        # Same folder, same SQLite state: the enrolled key is still admitted.
        _wait_status(fed, node_id, "online", timeout=120)
        assert supervisor.pid is not None
    finally:
        supervisor.stop()


def test_the_insecure_option_still_works_and_says_so(tmp_path: Path) -> None:
    """``LocalFederation(insecure=True)``: plain text, no node auth, a warning on every start."""
    plain = LocalFederation(tmp_path / "plain", devices=0, insecure=True, startup_timeout=90)
    device = tmp_path / "plain-device"
    supervisor = SuperNodeSupervisor(_config(device, "", insecure=True))
    try:
        plain.start_server()
        supervisor.config.superlink = plain.fleet
        log = plain.server_dir / "logs" / "server-start.log"
        assert "WITHOUT TLS" in log.read_text()
        supervisor.start()
        plain.wait_online(1, timeout=90)  # anyone may join: that is what insecure means
        plain.stop_server()
        plain.start_server()
        assert log.read_text().count("WITHOUT TLS") == 2  # warned again on the next start
    finally:
        supervisor.stop()
        plain.stop()
