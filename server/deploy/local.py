"""A whole federation on one machine: SuperLink + N device daemons on loopback.

Used by ``keystay demo`` and by the end-to-end tests. Every part is a real
process started through the ``keystay`` command a person would type, on free
loopback ports, each with its own folder and log. :meth:`LocalFederation.stop`
stops every process it started, by PID, then its process group and every
process that was below it when the stop began, in whatever session (a
SuperLink's SuperExec and ServerApp leave its group; ``keystay server start``
stops them itself, and this is the backstop should it be killed first);
:meth:`LocalFederation.restart_device`
starts a dead device's daemon again, as systemd would (the fault matrix,
tests/e2e/test_fault_matrix.py).

Secure by default, exactly as a real deployment: ``keystay server init``
creates the CA and a TLS certificate for 127.0.0.1, the SuperLink admits
enrolled SuperNodes only, and each device runs ``keystay device enroll``
(verifying the server against the CA, creating its SuperNode key) before the
operator's ``keystay server enroll`` admits it, checking the fingerprint the
device printed. ``insecure=True`` gives the plain-text loopback federation
(no TLS, no node authentication) for comparison and debugging.

It imports nothing from the device side: devices are other processes here,
exactly as they are on employees' machines.

Each device runs single-user (``keystay device run --superlink ...
--accept-server-code-access``): its SuperNode and the ClientApp run as the
same OS user as its daemon, which is no guarantee against the server (see
SECURITY.md). That is acceptable only because these employees are simulated;
:meth:`LocalFederation.start` says so once.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from keystay.common.processes import descendants, stop_processes, terminate_group
from keystay.server.deploy.superlink import (
    ServerConfig,
    executable,
    flower_env,
    free_port,
    wait_for_port,
)

REQUEST_FILE = "enrollment-request.json"  # written by `keystay device enroll`
LEGACY_REQUEST_FILE = "enrollment.json"  # written by the daemon (insecure federations)


class PartFailed(RuntimeError):  # noqa: N818  (public name the demo already catches)
    """A part of the federation did not come up; names the part and its log."""

    def __init__(self, part: str, log: Path, detail: str) -> None:
        super().__init__(f"{part} did not come up: {detail} (log: {log})")
        self.part = part
        self.log = log


@dataclass
class Part:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class LocalDevice:
    name: str
    data_dir: Path
    supernode_port: int
    seed: int
    part: Part | None = None
    fingerprint: str | None = None
    transport: list[str] = field(default_factory=list)  # daemon flags for TLS/node auth

    @property
    def socket(self) -> Path:
        """The federation socket: what the SuperNode's ClientApp reaches."""
        return self.data_dir / "federation.sock"

    @property
    def control_socket(self) -> Path:
        """The employee's control socket (``keystay device status`` etc.)."""
        return self.data_dir / "control.sock"

    @property
    def ca(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    @property
    def auth_key(self) -> Path:
        return self.data_dir / "supernode.key"


@dataclass
class LocalFederation:
    """Start with :meth:`start`, stop with :meth:`stop` (or use ``with``).

    Parameters
    ----------
    root : Path
        Folder for everything: ``server/``, ``devices/NAME/``.
    devices : int
        How many simulated employees.
    simulate_days : int
        Days of simulated history per device (yesterday and before).
    events_per_day : int
        Simulated tokens per day.
    policy_toml : str | None
        A policy written to every device's ``policy.toml`` (None: defaults).
    insecure : bool
        Plain-text loopback federation without node authentication. Default
        False: TLS, enrolled devices only, as in production.
    source : str
        Each daemon's ``--source``: ``"none"`` (train on the simulated
        history only) or ``"simulated"`` (also record live, so that a pause
        shows in ``keystay device status``; the hostile-app test uses it).
    """

    root: Path
    devices: int = 3
    simulate_days: int = 3
    events_per_day: int = 4000
    policy_toml: str | None = None
    startup_timeout: float = 180.0
    insecure: bool = False
    source: str = "none"
    parts: list[Part] = field(default_factory=list)
    device_list: list[LocalDevice] = field(default_factory=list)
    fleet: str = ""
    control_port: int = 0

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def server_ca(self) -> Path:
        return self.server_dir / "tls" / "ca.pem"

    def _keystay(self, *args: str) -> list[str]:
        return [executable("keystay"), *args]

    def _spawn(self, name: str, cmd: list[str], log: Path) -> Part:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=flower_env(), start_new_session=True,
            )
        part = Part(name, process, log)
        self.parts.append(part)
        return part

    def _run(self, part: str, *args: str) -> str:
        result = subprocess.run(self._keystay(*args), capture_output=True, text=True,
                                env=flower_env(), check=False, timeout=300)
        if result.returncode != 0:
            log = self.root / f"{part}.log"
            log.write_text(result.stdout + result.stderr)
            raise PartFailed(part, log, (result.stderr or result.stdout).strip()[-400:])
        return result.stdout

    # ------------------------------------------------------------------ server

    def start_server(self, progress: object = None) -> Part:
        """``keystay server init`` (first time only) and ``keystay server start``."""
        say = progress if callable(progress) else (lambda _msg: None)
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.server_dir / "server.toml").exists():
            self.fleet = f"127.0.0.1:{free_port()}"
            self.control_port = free_port()
            self._run("server init", "server", "init", "--dir", str(self.server_dir),
                      "--fleet-address", self.fleet, "--control-port", str(self.control_port),
                      "--host", "127.0.0.1", *(["--insecure"] if self.insecure else []))
        else:
            config = ServerConfig.load(self.server_dir)
            self.fleet, self.control_port = config.fleet_address, config.control_port
        mode = "INSECURE" if self.insecure else "TLS, enrolled devices only"
        say(f"starting the SuperLink (fleet {self.fleet}, {mode})")
        log = self.server_dir / "logs" / "server-start.log"
        # The log is appended to across restarts: only this start's "ready" counts.
        offset = log.stat().st_size if log.exists() else 0
        link = self._spawn("SuperLink", self._keystay("server", "start", "--dir",
                                                      str(self.server_dir)), log)
        alive = lambda: link.alive  # noqa: E731
        if not (wait_for_port(self.fleet, self.startup_timeout, alive)
                and wait_for_port(f"127.0.0.1:{self.control_port}", self.startup_timeout,
                                  alive)):
            raise PartFailed("SuperLink", self.server_dir / "logs" / "superlink.out",
                             "its ports did not open")
        # `keystay server start` says "ready" once its own checks passed.
        deadline = time.monotonic() + self.startup_timeout
        while b"ready:" not in link.log.read_bytes()[offset:]:
            if not link.alive or time.monotonic() > deadline:
                raise PartFailed("SuperLink", link.log, "keystay server start never said ready")
            time.sleep(0.1)
        return link

    def stop_server(self) -> None:
        """Stop the SuperLink only (devices keep running), e.g. to test reconnection."""
        for part in [p for p in self.parts if p.name == "SuperLink"]:
            _stop(part.process)
            self.parts.remove(part)

    # ------------------------------------------------------------------ enrollment

    def enroll_device(self, data_dir: Path, name: str, *, new_key: bool = False) -> str:
        """The real two-sided enrollment; returns the fingerprint both sides agreed on.

        ``keystay device enroll`` on the device (checks the server's TLS
        against the CA, makes the SuperNode key, writes the signed request),
        then ``keystay server enroll --fingerprint`` on the server with the
        fingerprint the device printed, as the operator would read it.
        """
        out = self._run(f"device enroll of {name}", "device", "enroll", "--data", str(data_dir),
                        "--server", self.fleet, "--ca", str(self.server_ca),
                        *(["--new-key"] if new_key else []))
        fingerprint = next(line.split()[1] for line in out.splitlines()
                           if line.startswith("fingerprint "))
        self._run(f"server enroll of {name}", "server", "enroll", "--dir", str(self.server_dir),
                  str(data_dir / REQUEST_FILE), "--name", name, "--fingerprint", fingerprint)
        return fingerprint

    def supernodes(self) -> dict[int, dict[str, Any]]:
        """The SuperLink's node list (``flwr supernode list``): node id -> status etc."""
        from keystay.server.deploy.enrollment import FlwrControl

        return FlwrControl(self.server_dir, ServerConfig.load(self.server_dir)).nodes()

    def wait_online(self, count: int, timeout: float = 120.0) -> dict[int, dict[str, Any]]:
        """Wait until ``count`` SuperNodes are online; returns the node list."""
        deadline = time.monotonic() + timeout
        nodes: dict[int, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            nodes = self.supernodes()
            if sum(n.get("status") == "online" for n in nodes.values()) >= count:
                return nodes
            time.sleep(1.0)
        raise PartFailed("SuperNodes", self.server_dir / "logs" / "superlink.log",
                         f"{count} expected online, nodes: "
                         f"{ {k: v.get('status') for k, v in nodes.items()} }")

    # ------------------------------------------------------------------ devices

    def start(self, progress: object = None) -> None:
        say = progress if callable(progress) else (lambda _msg: None)
        self.start_server(progress)
        say("devices run single-user (--accept-server-code-access): each SuperNode, and the "
            "code the server ships to it, runs as this OS user and could read that device's "
            "data; fine for simulated employees, never for real ones")
        for i in range(self.devices):
            device = LocalDevice(name=f"employee-{i + 1}",
                                 data_dir=self.root / "devices" / f"employee-{i + 1}",
                                 supernode_port=free_port(), seed=i + 1)
            device.data_dir.mkdir(parents=True, exist_ok=True)
            if self.policy_toml is not None:
                (device.data_dir / "policy.toml").write_text(self.policy_toml)
            if self.insecure:
                transport = ["--insecure"]
            else:
                # Enrolled before the daemon starts, so its SuperNode is admitted at once.
                device.fingerprint = self.enroll_device(device.data_dir, device.name)
                say(f"device {device.name} enrolled (fingerprint {device.fingerprint})")
                transport = ["--root-certificates", str(device.ca),
                             "--auth-key", str(device.auth_key)]
            say(f"starting device {device.name} (simulated employee {device.seed}, "
                f"{self.simulate_days} days of history)")
            device.transport = transport
            self._spawn_device(device)
            self.device_list.append(device)

        for device in self.device_list:
            self._wait_device(device)
            if self.insecure:
                self._run(f"enrollment of {device.name}", "server", "enroll", "--dir",
                          str(self.server_dir), str(device.data_dir / LEGACY_REQUEST_FILE),
                          "--name", device.name)
            say(f"device {device.name} is up")

    def _spawn_device(self, device: LocalDevice) -> None:
        device.part = self._spawn(
            device.name,
            self._keystay(
                "device", "run", "--data", str(device.data_dir), "--source", self.source,
                "--simulate-days", str(self.simulate_days),
                "--events-per-day", str(self.events_per_day),
                "--employee-seed", str(device.seed),
                "--superlink", self.fleet, "--accept-server-code-access", *device.transport,
                "--supernode-port", str(device.supernode_port),
            ),
            device.data_dir / "logs" / "daemon.out",
        )

    def restart_device(self, device: LocalDevice) -> None:
        """Start a device's daemon again, as systemd would after it died.

        Same folder, same command line: the store, ledger and keys it finds
        are the ones the dead daemon left. Returns once its sockets are up.
        """
        if device.part is not None:
            if device.part.alive:
                raise RuntimeError(f"device {device.name} is still running")
            self.parts.remove(device.part)
        self._spawn_device(device)
        self._wait_device(device)

    def _wait_device(self, device: LocalDevice) -> None:
        assert device.part is not None
        deadline = time.monotonic() + self.startup_timeout
        ready = [device.socket]  # federation.sock: bound last, so the daemon is up
        if self.insecure:
            ready.append(device.data_dir / LEGACY_REQUEST_FILE)
        while time.monotonic() < deadline:
            if not device.part.alive:
                raise PartFailed(f"device {device.name}", device.part.log,
                                 f"the daemon exited with {device.part.process.returncode}")
            if all(p.exists() for p in ready):
                return
            time.sleep(0.2)
        raise PartFailed(f"device {device.name}", device.part.log, "no socket after "
                         f"{self.startup_timeout:.0f} s")

    def stop(self) -> None:
        """Stop every process this federation started, newest first, by PID."""
        for part in reversed(self.parts):
            _stop(part.process)
        self.parts.clear()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    # The tree first, before any signal: a process whose parent exits leaves it.
    below = descendants(process.pid) if process.poll() is None else []
    # SIGTERM to the process itself: daemons and `keystay server start` stop
    # their own children cleanly; then the whole group, in case anything was
    # left behind, and whatever of the tree outlived both.
    terminate_group(process, timeout, leader_first=True, kill_leftovers=True)
    stop_processes(below, 5.0)
