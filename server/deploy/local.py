"""A whole federation on one machine: SuperLink + N device daemons on loopback.

Used by ``keystay demo`` and by the end-to-end tests. Every part is a real
process started through the ``keystay`` command a person would type (server
init/start, device run, server enroll), on free loopback ports, each with its
own folder and log. :meth:`LocalFederation.stop` stops every process it
started, by PID (and process group, which takes the SuperExec and ClientApp
children with it).

It imports nothing from the device side: devices are other processes here,
exactly as they are on employees' machines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from keystay.server.deploy.superlink import executable, flower_env, free_port, wait_for_port


class PartFailed(RuntimeError):
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

    @property
    def socket(self) -> Path:
        return self.data_dir / "device.sock"


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
    """

    root: Path
    devices: int = 3
    simulate_days: int = 3
    events_per_day: int = 4000
    policy_toml: str | None = None
    startup_timeout: float = 180.0
    parts: list[Part] = field(default_factory=list)
    device_list: list[LocalDevice] = field(default_factory=list)

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

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

    def _run(self, part: str, *args: str) -> None:
        result = subprocess.run(self._keystay(*args), capture_output=True, text=True,
                                env=flower_env(), check=False)
        if result.returncode != 0:
            log = self.root / f"{part}.log"
            log.write_text(result.stdout + result.stderr)
            raise PartFailed(part, log, (result.stderr or result.stdout).strip()[-400:])

    def start(self, progress: object = None) -> None:
        say = progress if callable(progress) else (lambda _msg: None)
        self.root.mkdir(parents=True, exist_ok=True)
        fleet = f"127.0.0.1:{free_port()}"
        control_port = free_port()
        self._run("server init", "server", "init", "--dir", str(self.server_dir),
                  "--fleet-address", fleet, "--control-port", str(control_port), "--insecure")
        say(f"starting the SuperLink (fleet {fleet})")
        link = self._spawn("SuperLink", self._keystay("server", "start", "--dir",
                                                      str(self.server_dir)),
                           self.server_dir / "logs" / "server-start.log")
        alive = lambda: link.alive  # noqa: E731
        if not (wait_for_port(fleet, self.startup_timeout, alive)
                and wait_for_port(f"127.0.0.1:{control_port}", self.startup_timeout, alive)):
            raise PartFailed("SuperLink", self.server_dir / "logs" / "superlink.out",
                             "its ports did not open")

        for i in range(self.devices):
            device = LocalDevice(name=f"employee-{i + 1}",
                                 data_dir=self.root / "devices" / f"employee-{i + 1}",
                                 supernode_port=free_port(), seed=i + 1)
            device.data_dir.mkdir(parents=True, exist_ok=True)
            if self.policy_toml is not None:
                (device.data_dir / "policy.toml").write_text(self.policy_toml)
            say(f"starting device {device.name} (simulated employee {device.seed}, "
                f"{self.simulate_days} days of history)")
            device.part = self._spawn(
                device.name,
                self._keystay(
                    "device", "run", "--data", str(device.data_dir), "--source", "none",
                    "--simulate-days", str(self.simulate_days),
                    "--events-per-day", str(self.events_per_day),
                    "--employee-seed", str(device.seed),
                    "--superlink", fleet, "--insecure",
                    "--supernode-port", str(device.supernode_port),
                ),
                device.data_dir / "logs" / "daemon.out",
            )
            self.device_list.append(device)

        for device in self.device_list:
            self._wait_device(device)
            self._run(f"enrollment of {device.name}", "server", "enroll", "--dir",
                      str(self.server_dir), str(device.data_dir / "enrollment.json"),
                      "--name", device.name)
            say(f"device {device.name} is up and enrolled")

    def _wait_device(self, device: LocalDevice) -> None:
        assert device.part is not None
        deadline = time.monotonic() + self.startup_timeout
        enrollment = device.data_dir / "enrollment.json"
        while time.monotonic() < deadline:
            if not device.part.alive:
                raise PartFailed(f"device {device.name}", device.part.log,
                                 f"the daemon exited with {device.part.process.returncode}")
            if device.socket.exists() and enrollment.exists():
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
    if process.poll() is not None:
        return
    # SIGTERM to the process itself: daemons stop their own children cleanly.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    # Then the whole group, in case anything was left behind.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(5)
