"""Supervision of the device's ``flower-supernode``.

The daemon owns the SuperNode: it starts it with the daemon's federation
socket in its ``--node-config`` (the only way the ClientApp learns where to
ask), restarts it when it exits, and stops it (and the SuperExec it spawned)
on shutdown. The SuperNode holds no data and cannot open the store; it is only
the device's connection to the federation. Supervised here it runs as the daemon's own
user, so it (and the ClientApp code the server ships) could read the data
folder: the daemon only does this when the employee accepted it by name
(``--accept-server-code-access``); the two-user systemd units are the set-up
that keeps server code out.

Transport (see ``keystay device enroll``): TLS to the SuperLink, verified
against the server's CA only (``--root-certificates``, the pinned
``DATA/tls/ca.pem``), and node authentication with the device's EC key
(``--auth-supernode-private-key``, OpenSSH format, mode 0600). A SuperNode the
SuperLink refuses (not enrolled, revoked, wrong CA) exits; the supervisor
restarts it with growing back-off, so an enrollment made later or a SuperLink
that restarts is picked up without anyone touching the device.

Supervision ties the SuperNode to the daemon: it runs under
:mod:`keystay.client.daemon.reaper`, which leads the SuperNode's process group
and takes the whole group down when the daemon dies, however it dies. A
restarted daemon never meets an orphaned SuperNode holding its port and
serving rounds through its socket.

Round latency: the SuperNode is started through
:mod:`keystay.client.daemon.supernode_launch` (Flower's own entry point with
a 1 s idle poll instead of 3 s), and its SuperExec with
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` = :data:`SUPEREXEC_POLL` (Flower's
default: 1 s). ``bench/bench_round.py`` measures what a round costs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from keystay.common.processes import terminate_group

logger = logging.getLogger("keystay.device.supernode")

#: Flower's documented variable for the SuperExec's task poll (seconds, default
#: 1.0) and the value keystay's SuperNode runs with: a local loopback call, so
#: idle it costs the laptop little, and a round's ClientApp starts sooner.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL = 0.25

# A SuperNode that keeps dying (bad address, revoked) must not spin the CPU.
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class SuperNodeConfig:
    """How to reach the federation.

    Parameters
    ----------
    superlink : str
        The SuperLink Fleet API address, ``HOST:PORT``.
    socket : Path
        The daemon's federation socket, passed to the ClientApp via node config
        (never the control socket: the ClientApp is code the server ships).
    runtime_port : int
        The SuperNode's local Runtime API port; each SuperNode on one host
        needs its own.
    flwr_home : Path
        Where the SuperNode keeps installed app bundles (per device).
    log_file : Path
        Where its output goes.
    insecure : bool
        Plain-text transport; only for loopback tests and demos. Excludes
        ``root_certificates`` and ``auth_private_key`` (Flower refuses both
        without TLS).
    root_certificates : Path | None
        CA certificate that verifies the SuperLink (TLS). None with TLS means
        the system trust store, which a keystay server's private CA is not in.
    auth_private_key : Path | None
        The SuperNode's EC key for node authentication (mode 0600).

    Raises
    ------
    ValueError
        On construction, for combinations Flower would reject only after
        starting (insecure with a CA or key), and for a key file others can read.
    """

    superlink: str
    socket: Path
    runtime_port: int
    flwr_home: Path
    log_file: Path
    insecure: bool = False
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    extra_node_config: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.insecure and (self.root_certificates or self.auth_private_key):
            raise ValueError(
                "insecure transport cannot be combined with --root-certificates or --auth-key "
                "(the SuperNode would exit at once); drop --insecure to use TLS"
            )
        if self.root_certificates is not None and not self.root_certificates.is_file():
            raise ValueError(f"CA certificate {self.root_certificates} not found; run "
                             "'keystay device enroll' or point --root-certificates at the "
                             "server's ca.pem")
        key = self.auth_private_key
        if key is not None:
            if not key.is_file():
                raise ValueError(f"SuperNode key {key} not found; run 'keystay device enroll'")
            mode = key.stat().st_mode & 0o777
            if mode & 0o077:
                raise ValueError(
                    f"{key} has mode {mode:04o}; whoever can read it can connect as this "
                    f"device. Check who could have, then 'chmod 600 {key}' (or re-enroll "
                    "with a new key)"
                )

    def command(self) -> list[str]:
        node_config = " ".join(
            [f'socket="{self.socket}"']
            + [f'{k}="{v}"' for k, v in sorted(self.extra_node_config.items())]
        )
        cmd = [
            # Flower's own flower-supernode, through keystay's launcher: it only
            # shortens the idle poll (see keystay.client.daemon.supernode_launch).
            sys.executable,
            "-m",
            "keystay.client.daemon.supernode_launch",
            _executable("flower-supernode"),
            "--superlink",
            self.superlink,
            "--port",
            str(self.runtime_port),
            "--node-config",
            node_config,
        ]
        if self.insecure:
            cmd.append("--insecure")
        elif self.root_certificates is not None:
            cmd += ["--root-certificates", str(self.root_certificates)]
        if self.auth_private_key is not None and not self.insecure:
            cmd += ["--auth-supernode-private-key", str(self.auth_private_key)]
        return cmd


def _executable(name: str) -> str:
    # Prefer the one beside this interpreter: the venv's bin is not always on PATH.
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH")
    return found


class SuperNodeSupervisor:
    """Keeps one ``flower-supernode`` running until :meth:`stop`."""

    def __init__(self, config: SuperNodeConfig) -> None:
        self.config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="supernode", daemon=True)
        self.restarts = 0
        self.last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.config.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.config.flwr_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.config.flwr_home)
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        # The SuperExec it starts asks for a ClientApp to launch every 1 s by
        # default; a round's ClientApp then starts up to 1 s late on each device.
        env.setdefault(SUPEREXEC_POLL_ENV, str(SUPEREXEC_POLL))
        # flower-supernode starts flower-superexec, which must be on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        log = self.config.log_file.open("ab")
        try:
            # Through the reaper (keystay.client.daemon.reaper): the group it
            # leads dies with this daemon even when the daemon is SIGKILLed.
            return subprocess.Popen(
                [sys.executable, "-m", "keystay.client.daemon.reaper", *self.config.command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()

    def _supervise(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self._process = self._spawn()
            started = time.monotonic()
            while self._process.poll() is None and not self._stop.wait(0.5):
                pass
            if self._stop.is_set():
                break
            self.last_exit = self._process.returncode
            # Ran for a while: the next failure starts the backoff afresh.
            attempt = 0 if time.monotonic() - started > 60 else attempt + 1
            self.restarts += 1
            delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
            # 305 is Flower's "cannot connect": refused (not enrolled, revoked,
            # untrusted certificate) or unreachable; the reason is in its log.
            logger.warning("flower-supernode exited with %s; restarting in %.0f s (see %s)",
                           self.last_exit, delay, self.config.log_file)
            self._stop.wait(delay)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        process = self._process
        if process is not None and process.poll() is None:
            # The SuperNode, its SuperExec and ClientApps: the whole group.
            terminate_group(process, timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)


