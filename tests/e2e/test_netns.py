"""A SuperLink and two devices on separate network stacks, talking TLS across them.

The test builds three Linux network namespaces joined by veth pairs on a
bridge inside the server's namespace, with addresses in 10.77.0.0/24, a
network that exists only inside these namespaces (the host has no route to
it)::

    ks-dev1-… 10.77.0.11 ──veth──┐
                                 br0 10.77.0.1  ks-srv-…  (flower-superlink, TLS)
    ks-dev2-… 10.77.0.12 ──veth──┘
    ks-out-…  10.77.0.13 ──veth──  (an intruder with its own key, never enrolled)

The server certificate names 10.77.0.1 (``keystay server init --host``); each
device verifies it with ``keystay device enroll`` from its own namespace, is
enrolled by the operator from the server's namespace (``flwr`` over TLS to the
loopback Control API there), and runs ``flower-supernode`` in its namespace.
Nothing is shared but the wire: this is the deployment, minus the machines.

Needs root and ``ip`` (iproute2); skipped with the reason otherwise. Every
namespace is deleted in a ``finally`` (which also removes its interfaces), and
every process is killed by its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keystay.client.daemon.supernode import SuperNodeConfig
from keystay.server.deploy.superlink import executable, flower_env

pytestmark = pytest.mark.e2e

NET = "10.77.0"
SERVER_IP = f"{NET}.1"
FLEET = f"{SERVER_IP}:9092"


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root to include this test"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"ks-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


_SKIP = _why_no_namespaces()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Namespaces:
    """Three or more namespaces on one bridge; deleted by :meth:`delete`."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    made: list[str] = field(default_factory=list)

    def name(self, role: str) -> str:
        return f"ks-{role}-{self.tag}"

    def add(self, role: str) -> str:
        ns = self.name(role)
        _ip("netns", "add", ns)
        self.made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def server(self) -> str:
        ns = self.add("srv")
        _ip("-n", ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", ns, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        _ip("-n", ns, "link", "set", "br0", "up")
        return ns

    def device(self, role: str, host: int) -> str:
        ns = self.add(role)
        # veth names: at most 15 characters, unique on the host while in transit.
        inner, outer = f"ksv{self.tag}{role[-1]}a", f"ksv{self.tag}{role[-1]}b"
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", outer, "netns", self.name("srv"))
        _ip("-n", ns, "addr", "add", f"{NET}.{host}/24", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", self.name("srv"), "link", "set", outer, "master", "br0")
        _ip("-n", self.name("srv"), "link", "set", outer, "up")
        return ns

    def delete(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self.made.clear()


class Processes:
    """Processes started in namespaces; each in its own group, killed by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, ns: str, cmd: list[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            # `ip netns exec` execs the command: the PID is the command's own.
            process = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env or flower_env(), start_new_session=True)
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.running):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(15)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if process.poll() is None:
                process.wait(5)
        self.running.clear()


def keystay_in(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, executable("keystay"), *args],
                          capture_output=True, text=True, env=flower_env(), timeout=120,
                          check=False)


@pytest.fixture
def netns() -> Iterator[tuple[Namespaces, Processes]]:
    if _SKIP:
        pytest.skip(_SKIP)
    spaces, procs = Namespaces(), Processes()
    try:
        yield spaces, procs
    finally:
        procs.stop_all()
        spaces.delete()
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                  check=False).stdout
        assert spaces.tag not in leftover, f"namespaces left behind: {leftover}"


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} after {timeout:.0f} s")


def _supernode(device_dir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    config = SuperNodeConfig(superlink=FLEET, socket=device_dir / "federation.sock",
                             runtime_port=port, flwr_home=device_dir / "flwr",
                             log_file=device_dir / "logs" / "supernode.log",
                             root_certificates=device_dir / "tls" / "ca.pem",
                             auth_private_key=device_dir / "supernode.key")
    config.flwr_home.mkdir(parents=True, exist_ok=True)
    return config.command(), flower_env(config.flwr_home)


def test_two_devices_join_a_superlink_in_another_namespace_over_tls(
        netns: tuple[Namespaces, Processes], tmp_path: Path) -> None:
    spaces, procs = netns
    srv_ns = spaces.server()
    devices = {"dev1": spaces.device("dev1", 11), "dev2": spaces.device("dev2", 12)}
    intruder_ns = spaces.device("out3", 13)

    # The private /24 exists only inside the namespaces: no host interface has it, and a
    # device namespace has no other route (no default gateway), so the veth is the only way.
    host_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                                check=True).stdout
    assert f"{NET}." not in host_addrs
    for ns in devices.values():
        routes = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True,
                                check=True).stdout.split("\n")
        assert [r.split()[0] for r in routes if r.strip()] == [f"{NET}.0/24"]

    server_dir = tmp_path / "server"
    init = subprocess.run([executable("keystay"), "server", "init", "--dir", str(server_dir),
                           "--host", SERVER_IP, "--fleet-address", FLEET],
                          capture_output=True, text=True, env=flower_env(), check=False)
    assert init.returncode == 0, init.stderr
    start_log = server_dir / "logs" / "server-start.log"
    link = procs.start(srv_ns, [executable("keystay"), "server", "start", "--dir",
                                str(server_dir)], start_log)
    _wait_for(lambda: link.poll() is not None or "ready:" in start_log.read_text(), 90,
              "the SuperLink did not say ready")
    assert link.poll() is None, start_log.read_text()

    node_ids: dict[str, str] = {}
    for i, (name, ns) in enumerate(devices.items()):
        data = tmp_path / name
        # Device side, from its own namespace: TLS to 10.77.0.1 checked against the CA.
        dev = keystay_in(ns, "device", "enroll", "--data", str(data), "--server", FLEET,
                         "--ca", str(server_dir / "tls" / "ca.pem"))
        assert dev.returncode == 0, dev.stderr
        assert SERVER_IP in dev.stdout  # the certificate names the server's namespace IP
        fingerprint = next(line.split()[1] for line in dev.stdout.splitlines()
                           if line.startswith("fingerprint "))
        # Operator side, from the server's namespace.
        op = keystay_in(srv_ns, "server", "enroll", "--dir", str(server_dir),
                        str(data / "enrollment-request.json"), "--name", name,
                        "--fingerprint", fingerprint)
        assert op.returncode == 0, op.stderr
        cmd, env = _supernode(data, 9094 + i)
        procs.start(ns, cmd, data / "logs" / "supernode.out", env)

    # The intruder has the CA and a key of its own, but was never enrolled.
    intruder = tmp_path / "out3"
    dev = keystay_in(intruder_ns, "device", "enroll", "--data", str(intruder), "--server",
                     FLEET, "--ca", str(server_dir / "tls" / "ca.pem"))
    assert dev.returncode == 0, dev.stderr
    cmd, env = _supernode(intruder, 9099)
    intruder_proc = procs.start(intruder_ns, cmd, intruder / "logs" / "supernode.out", env)

    def states() -> dict[str, dict[str, object]]:
        out = keystay_in(srv_ns, "server", "devices", "--dir", str(server_dir), "--json")
        assert out.returncode == 0, out.stderr
        return {str(r["name"]): r for r in map(json.loads, out.stdout.splitlines())}

    _wait_for(lambda: all(r["status"] == "online" for r in states().values()), 90,
              f"devices not online: {states()}")
    rows = states()
    assert set(rows) == {"dev1", "dev2"}
    node_ids = {name: str(row["node_id"]) for name, row in rows.items()}
    for name in devices:
        log = (tmp_path / name / "logs" / "supernode.out").read_text()
        assert f"SuperNode ID: {node_ids[name]}" in log

    _wait_for(lambda: intruder_proc.poll() is not None, 60, "the intruder was not refused")
    assert intruder_proc.returncode != 0
    intruder_log = (intruder / "logs" / "supernode.out").read_text()
    assert "Failed to activate SuperNode" in intruder_log
    assert "SuperNode ID:" not in intruder_log
