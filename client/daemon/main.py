"""The long-lived device daemon: store + recorder + two gRPC surfaces + supervision.

One process per employee machine. It never imports torch: training happens in
the warm trainer process it keeps (:class:`~keystay.client.trainer.process.
WarmTrainer`), so the always-on part stays small. Shutdown is clean on
SIGTERM/SIGINT: the SuperNode group, the gRPC servers, the recorder (flushing
its queue) and the trainer are stopped in that order.

Two surfaces on two sockets, because the federation runs code the server
ships:

* ``federation.sock`` serves ``Federation`` (``Train``) to whoever the socket
  mode lets in: this user (0600), or the SuperNode's group with
  ``--socket-group`` (0660; :mod:`~keystay.client.daemon.socket_access`).
* ``control.sock`` serves ``Control`` (status, pause, resume, show, forget,
  export, policy, evaluate) to this uid only, checked per connection with
  ``SO_PEERCRED`` (:mod:`~keystay.client.daemon.control_socket`).

Single-user mode (``--superlink``: the daemon supervises the SuperNode, which
then runs as this same user, and so does the ClientApp code the server ships)
hands server code the data folder and the control socket. The daemon refuses
it (exit :attr:`ExitCode.DEVICE_SERVER_CODE_ACCESS`, before touching anything)
unless ``accept_server_code_access`` says the employee accepts that.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import grpc

from keystay.client.daemon.control_service import ControlServicer
from keystay.client.daemon.control_socket import ControlGate
from keystay.client.daemon.controls import Controls
from keystay.client.daemon.core import DeviceCore
from keystay.client.daemon.service import FederationServicer
from keystay.client.daemon.socket_access import (
    SocketAccessError,
    apply_socket_access,
    socket_umask,
)
from keystay.client.daemon.supernode import SuperNodeConfig, SuperNodeSupervisor
from keystay.client.device_client import (
    CHANNEL_OPTIONS,
    control_socket_path,
    federation_socket_path,
)
from keystay.client.identity import DeviceIdentity
from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy, PolicyError
from keystay.client.store import EventStore, StoreError
from keystay.client.trainer.process import WarmTrainer
from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.common.memory import MemoryReturner
from keystay.v1 import device_pb2_grpc

logger = logging.getLogger("keystay.device")

POLICY_FILE = "policy.toml"
ENROLLMENT_FILE = "enrollment.json"
PID_FILE = "daemon.pid"
#: The control gRPC server's private folder (0700) inside the data folder;
#: only :class:`ControlGate` connects to the socket in it.
CONTROL_PRIVATE_DIR = "control.d"
CONTROL_PRIVATE_SOCKET = "grpc.sock"

SINGLE_USER_REFUSAL = (
    "refusing to join a federation in single-user mode: with --superlink the daemon runs "
    "the Flower SuperNode as your own OS user, and the code the server ships to it (the "
    "ClientApp) could then read and write your data folder and use your controls. Use "
    "the two-user systemd units (docs/deployment.md, 'Device install'), or, if you accept that the "
    "server's code can access your data (a demo, a machine with no real data), add "
    "--accept-server-code-access"
)


@dataclass(frozen=True)
class DaemonOptions:
    """What ``keystay device run`` was asked to do."""

    data_dir: Path
    source: str = "none"  # "pynput", "simulated" or "none"
    policy_file: Path | None = None
    simulate_days: int = 0
    simulate_events_per_day: int = 4000
    employee_seed: int = 0
    superlink: str | None = None
    supernode_port: int = 9094
    insecure: bool = False
    root_certificates: Path | None = None
    auth_private_key: Path | None = None
    federation_socket: Path | None = None
    socket_group: str | None = None
    #: Seconds without a round before the trainer process is stopped; None: never.
    trainer_idle_timeout: float | None = 600.0
    accept_server_code_access: bool = False


class DaemonError(KeystayError):
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = code


def write_enrollment(data_dir: Path, identity: DeviceIdentity) -> Path:
    """The file a server operator enrolls: the device id and its report-signing key."""
    path = data_dir / ENROLLMENT_FILE
    path.write_text(
        json.dumps(
            {
                "format": "keystay-enrollment/1",
                "device_id": identity.device_id,
                "signing_public_key_pem": identity.public_key_pem(),
            },
            indent=2,
        )
    )
    return path


def _open_store(options: DaemonOptions) -> EventStore:
    try:
        store = EventStore.open(options.data_dir)
    except StoreError as error:
        raise DaemonError(ExitCode.DEVICE_STORE, str(error)) from error
    if options.simulate_days and not store.blocks():
        from keystay.sim.employees import fill_store

        end = date.today() - timedelta(days=1)
        written = fill_store(
            store,
            seed=options.employee_seed,
            days=options.simulate_days,
            events_per_day=options.simulate_events_per_day,
            end_day=end,
        )
        logger.info("filled the store with %d simulated events (employee seed %d, %d days)",
                    written, options.employee_seed, options.simulate_days)
    return store


def _start_recorder(options: DaemonOptions, core: DeviceCore, policy: DevicePolicy) -> object:
    from keystay.client.capture.recorder import Recorder
    from keystay.common.tokens import Tokenizer

    tokenizer = Tokenizer(raw_text=policy.raw_text, excluded_apps=policy.excluded_apps)
    recorder = Recorder(core, tokenizer)
    if options.source == "pynput":
        from keystay.client.capture.pynput_backend import (
            CaptureUnavailableError,
            PynputBackend,
            display_problem,
        )

        problem = display_problem()
        if problem is not None:
            raise DaemonError(ExitCode.DEVICE_NO_DISPLAY, problem)
        pynput_backend = PynputBackend(recorder.submit, window_titles=policy.window_titles)
        recorder.start()
        try:
            pynput_backend.start()
        except CaptureUnavailableError as error:
            recorder.stop()
            raise DaemonError(ExitCode.DEVICE_NO_DISPLAY, str(error)) from error
        backend: object = pynput_backend
    else:
        from keystay.sim.employees import SimulatedSource

        simulated = SimulatedSource(options.employee_seed)
        recorder.start()
        simulated.start(recorder.submit)
        backend = simulated
    recorder.backend = backend  # type: ignore[attr-defined]
    return recorder


def _claim(sock: Path) -> None:
    """Remove a stale socket file; refuse if a live daemon answers on it."""
    if not sock.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(sock))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.unlink(missing_ok=True)  # a daemon that died left its file behind
        return
    except OSError as error:
        raise DaemonError(ExitCode.DEVICE_SOCKET, f"cannot use {sock}: {error}") from error
    finally:
        probe.close()
    raise DaemonError(ExitCode.DEVICE_SOCKET,
                      f"another daemon is already serving {sock}; stop it first")


def _grpc_server(workers: int) -> grpc.Server:
    return grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)


def _serve_federation(servicer: FederationServicer, sock: Path, group: str | None) -> grpc.Server:
    _claim(sock)
    server = _grpc_server(4)
    device_pb2_grpc.add_FederationServicer_to_server(servicer, server)
    # Only this OS user (and, with --socket-group, the SuperNode's group) may
    # connect; the umask makes the socket no more open than that from birth.
    old_umask = os.umask(socket_umask(group))
    try:
        server.add_insecure_port(f"unix://{Path(sock).absolute()}")
        server.start()
    finally:
        os.umask(old_umask)
    try:
        apply_socket_access(sock, group)
    except SocketAccessError as error:
        server.stop(0)
        raise DaemonError(ExitCode.DEVICE_SOCKET, str(error)) from error
    return server


def _serve_control(
    servicer: ControlServicer, sock: Path, private_dir: Path
) -> tuple[grpc.Server, ControlGate]:
    """The Control service behind the peer-uid gate (see ``control_socket``)."""
    _claim(sock)
    private_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(private_dir, 0o700)  # an older folder may have been looser
    backend = private_dir / CONTROL_PRIVATE_SOCKET
    backend.unlink(missing_ok=True)
    server = _grpc_server(2)
    device_pb2_grpc.add_ControlServicer_to_server(servicer, server)
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix://{Path(backend).absolute()}")
        server.start()
    finally:
        os.umask(old_umask)
    gate = ControlGate(sock, backend)
    try:
        gate.start()
    except OSError as error:
        server.stop(0)
        raise DaemonError(ExitCode.DEVICE_SOCKET, f"cannot serve {sock}: {error}") from error
    return server, gate


def run_daemon(options: DaemonOptions, stop: threading.Event | None = None) -> ExitCode:
    """Run until SIGTERM/SIGINT (or ``stop`` is set). Returns the exit code."""
    from keystay.common import __version__

    if options.superlink and not options.accept_server_code_access:
        # Before anything is created or opened: a refused start changes nothing.
        raise DaemonError(ExitCode.DEVICE_SERVER_CODE_ACCESS, SINGLE_USER_REFUSAL)
    stop = stop or threading.Event()
    data_dir = options.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    policy_path = options.policy_file or data_dir / POLICY_FILE
    try:
        policy = DevicePolicy.load(policy_path)
    except PolicyError as error:
        raise DaemonError(ExitCode.DEVICE_POLICY, str(error)) from error
    policy_source = (
        str(policy_path) if policy_path.exists() else "built-in defaults (no policy.toml)"
    )

    store = _open_store(options)
    ledger = Ledger.open(data_dir)
    identity = DeviceIdentity.open(data_dir)
    write_enrollment(data_dir, identity)
    # Started now so a broken torch install fails here, with exit 13, not in a
    # round; then stopped after trainer_idle_timeout without rounds (memory).
    trainer = WarmTrainer(idle_timeout=options.trainer_idle_timeout)
    try:
        trainer.start()
    except Exception as error:  # the child's own traceback is in the log
        raise DaemonError(ExitCode.DEVICE_TRAINER,
                          f"the warm trainer did not start: {error}") from error
    core = DeviceCore(data_dir, store, policy, ledger, identity, trainer)
    if policy.retention_days:
        dropped = store.apply_retention(policy.retention_days, date.today())
        if dropped:
            logger.info("retention (%d days) deleted blocks %s", policy.retention_days, dropped)

    recorder = None
    supervisor = None
    servers: list[grpc.Server] = []
    gate: ControlGate | None = None
    sock = options.federation_socket or federation_socket_path(data_dir)
    control_sock = control_socket_path(data_dir)
    private_dir = data_dir / CONTROL_PRIVATE_DIR
    # Only what this daemon created is removed on the way out: a start refused
    # because another daemon serves here must not delete that daemon's sockets.
    owned: list[Path] = []
    try:
        if options.source != "none":
            recorder = _start_recorder(options, core, policy)
        controls = Controls(core, recorder, options.source, __version__,  # type: ignore[arg-type]
                            policy_source=policy_source)
        # Controls first: once federation.sock exists, the daemon is fully up.
        control_server, gate = _serve_control(ControlServicer(controls), control_sock,
                                              private_dir)
        servers.append(control_server)
        owned += [control_sock, private_dir]
        servers.append(_serve_federation(FederationServicer(core, MemoryReturner()), sock,
                                           options.socket_group))
        owned.append(sock)
        (data_dir / PID_FILE).write_text(str(os.getpid()))
        owned.append(data_dir / PID_FILE)
        if options.superlink:
            try:
                supernode_config = SuperNodeConfig(
                    superlink=options.superlink,
                    socket=sock,
                    runtime_port=options.supernode_port,
                    flwr_home=data_dir / "flwr",
                    log_file=data_dir / "logs" / "supernode.log",
                    insecure=options.insecure,
                    root_certificates=options.root_certificates,
                    auth_private_key=options.auth_private_key,
                )
            except ValueError as error:
                raise DaemonError(ExitCode.USAGE, str(error)) from error
            supervisor = SuperNodeSupervisor(supernode_config)
            supervisor.start()
        logger.info("device %s: federation on %s, controls on %s (uid %d only); source: %s",
                    identity.device_id, sock, control_sock, os.geteuid(), options.source)
        _install_signal_handlers(stop)
        stop.wait()
        logger.info("device %s stopping", identity.device_id)
        return ExitCode.OK
    finally:
        if supervisor is not None:
            supervisor.stop()
        if gate is not None:
            gate.stop()
        for server in servers:
            server.stop(grace=5).wait(10)
        if recorder is not None:
            recorder.backend.stop()  # type: ignore[attr-defined]
            if not recorder.stop():  # type: ignore[attr-defined]
                logger.error("the recorder could not write everything it had queued")
        trainer.close()
        core.store.close()
        for leftover in owned:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _install_signal_handlers(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
