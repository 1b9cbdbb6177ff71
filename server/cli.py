"""``keystay server`` and ``keystay round``: the ML team's commands.

``keystay server start`` is what systemd supervises, and it owns every
process below it: the SuperLink (its own session, so its process group can be
signalled), the SuperExec the SuperLink starts, and each run's
``flwr-serverapp`` the SuperExec starts. Flower puts the last two in sessions
of their own, out of the SuperLink's group, and a ServerApp whose SuperExec
is gone is nobody's child. So the command is a child subreaper (orphans below
it are re-parented to it), keeps a snapshot of its tree (:class:`_Tree`,
refreshed each second and before any signal, each process with its start
time), and on every way out (SIGTERM or SIGINT, the SuperLink dying, the
SuperExec missing, a failed start) stops the SuperLink's group and then every
process of the snapshot still running: SIGTERM, a bounded wait, SIGKILL
(:func:`keystay.common.processes.stop_processes`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from keystay.common.exitcodes import ExitCode
from keystay.common.files import free_bytes, out_of_space
from keystay.common.processes import (
    KILL_WAIT_S,
    Proc,
    become_subreaper,
    descendants,
    has_child,
    process_table,
    reap_orphans,
    signal_group,
    signal_processes,
    stop_processes,
)
from keystay.server.deploy.superlink import (
    ServerConfig,
    ServerConfigError,
    flower_env,
    wait_for_port,
)
from keystay.server.ledger.ledger import LedgerEnrollmentError, ServerLedgerError
from keystay.server.settings import RECORD_NOISE_MULTIPLIER, RUN_DEFAULTS

if TYPE_CHECKING:
    from keystay.server.rounds import RunOutcome

server_dir_option = click.option(
    "--dir",
    "--server-dir",
    "server_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The server folder (made by `keystay server init`).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def server() -> None:
    """Set up and run the federation server (for the ML team).

    \b
    The server is a Flower SuperLink (devices connect to its Fleet API over
    gRPC with TLS; only enrolled devices are admitted) plus keystay's
    ServerApp, which aggregates device updates with FedAvg and keeps a ledger
    of every signed privacy report.

    \b
      keystay server init --dir srv --host fl.example.com --fleet-address 0.0.0.0:9092
      keystay server start --dir srv
      # on each device: keystay device enroll --server fl.example.com:9092 --ca ca.pem
      keystay server enroll --dir srv --fingerprint XXXX-... enrollment-request.json
      keystay server devices --dir srv
      keystay server revoke --dir srv DEVICE_ID
      keystay round start --server-dir srv --rounds 3
      keystay budget report --server-dir srv
    """


@server.command()
@server_dir_option
@click.option("--host", "hosts", multiple=True, metavar="NAME_OR_IP",
              help="A DNS name or IP address devices dial to reach this server (repeatable). "
              "It goes into the server certificate; localhost, 127.0.0.1 and ::1 always do, "
              "and so does the --fleet-address host unless it is 0.0.0.0.")
@click.option("--fleet-address", default="127.0.0.1:9092", show_default=True,
              help="Where the Fleet API listens for devices (HOST:PORT; 0.0.0.0:PORT for all "
              "interfaces).")
@click.option("--control-port", type=int, default=8000, show_default=True,
              help="Control API port (HTTPS, bound to 127.0.0.1): where runs are submitted and "
              "devices registered. Whoever reaches it controls the federation: never expose it.")
@click.option("--insecure", is_flag=True,
              help="No TLS and no device authentication. Only for loopback demos and tests; "
              "warned about on every start.")
def init(server_dir: Path, hosts: tuple[str, ...], fleet_address: str, control_port: int,
         insecure: bool) -> None:
    """Create (or update) a server folder: CA, TLS certificate, configuration, state.

    \b
    TLS is on by default. The first run creates the folder's CA
    (tls/ca.key, mode 0600, and tls/ca.pem, which every device pins); each
    run issues a fresh server certificate naming every --host, so running it
    again is how you add a name or renew the certificate. The CA is never
    replaced. Devices get tls/ca.pem (public); keep tls/ca.key off the server
    once the certificate is issued if you can.

    Exit codes: 0 written, 20 a --host or the existing TLS files are unusable.
    """
    from keystay.server.deploy.enrollment import Registry
    from keystay.server.deploy.pki import (
        TLS_DIR,
        PKIError,
        cert_info,
        collect_hosts,
        create_ca,
        host_of,
        issue_server_cert,
    )

    server_dir = server_dir.resolve()
    server_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("runs", "logs"):
        (server_dir / sub).mkdir(exist_ok=True)
    config = ServerConfig(fleet_address=fleet_address, control_port=control_port,
                          insecure=insecure, supernode_auth=not insecure,
                          tls_hosts=tuple(hosts))
    host, _, port = fleet_address.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{fleet_address!r}: expected HOST:PORT",
                                 param_hint="--fleet-address")
    if not insecure:
        tls = server_dir / TLS_DIR
        try:
            names = collect_hosts(hosts, host_of(fleet_address), host_of(config.control_address))
            if not (tls / "ca.pem").exists():
                create_ca(tls, server_dir.name)
                click.echo(f"created CA {tls / 'ca.pem'} (key {tls / 'ca.key'}, mode 0600)")
            else:
                click.echo(f"kept CA {tls / 'ca.pem'} (devices pin it)")
            cert, _key = issue_server_cert(tls, names)
        except PKIError as error:
            click.echo(f"keystay server init: {error}", err=True)
            sys.exit(ExitCode.SERVER_CONFIG)
        info = cert_info(cert)
        ca = cert_info(tls / "ca.pem")
        click.echo(f"issued {cert} for {', '.join(info.dns_names + info.ip_addresses)}; "
                   f"valid until {info.not_after:%Y-%m-%d}")
        click.echo(f"CA fingerprint (SHA-256) {ca.fingerprint_sha256}")
    path = config.save(server_dir)
    config.write_flwr_home(server_dir)
    Registry.open(server_dir)
    from keystay.server.ledger.ledger import ServerLedger

    ServerLedger.open(server_dir).close()
    click.echo(f"wrote {path}")
    if insecure:
        click.echo("WARNING: --insecure: no TLS and no device authentication. Any process that "
                   "reaches the Fleet API can join and read the model.", err=True)
    else:
        click.echo(f"give devices {server_dir / 'tls' / 'ca.pem'} and the address they dial, "
                   f"e.g. '{fleet_address if host_of(fleet_address) else 'HOST:' + port}'")


@server.command()
@server_dir_option
def start(server_dir: Path) -> None:
    """Run the SuperLink for this server folder (until Ctrl-C / SIGTERM).

    \b
    TLS on the Fleet API (devices) and on the Control API (flwr CLI,
    loopback), and only enrolled devices admitted, unless the folder was made
    with --insecure (then a warning is printed on every start).

    Prints 'ready' once the Fleet and Control APIs accept connections. When
    it stops, for whatever reason, it stops everything the SuperLink started
    too (its SuperExec, a running run's ServerApp): SIGTERM, then SIGKILL
    for what is left after 15 s.
    Exit codes: 0 stopped, 20 bad server folder or TLS files, 21 SuperLink did
    not come up or died, or its SuperExec died (see DIR/logs/superlink.log),
    26 the SuperLink's state file DIR/superlink.db is damaged or does not
    match the enrolled devices (nothing started; the message says what to
    do). Started without that file while devices are enrolled (it was moved
    aside), it registers the enrolled devices' keys again before 'ready'.
    """
    from keystay.server.deploy.superlink_state import (
        SuperLinkStateError,
        check_state,
        needs_reregistering,
    )

    server_dir = server_dir.resolve()
    try:
        config = ServerConfig.load(server_dir)
    except ServerConfigError as error:
        click.echo(f"keystay server: {error}", err=True)
        sys.exit(ExitCode.SERVER_CONFIG)
    errors, warnings = config.tls_problems(server_dir)
    for message in errors:
        click.echo(f"keystay server: {message}", err=True)
    if errors:
        sys.exit(ExitCode.SERVER_CONFIG)
    for message in warnings:
        click.echo(f"WARNING: {message}", err=True)
    if config.insecure:
        click.echo("WARNING: the SuperLink runs WITHOUT TLS and WITHOUT device authentication "
                   "(insecure = true in server.toml): model updates and privacy reports cross "
                   "the network in plain text, and any process that reaches "
                   f"{config.fleet_address} can join.", err=True)
    elif not config.supernode_auth:
        click.echo("WARNING: supernode_auth = false: any SuperNode that trusts this CA can join "
                   "without being enrolled.", err=True)
    try:
        state = check_state(server_dir, config)
    except SuperLinkStateError as error:
        click.echo(f"keystay server: {error}", err=True)
        sys.exit(error.exit_code)
    for message in state.warnings:
        click.echo(f"WARNING: {message}", err=True)
    reregister_devices = not state.exists and needs_reregistering(server_dir, config)
    (server_dir / "logs").mkdir(exist_ok=True)
    log_path = server_dir / "logs" / "superlink.out"
    # The SuperExec and each run's ServerApp leave the SuperLink's session
    # (Flower starts them with start_new_session): as a subreaper, this
    # process adopts them if their parent dies, so they stay in its tree.
    become_subreaper()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            config.superlink_command(server_dir), stdout=log, stderr=subprocess.STDOUT,
            # FLWR_HOME inside the server folder: otherwise the SuperLink and
            # its SuperExec keep app bundles in ~/.flwr, outside what the
            # operator backs up, audits and deletes.
            env=flower_env(server_dir / "flwr"), start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    tree = _Tree(process)
    try:
        _supervise(process, tree, config, server_dir, log_path, reregister_devices)
    finally:
        # Every exit path: nothing the SuperLink started outlives this command.
        _stop_tree(process, tree)


#: Seconds the SuperLink gets between SIGTERM and SIGKILL.
_STOP_GRACE_S = 15.0
#: Seconds the processes it leaves behind get at least, after it has exited.
_LEFTOVER_GRACE_S = 3.0


class _Tree:
    """The processes below ``keystay server start`` as last seen, for stopping them all.

    A snapshot, refreshed every second while the SuperLink runs and once more
    before anything is signalled: a process that leaves the tree (the
    SuperExec and ServerApp when the SuperLink dies, had this command not
    adopted them) is still known by pid and start time, and a process that
    ended drops out of the next refresh.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.procs: dict[int, Proc] = {}
        #: When the SuperLink was told to stop (``time.monotonic``), or None.
        self.stop_asked: float | None = None

    def refresh(self, table: dict[int, Proc] | None = None) -> dict[int, Proc]:
        """Read the tree again, keep what still runs from before; returns the table read."""
        table = process_table() if table is None else table
        procs = {pid: proc for pid, proc in self.procs.items()
                 if (now := table.get(pid)) is not None and now.started == proc.started}
        procs.update((proc.pid, proc) for proc in descendants(os.getpid(), table)
                     if proc.pid != self.process.pid)
        self.procs = procs  # one assignment: a signal handler may read it at any time
        return table


def _supervise(process: subprocess.Popen[bytes], tree: _Tree, config: ServerConfig,
               server_dir: Path, log_path: Path, reregister_devices: bool) -> None:
    """Wait for the SuperLink to come up, say 'ready', and follow it until it stops."""
    from keystay.common.errors import KeystayError
    from keystay.server.deploy.superlink_state import reregister, state_file

    def stop(*_: Any) -> None:
        # Signal only: the main thread is inside process.wait(), and a second wait here
        # would block on Popen's lock until its timeout. A timer escalates to SIGKILL;
        # _stop_tree waits for the rest once the SuperLink has exited.
        if tree.stop_asked is not None:
            return
        tree.refresh()  # before any signal: then the tree is still whole
        tree.stop_asked = time.monotonic()
        signal_group(process, signal.SIGTERM)
        signal_processes(tree.procs.values(), signal.SIGTERM)
        killer = threading.Timer(_STOP_GRACE_S, signal_group, (process, signal.SIGKILL))
        killer.daemon = True
        killer.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    alive = lambda: process.poll() is None  # noqa: E731
    if not (wait_for_port(config.fleet_address, 60, alive)
            and wait_for_port(config.control_address, 60, alive)):
        click.echo(f"keystay server: the SuperLink did not come up; see {log_path}", err=True)
        sys.exit(ExitCode.SERVER_SUPERLINK_DOWN)
    if reregister_devices:
        try:
            names = reregister(server_dir, config)
        except KeystayError as error:
            click.echo(f"keystay server: a new SuperLink state was started, but registering "
                       f"the enrolled devices in it failed: {error}", err=True)
            sys.exit(error.exit_code)
        click.echo(f"{state_file(server_dir)} was new: registered the SuperNode keys of "
                   f"{len(names)} enrolled device(s) again ({', '.join(names)})")
    click.echo(f"ready: fleet {config.fleet_address}, control {config.control_address}"
               f"{' (INSECURE)' if config.insecure else ' (TLS, enrolled devices only)'}")
    sys.stdout.flush()
    code = _watch(process, tree)
    if code is None:
        # The SuperLink lives on without its SuperExec (it died on a full
        # disk, say), and then accepts runs that never start: stop it, so
        # that systemd restarts both.
        click.echo("keystay server: the SuperLink's SuperExec exited, so no run could start; "
                   f"stopped the SuperLink to be restarted; see {log_path}", err=True)
        sys.exit(ExitCode.SERVER_SUPERLINK_DOWN)
    if tree.stop_asked is None:
        click.echo(f"keystay server: the SuperLink exited ({code}); see {log_path}", err=True)
        sys.exit(ExitCode.SERVER_SUPERLINK_DOWN)


def _stop_tree(process: subprocess.Popen[bytes], tree: _Tree) -> None:
    """Stop the SuperLink if it runs, then every process it left, in whatever session.

    The SuperLink's group gets SIGTERM and, after :data:`_STOP_GRACE_S`,
    SIGKILL. The rest of the tree (its SuperExec, the run's ServerApp) had
    SIGTERM when the stop was asked, or gets it now; it has until
    :data:`_STOP_GRACE_S` after that, and at least :data:`_LEFTOVER_GRACE_S`
    after the SuperLink exited, before SIGKILL.
    """
    if tree.stop_asked is None:
        tree.refresh()
        tree.stop_asked = time.monotonic()
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        signal_processes(tree.procs.values(), signal.SIGTERM)
    try:
        process.wait(max(tree.stop_asked + _STOP_GRACE_S - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        signal_group(process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(KILL_WAIT_S)
    tree.refresh()  # orphans adopted since the last look
    grace = max(tree.stop_asked + _STOP_GRACE_S - time.monotonic(), _LEFTOVER_GRACE_S)
    killed = stop_processes(tree.procs.values(), grace)
    reap_orphans(keep=[process.pid])
    if killed:
        names = "; ".join(f"pid {proc.pid} ({proc.cmdline[:80]})" for proc in killed)
        click.echo(f"keystay server: killed what the SuperLink left running and SIGTERM did "
                   f"not stop within {grace:.0f} s: {names}", err=True)


def _watch(process: subprocess.Popen[bytes], tree: _Tree) -> int | None:
    """Wait for the SuperLink to exit (its code), or for its SuperExec to go (None).

    The SuperLink starts its SuperExec a moment after its ports open, so the
    SuperExec is only missed once it has been seen. Each second the tree is
    read again (:class:`_Tree`) and adopted orphans that exited are reaped.
    """
    seen = False
    while True:
        try:
            return process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if tree.stop_asked is not None:
            continue
        table = tree.refresh()
        reap_orphans(keep=[process.pid])
        running = has_child(process.pid, "flower-superexec", table)
        if seen and not running:
            return None
        seen = seen or running


#: Below this much free space, a failed run is put down to a full disk.
_NEARLY_FULL = 1 << 20


def _disk_full(run_dir: Path, errors: list[OSError]) -> bool:
    """Whether a failed run met a full disk: a write here failed for room, or none is left."""
    if any(out_of_space(error) for error in errors):
        return True
    try:
        return free_bytes(run_dir) < _NEARLY_FULL
    except OSError:
        return False


def _say_disk_full(run_name: str, rounds: int, outcome: RunOutcome) -> None:
    """The full-disk message, and the run's last log lines if no file could keep them."""
    try:
        free = f"{free_bytes(outcome.settings.run_dir)} bytes free"
    except OSError:
        free = "free space unknown"
    click.echo(
        f"keystay round: run {run_name} stopped after {len(outcome.rounds)} of {rounds} rounds: "
        f"the server's disk is full ({free} on the file system holding "
        f"{outcome.settings.run_dir}). Checkpoints, rounds.jsonl rows and ledger entries are "
        "written whole or not at all, so what is on disk is consistent; the devices' "
        "charges for this run stay charged. Free space, then start a new run.", err=True)
    if outcome.log_problem:
        click.echo(f"keystay round: {outcome.log_problem}; its last lines:", err=True)
        for line in outcome.log_tail:
            click.echo(f"  {line}", err=True)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if ``keystay server start`` dies (Linux), never orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@server.command()
@server_dir_option
@click.argument("request", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A label for the device (default: its id). Avoid people's names: "
              "labels end up in reports.")
@click.option("--fingerprint", "expect_fingerprint",
              help="The fingerprint the employee read out from 'keystay device enroll'; "
              "nothing is enrolled if the file's differs.")
def enroll(server_dir: Path, request: Path, name: str | None,
           expect_fingerprint: str | None) -> None:
    """Admit a device from its enrollment request (enrollment-request.json).

    \b
    Checks the request (both key proofs, the id), registers the device's
    SuperNode key with the running SuperLink (flwr supernode register), and
    records its report-signing key in the server ledger. Compare the
    fingerprint printed here with the one on the employee's screen, or pass
    it with --fingerprint.

    Exit codes: 0 enrolled (or already), 20 bad server folder, 21 SuperLink not
    running, 23 request refused (the message says why), 24 the ledger cannot
    be read (nothing enrolled).
    """
    from keystay.server.deploy.enrollment import (
        EnrollmentError,
        EnrollmentRequest,
        SuperLinkUnavailableError,
    )
    from keystay.server.deploy.enrollment import enroll as do_enroll

    server_dir = server_dir.resolve()
    try:
        parsed = EnrollmentRequest.load(request)
        outcome = do_enroll(server_dir, parsed, name=name, expect_fingerprint=expect_fingerprint)
    except ServerConfigError as error:
        click.echo(f"keystay server enroll: {error}", err=True)
        sys.exit(ExitCode.SERVER_CONFIG)
    except SuperLinkUnavailableError as error:
        click.echo(f"keystay server enroll: {error}", err=True)
        sys.exit(ExitCode.SERVER_SUPERLINK_DOWN)
    except (EnrollmentError, LedgerEnrollmentError) as error:
        click.echo(f"keystay server enroll: refused: {error}", err=True)
        sys.exit(ExitCode.SERVER_ENROLL_REFUSED)
    except ServerLedgerError as error:
        click.echo(f"keystay server enroll: nothing enrolled: {error}", err=True)
        sys.exit(ExitCode.SERVER_LEDGER)
    entry = outcome.entry
    node = f", SuperLink node {entry.node_id}" if entry.node_id is not None else ""
    if outcome.already:
        click.echo(f"{entry.device_id} ({entry.name}) is already enrolled{node}")
        return
    click.echo(f"enrolled {entry.device_id} as {entry.name}{node}")
    click.echo(f"fingerprint {entry.fingerprint}"
               + ("  (matches)" if expect_fingerprint else "  <- compare with the employee's"))


@server.command()
@server_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def devices(server_dir: Path, as_json: bool) -> None:
    """List enrolled devices: SuperLink node, online or not, revoked or not.

    \b
    status: online / offline (enrolled, not connected now) / registered
    (enrolled, never connected) / revoked / ? (SuperLink not running).
    """
    from keystay.server.deploy.enrollment import device_states

    server_dir = server_dir.resolve()
    try:
        rows, problem = device_states(server_dir)
    except ServerConfigError as error:
        click.echo(f"keystay server devices: {error}", err=True)
        sys.exit(ExitCode.SERVER_CONFIG)
    except ServerLedgerError as error:
        click.echo(f"keystay server devices: {error}", err=True)
        sys.exit(ExitCode.SERVER_LEDGER)
    if problem:
        click.echo(f"note: live status unknown: {problem}", err=True)
    if as_json:
        for row in rows:
            click.echo(json.dumps(row.as_dict()))
        return
    click.echo(f"{'device':<18}{'name':<16}{'node':<22}{'status':<12}enrolled")
    for row in rows:
        node = "-" if row.node_id is None else str(row.node_id)
        click.echo(f"{row.device_id:<18}{row.name[:15]:<16}{node:<22}{row.status:<12}"
                   f"{row.enrolled_at}" + (f"  revoked {row.revoked_at}" if row.revoked_at
                                           else ""))
    if not rows:
        click.echo("no devices enrolled yet")


@server.command()
@server_dir_option
@click.argument("device")
def revoke(server_dir: Path, device: str) -> None:
    """Take a device out of the federation (by device id, name or node id).

    \b
    Its reports stop counting in the ledger at once, and the SuperLink
    unregisters its SuperNode key: a connected SuperNode is dropped and the
    key is refused from then on. Running it again is harmless; do so if the
    SuperLink was down the first time.

    Exit codes: 0 revoked, 20 bad server folder, 21 SuperLink not running (the
    device is revoked in the ledger but the SuperLink still admits it: start
    it and run revoke again), 23 no such device, 24 the ledger cannot be read
    (nothing revoked).
    """
    from keystay.server.deploy.enrollment import (
        EnrollmentError,
        SuperLinkUnavailableError,
    )
    from keystay.server.deploy.enrollment import revoke as do_revoke

    server_dir = server_dir.resolve()
    try:
        outcome = do_revoke(server_dir, device)
    except ServerConfigError as error:
        click.echo(f"keystay server revoke: {error}", err=True)
        sys.exit(ExitCode.SERVER_CONFIG)
    except SuperLinkUnavailableError as error:
        click.echo(f"keystay server revoke: marked revoked in the ledger, but the SuperLink "
                   f"still admits it: {error}", err=True)
        sys.exit(ExitCode.SERVER_SUPERLINK_DOWN)
    except (EnrollmentError, LedgerEnrollmentError) as error:
        click.echo(f"keystay server revoke: {error}", err=True)
        sys.exit(ExitCode.SERVER_ENROLL_REFUSED)
    except ServerLedgerError as error:
        click.echo(f"keystay server revoke: nothing revoked: {error}", err=True)
        sys.exit(ExitCode.SERVER_LEDGER)
    entry = outcome.entry
    click.echo(f"revoked {entry.device_id} ({entry.name}) at {entry.revoked_at}"
               + (f"; SuperLink node {entry.node_id} unregistered" if outcome.unregistered
                  else ""))


@click.group("round", context_settings={"help_option_names": ["-h", "--help"]})
def round_() -> None:
    """Start federated training rounds (for the ML team)."""


@round_.command("start")
@server_dir_option
@click.option("--rounds", type=int, default=RUN_DEFAULTS.num_server_rounds, show_default=True,
              help="Number of rounds (each charges every day a device trains on).")
@click.option("--name", help="Run name (default: run-YYYYmmdd-HHMMSS).")
@click.option("--min-devices", type=int, default=RUN_DEFAULTS.min_devices, show_default=True,
              help="Wait for this many connected devices before each round (employee-day "
                   "rounds need at least each device's min_summed_devices, 3 by default).")
@click.option("--privacy-unit", type=click.Choice(["employee-day", "record"]),
              default=RUN_DEFAULTS.privacy_unit, show_default=True,
              help="What one ε protects. employee-day: a whole day of one employee; devices "
                   "add their own noise and answer only through secure aggregation. record: "
                   "one 33-event window, DP-SGD, plain rounds (devices whose policy says so).")
@click.option("--noise-multiplier", type=float, default=RUN_DEFAULTS.noise_multiplier,
              show_default=True,
              help="σ asked of devices (each enforces its own floor). employee-day: the noise "
                   "the secure sum carries, over --update-clip; record: DP-SGD's σ (the tuned "
                   f"record-level value is {RECORD_NOISE_MULTIPLIER}).")
@click.option("--update-clip", type=float, default=RUN_DEFAULTS.update_clip, show_default=True,
              help="employee-day: each day's update is clipped to this L2 norm C (devices "
                   "enforce their own maximum).")
@click.option("--day-sample-rate", type=float, default=RUN_DEFAULTS.day_sample_rate,
              show_default=True,
              help="employee-day: each eligible day joins a round with this probability, "
                   "drawn in secret on the device.")
@click.option("--max-grad-norm", type=float, default=RUN_DEFAULTS.max_grad_norm, show_default=True,
              help="record: per-sample clip asked of devices (each enforces its own maximum).")
@click.option("--local-steps", type=int, default=RUN_DEFAULTS.local_steps, show_default=True,
              help="Training steps per device per round (employee-day: per day trained).")
@click.option("--sample-rate", type=float, default=RUN_DEFAULTS.sample_rate, show_default=True,
              help="record: Poisson sampling rate q: each of a device's training records joins a "
                   "step's batch with probability q (expected batch q x records). The same "
                   "for every device; devices refuse a q above their policy's ceiling.")
@click.option("--learning-rate", type=float, default=RUN_DEFAULTS.learning_rate, show_default=True,
              help="Adam step size on each device (not a privacy parameter).")
@click.option("--central-dp", is_flag=True,
              help="record: also clip each device update and noise the sum on the server.")
@click.option("--central-noise-multiplier", type=float, default=0.5, show_default=True)
@click.option("--central-clip", type=float, default=1.0, show_default=True)
@click.option("--secagg", is_flag=True,
              help="Secure aggregation (SecAgg+): the server learns only the sum of updates "
                   "(always on for employee-day rounds).")
@click.option("--secagg-num-shares", type=int, default=RUN_DEFAULTS.secagg_num_shares,
              show_default=True,
              help="Devices each device's secrets are shared with (>= 3, and >= each "
                   "device's min_summed_devices).")
@click.option("--secagg-threshold", type=int, default=RUN_DEFAULTS.secagg_reconstruction_threshold,
              show_default=True,
              help="Shares needed to reconstruct (more than half, fewer than all, and >= each "
                   "device's min_summed_devices).")
@click.option("--run-config", "extra", multiple=True,
              help="Any other run config key=value (repeatable), e.g. blocks=\"2026-11-20\".")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write each round's figures as TensorBoard event files in DIR/RUN_NAME "
              "(view with: tensorboard --logdir DIR).")
def round_start(server_dir: Path, rounds: int, name: str | None, min_devices: int,
                privacy_unit: str, noise_multiplier: float, update_clip: float,
                day_sample_rate: float, max_grad_norm: float, local_steps: int,
                sample_rate: float, learning_rate: float, central_dp: bool,
                central_noise_multiplier: float, central_clip: float, secagg: bool,
                secagg_num_shares: int, secagg_threshold: int,
                extra: tuple[str, ...], tensorboard_dir: Path | None) -> None:
    """Submit a run to the SuperLink and follow it round by round.

    \b
    While it waits it shows devices connected, round n of N, replies in and
    time elapsed: a live bar in a terminal, plain lines in a log or pipe.
    Each round's figures (every number in its rounds.jsonl row) also go to
    RUN_DIR/rounds.csv and, with --tensorboard, to TensorBoard.

    \b
    Exit codes: 0 every round completed, 20 bad configuration, 22 the run
    failed or ended early (see RUN_DIR/flwr-run.log), 25 the server's disk is
    full (free space, then start a new run).
    """
    from keystay.server.metrics import RoundMetrics
    from keystay.server.progress import RoundProgress
    from keystay.server.rounds import TABLE_HEADER, connected_devices, format_round, start_run
    from keystay.server.settings import RunSettings, SettingsError

    server_dir = server_dir.resolve()
    values: dict[str, Any] = {
        "server-dir": str(server_dir),
        "run-name": name or datetime.now().strftime("run-%Y%m%d-%H%M%S"),
        "num-server-rounds": rounds,
        "min-devices": min_devices,
        "privacy-unit": privacy_unit,
        "noise-multiplier": noise_multiplier,
        "update-clip": update_clip,
        "day-sample-rate": day_sample_rate,
        "max-grad-norm": max_grad_norm,
        "local-steps": local_steps,
        "sample-rate": sample_rate,
        "learning-rate": learning_rate,
        "central-dp": central_dp,
        "central-noise-multiplier": central_noise_multiplier,
        "central-clip": central_clip,
        "secagg": secagg,
        "secagg-num-shares": secagg_num_shares,
        "secagg-reconstruction-threshold": secagg_threshold,
    }
    for item in extra:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not key=value", param_hint="--run-config")
        values[key.strip()] = _parse_value(raw.strip())
    try:
        settings = RunSettings.from_run_config(values)
    except SettingsError as error:
        click.echo(f"keystay round: {error}", err=True)
        sys.exit(ExitCode.SERVER_CONFIG)
    click.echo(f"run {settings.run_name}: {settings.num_server_rounds} rounds, "
               f"waiting for {settings.min_devices} devices; folder {settings.run_dir}")
    click.echo(TABLE_HEADER)
    started = time.monotonic()
    metrics = RoundMetrics(settings.run_dir, tensorboard_dir, settings.run_name)

    write_errors: list[OSError] = []

    def on_round(row: dict[str, Any]) -> None:
        progress.round_done(row, format_round(row))
        try:
            metrics.add(row)
        except OSError as error:  # a full disk: say so once, keep following the run
            if not write_errors:
                click.echo(f"keystay round: the round figures cannot be written to "
                           f"{metrics.csv_path} ({error.strerror or error})", err=True)
            write_errors.append(error)

    try:
        with RoundProgress(settings.num_server_rounds, sys.stdout,
                           connected=connected_devices(server_dir)) as progress:
            outcome = start_run(server_dir, settings, on_round=on_round)
    finally:
        with contextlib.suppress(OSError):
            metrics.close()
    seconds = time.monotonic() - started
    if outcome.log_error is not None:
        write_errors.append(outcome.log_error)
    if not outcome.ok and _disk_full(settings.run_dir, write_errors):
        _say_disk_full(settings.run_name, settings.num_server_rounds, outcome)
        sys.exit(ExitCode.SERVER_DISK_FULL)
    if not outcome.ok:
        click.echo(f"keystay round: run {settings.run_name} ended after {len(outcome.rounds)} "
                   f"of {settings.num_server_rounds} rounds (flwr exit {outcome.returncode}); "
                   f"see {outcome.log_file}", err=True)
        sys.exit(ExitCode.SERVER_RUN_FAILED)
    delta = next((r["delta"] for r in outcome.rounds if r.get("delta")), None)
    click.echo(f"\n{len(outcome.rounds)} rounds in {seconds:.1f} s. ε is each device's "
               f"cumulative per-block bound" + (f" at δ = {delta:g}." if delta else "."))
    click.echo(f"round figures: {metrics.csv_path}"
               + (f"; TensorBoard: {metrics.tensorboard_dir}" if metrics.tensorboard_dir else ""))
    click.echo(f"final model: {outcome.final_checkpoint}\n"
               "load it with: keystay.common.model.load_checkpoint("
               f"\"{outcome.final_checkpoint}\")")


def _parse_value(raw: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
