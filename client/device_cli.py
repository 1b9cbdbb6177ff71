"""``keystay device``: the employee's commands.

``run`` starts the daemon; every other command talks to the running daemon
over its control socket (``DATA/control.sock``, served to the daemon's own OS
user only), so they work while it records and never open the store
themselves. The federation reaches the daemon on another socket
(``federation.sock``) where none of these commands exist.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import click
import grpc

from keystay.client.control_client import CALL_TIMEOUT_S, EVALUATE_TIMEOUT_S, ControlClient
from keystay.client.device_client import DeviceUnavailableError, control_socket_path
from keystay.common.exitcodes import ExitCode
from keystay.v1 import device_pb2

DEFAULT_DATA = Path(os.environ.get("KEYSTAY_DATA", "~/.local/share/keystay")).expanduser()

data_option = click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA,
    show_default=True,
    envvar="KEYSTAY_DATA",
    help="The device's data folder (store, ledger, keys, policy.toml, control socket).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def device() -> None:
    """Run and control keystay on this computer (for employees).

    \b
    The daemon records your keyboard and mouse as *tokens* (a key class such as
    "letter" or "ctrl+letter", a mouse-move direction, a click) into an
    encrypted store in your data folder. Characters you type are not stored
    unless your policy.toml says raw_text = true. Apps in your policy's
    excluded_apps list produce no tokens at all while focused.

    \b
    What leaves this computer: only model updates computed with differential
    privacy under YOUR policy, and a signed report of the privacy budget (ε)
    each one cost. A request from the server that asks for less noise, a larger
    clip, more steps or more ε than your policy allows is refused.

    \b
    Everyday commands:
      keystay device status              what is recorded, ε spent per day
      keystay device pause --for 30m     stop recording for a while
      keystay device resume              start again
      keystay device show [--day D]      a summary of what is kept (no text)
      keystay device export --day D --out FILE   your data, as JSON
      keystay device forget --day D | --all      delete days (--all destroys the key)
      keystay device policy              what your policy allows, explained
      keystay device evaluate --model F  score a model on your own held-out data
      keystay device ui                  all of the above on a page in your browser
    """


@device.command()
@data_option
@click.option(
    "--source",
    type=click.Choice(["pynput", "simulated", "none"]),
    default="pynput",
    show_default=True,
    help="Where events come from: your real keyboard and mouse (pynput, needs an X11 "
    "session), a simulated employee (demos), or nothing (train on what is kept).",
)
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Policy file (default: DATA/policy.toml; built-in defaults if absent).")
@click.option("--superlink", help="Join a federation: the SuperLink Fleet API, HOST:PORT.")
@click.option("--supernode-port", type=int, default=9094, show_default=True,
              help="Local port of the supervised SuperNode's runtime API (one per device).")
@click.option("--insecure", is_flag=True,
              help="Talk to the SuperLink without TLS (loopback demos and tests only).")
@click.option("--root-certificates", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA certificate that verifies the SuperLink.")
@click.option("--auth-key", "auth_private_key",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The SuperNode's private key for node authentication (from enroll).")
@click.option("--simulate-days", type=int, default=0, show_default=True,
              help="If the store is empty, fill it with this many days of a simulated employee.")
@click.option("--events-per-day", type=int, default=4000, show_default=True,
              help="Simulated events per day (with --simulate-days).")
@click.option("--employee-seed", type=int, default=0, show_default=True,
              help="Which simulated employee (each seed types and clicks differently).")
@click.option("--federation-socket", "federation_socket",
              type=click.Path(dir_okay=False, path_type=Path),
              envvar="KEYSTAY_FEDERATION_SOCKET",
              help="Serve the Federation service (Train, nothing else) here "
              "(default: DATA/federation.sock).")
@click.option("--socket-group",
              help="Let this group connect to the federation socket (mode 0660): the "
              "SuperNode's group when it runs as another OS user (see the systemd units). "
              "The control socket stays yours alone.")
@click.option("--trainer-idle-timeout", type=click.FloatRange(min=0), default=600.0,
              show_default=True,
              help="Stop the trainer process (torch, ~300 MB) after this many seconds without "
              "a round; the next round starts it again in a few seconds. 0 keeps it warm.")
@click.option("--accept-server-code-access", is_flag=True,
              help="With --superlink: accept that the SuperNode, and the code the server "
              "ships to it, run as YOUR user and can read and write your data folder. "
              "Without it, single-user federation is refused (exit 15).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def run(
    data_dir: Path,
    source: str,
    policy_file: Path | None,
    superlink: str | None,
    supernode_port: int,
    insecure: bool,
    root_certificates: Path | None,
    auth_private_key: Path | None,
    simulate_days: int,
    events_per_day: int,
    employee_seed: int,
    federation_socket: Path | None,
    socket_group: str | None,
    trainer_idle_timeout: float,
    accept_server_code_access: bool,
    verbose: bool,
) -> None:
    """Start the device daemon (runs until stopped with Ctrl-C or SIGTERM).

    \b
    It serves two sockets in DATA: control.sock, your controls (status,
    pause, show, export, forget, policy, evaluate), answered for your OS user
    only; and federation.sock, where the federation may ask it to train under
    your policy and nothing else. It keeps a warm trainer process for rounds.

    \b
    With --superlink it also runs and supervises the Flower SuperNode that
    connects this device to the server. That SuperNode, and the code the
    server ships to it, then run as YOUR user: they could read your data
    folder. This is refused unless you add --accept-server-code-access; on
    real machines use the two-user systemd units instead (docs/deployment.md).

    \b
    Exit codes: 0 stopped cleanly, 2 usage, 10 invalid policy, 11 store
    unreadable (wrong key or altered bytes), 12 no X display for --source
    pynput, 13 trainer failed to start, 14 another daemon already runs here,
    15 single-user federation without --accept-server-code-access (nothing
    was started or changed), 16 the privacy ledger is unreadable or was
    changed behind the daemon's back (restore it and ledger.v1.key from a
    backup; never delete it).
    """
    from keystay.client.daemon.main import (
        SINGLE_USER_REFUSAL,
        DaemonError,
        DaemonOptions,
        run_daemon,
    )

    if superlink is None:
        from keystay.client.enroll import EnrollError, FederationSettings

        try:
            joined = FederationSettings.load(data_dir)
        except EnrollError as error:
            raise click.ClickException(str(error)) from error
        # Written by `keystay device enroll`. A SuperNode key kept outside DATA
        # (--supernode-dir) means the two-user set-up: the SuperNode is its own
        # service, so this daemon must not start one.
        if joined is not None and _inside(joined.auth_private_key, data_dir):
            superlink = joined.superlink
            root_certificates = root_certificates or joined.root_certificates
            auth_private_key = auth_private_key or joined.auth_private_key
    if superlink and not accept_server_code_access:
        # Before the data folder or its log is touched: a refusal changes nothing.
        click.echo(f"keystay device: {SINGLE_USER_REFUSAL}", err=True)
        sys.exit(int(ExitCode.DEVICE_SERVER_CODE_ACCESS))
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[
            logging.StreamHandler(sys.stderr),
            logging.FileHandler(data_dir / "logs" / "daemon.log"),
        ],
    )
    if superlink:
        logging.getLogger("keystay.device").warning(
            "single-user federation (--accept-server-code-access): the SuperNode and the "
            "code the server ships to it run as this user and can read %s", data_dir)
    options = DaemonOptions(
        data_dir=data_dir,
        source=source,
        policy_file=policy_file,
        simulate_days=simulate_days,
        simulate_events_per_day=events_per_day,
        employee_seed=employee_seed,
        superlink=superlink,
        supernode_port=supernode_port,
        insecure=insecure,
        root_certificates=root_certificates,
        auth_private_key=auth_private_key,
        federation_socket=federation_socket,
        socket_group=socket_group,
        trainer_idle_timeout=trainer_idle_timeout or None,
        accept_server_code_access=accept_server_code_access,
    )
    try:
        code = run_daemon(options)
    except DaemonError as error:
        click.echo(f"keystay device: {error}", err=True)
        sys.exit(int(error.code))
    sys.exit(int(code))


def _inside(path: Path | None, folder: Path) -> bool:
    return path is not None and path.resolve().is_relative_to(folder.resolve())


def _client(data_dir: Path) -> ControlClient:
    try:
        return ControlClient(control_socket_path(data_dir))
    except DeviceUnavailableError as error:
        raise click.ClickException(str(error)) from error


def _call(data_dir: Path, method: str, request: object,
          timeout: float = CALL_TIMEOUT_S) -> object:
    with _client(data_dir) as client:
        try:
            return getattr(client.stub, method)(request, timeout=timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise click.ClickException(
                    f"no answer on {client.socket}: the daemon is not running, or it "
                    "refused this user (it serves only its own OS user)"
                ) from error
            raise click.ClickException(f"the daemon answered: {error.details()}") from error


@device.command()
@data_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(data_dir: Path, as_json: bool) -> None:
    """Show whether recording is on, what is kept, and ε spent and left per day.

    With the employee-day unit (the default policy) each day has two ε, each
    per employee-day and each of its own budget: against an honest-but-curious
    server and against a server that breaks secure aggregation. With the
    record unit, ε is per record: 33 consecutive input events of one day.
    Each day's ``unit`` says which; the JSON's ``privacy_unit`` states the
    unit in words.
    """
    from keystay.common.windows import PRIVACY_UNIT, PRIVACY_UNIT_SENTENCE

    reply = _call(data_dir, "Status", device_pb2.StatusRequest())
    assert isinstance(reply, device_pb2.StatusReply)
    if as_json:
        from google.protobuf.json_format import MessageToDict

        document = MessageToDict(reply, always_print_fields_with_no_presence=True)
        days = any(b.unit == "employee-day" for b in reply.blocks)
        document["privacy_unit"] = EMPLOYEE_DAY_UNIT if days else PRIVACY_UNIT
        click.echo(json.dumps(document, indent=2))
        return
    state = "recording" if reply.recording else "paused" if reply.source != "none" else "idle"
    if reply.paused_until:
        state += f" until {reply.paused_until}"
    click.echo(f"device      {reply.device_id}   (keystay {reply.version})")
    click.echo(f"state       {state}   source: {reply.source}")
    click.echo(f"events today {reply.events_today}   store {reply.store_bytes / 1e6:.2f} MB   "
               f"trainer {'warm' if reply.trainer_ready else 'not running (starts for a round)'}")
    if reply.store_writing_stopped:
        click.echo(f"STORE       not writing: {reply.store_problem or 'the store refuses writes'}; "
                   "new tokens wait in memory and are written when it accepts again "
                   "(free disk space)")
    if any(b.has_broken for b in reply.blocks) or any(
        b.unit == "employee-day" for b in reply.blocks
    ):
        _echo_day_blocks(reply)
        return
    click.echo(f"\n{'day':<12}{'events':>9}{'ε spent':>10}{'ε left':>9}{'budget':>9}  state")
    for b in reply.blocks:
        left = max(0.0, b.budget - b.epsilon)
        click.echo(f"{b.block:<12}{b.events:>9}{b.epsilon:>10.3f}{left:>9.3f}{b.budget:>9.2f}  "
                   f"{'retired' if b.retired else 'open'}")
    click.echo(f"\nε is per record, at δ = {reply.delta:g}; each day has its own budget.")
    click.echo(textwrap.fill(PRIVACY_UNIT_SENTENCE, width=88))


def _echo_day_blocks(reply: device_pb2.StatusReply) -> None:
    """Per day: ε against an honest-but-curious server / budget, and against a
    server that breaks secure aggregation / budget; the unit named."""
    click.echo(f"\n{'day':<12}{'events':>9}  {'ε honest server':>17}  "
               f"{'ε broken aggregation':>21}  unit          state")
    for b in reply.blocks:
        honest = f"{b.epsilon:.3f} / {b.budget:g}"
        broken = f"{b.epsilon_broken:.3f} / {b.budget_broken:g}" if b.has_broken else "—"
        click.echo(f"{b.block:<12}{b.events:>9}  {honest:>17}  {broken:>21}  "
                   f"{b.unit or 'record':<12}  {'retired' if b.retired else 'open'}")
    click.echo(textwrap.fill(
        f"\nε is per employee-day (everything you did on one day), at δ = {reply.delta:g}: "
        "'honest server' is what a server that sees only the sum of several devices' updates "
        "(an honest-but-curious server) can learn; 'broken aggregation' is what a server that "
        "breaks secure aggregation and sees this device's update alone can learn. A day "
        "retires when either budget is spent.", width=88))


#: What an employee-day ε protects, in words (``status --json``'s ``privacy_unit``).
EMPLOYEE_DAY_UNIT = "one employee-day = everything one employee did on one day"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> float:
    """``30m`` -> 1800.0; units s, m, h, d (default minutes)."""
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"'{text}' is not a duration; use e.g. 90s, 30m, 2h or 1d")
    value, unit = float(match.group(1)), match.group(2) or "m"
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


@device.command()
@data_option
@click.option("--for", "duration", help="How long, e.g. 30m, 2h (default: until resume).")
def pause(data_dir: Path, duration: str | None) -> None:
    """Stop recording now (until `resume`, or for a while with --for)."""
    seconds = parse_duration(duration) if duration else 0.0
    reply = _call(data_dir, "Pause", device_pb2.PauseRequest(seconds=seconds))
    assert isinstance(reply, device_pb2.PauseReply)
    click.echo(f"paused until {reply.paused_until}" if reply.paused_until
               else "paused until you run 'keystay device resume'")


@device.command()
@data_option
def resume(data_dir: Path) -> None:
    """Start recording again."""
    _call(data_dir, "Resume", device_pb2.ResumeRequest())
    click.echo("recording")


@device.command()
@data_option
@click.option("--day", help="One day, YYYY-MM-DD (default: every day kept).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(data_dir: Path, day: str | None, as_json: bool) -> None:
    """Summarise what is kept: token counts by kind and apps seen. Never text."""
    reply = _call(data_dir, "Show", device_pb2.ShowRequest(day=day or ""))
    assert isinstance(reply, device_pb2.ShowReply)
    summary = json.loads(reply.summary_json)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for block in summary["blocks"]:
        click.echo(f"{block['block']}: {block['events']} tokens, ε {block['epsilon_spent']:.3f}"
                   f" of {block['budget']:.2f}{' (retired)' if block['retired'] else ''}")
        kinds = ", ".join(f"{k} {v}" for k, v in block["tokens_by_kind"].items())
        click.echo(f"  by kind: {kinds}")
        click.echo(f"  apps: {', '.join(block['apps_seen']) or '-'}")
    if not summary["blocks"]:
        click.echo("nothing kept")
    refusals = summary.get("refusals", [])
    if refusals:
        # The server was told only each refusal's code; the reasons are here.
        click.echo(f"\nrecent refusals ({len(refusals)}; the server saw only the code):")
        for entry in refusals[-10:]:
            when = datetime.fromtimestamp(float(entry.get("t", 0))).isoformat(timespec="seconds")
            click.echo(f"  {when}  run {entry.get('run_id', '?')} round "
                       f"{entry.get('server_round', '?')}: {entry.get('reason', '')}")


@device.command()
@data_option
@click.option("--day", "days", multiple=True, help="A day to delete, YYYY-MM-DD (repeatable).")
@click.option("--all", "everything", is_flag=True,
              help="Delete every day and destroy the store's key (crypto-shred).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def forget(data_dir: Path, days: tuple[str, ...], everything: bool, yes: bool) -> None:
    """Delete kept days. The privacy ledger keeps only ε figures, never events."""
    if not days and not everything:
        raise click.UsageError("name --day D (repeatable) or --all")
    what = "EVERY day and the store key" if everything else ", ".join(days)
    if not yes:
        click.confirm(f"Delete {what}? This cannot be undone", abort=True)
    reply = _call(data_dir, "Forget", device_pb2.ForgetRequest(days=list(days), all=everything))
    assert isinstance(reply, device_pb2.ForgetReply)
    click.echo(f"forgot: {', '.join(reply.forgotten) or 'nothing'}"
               + ("; key destroyed" if reply.key_destroyed else ""))


@device.command()
@data_option
@click.option("--day", required=True, help="The day to export, YYYY-MM-DD.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the JSON file.")
def export(data_dir: Path, day: str, out: Path) -> None:
    """Write one day of your data as JSON (format keystay-export/1, see README)."""
    reply = _call(data_dir, "Export", device_pb2.ExportRequest(day=day))
    assert isinstance(reply, device_pb2.ExportReply)
    out.write_text(reply.json)
    os.chmod(out, 0o600)
    click.echo(f"wrote {out} ({len(json.loads(reply.json)['events'])} events)")


@device.command()
@data_option
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Explain this policy file instead of asking the running daemon.")
def policy(data_dir: Path, policy_file: Path | None) -> None:
    """Explain the privacy policy this device enforces.

    \b
    Asks the running daemon (what it enforces now). With --policy FILE, or
    when no daemon runs, explains the file instead.
    """
    if policy_file is None and control_socket_path(data_dir).exists():
        reply = _call(data_dir, "Policy", device_pb2.PolicyRequest())
        assert isinstance(reply, device_pb2.PolicyReply)
        click.echo(f"policy enforced by the running daemon, from {reply.source}\n")
        click.echo(reply.text)
        return
    from keystay.client.policy import DevicePolicy, PolicyError

    path = policy_file or data_dir / "policy.toml"
    try:
        loaded = DevicePolicy.load(path)
    except PolicyError as error:
        raise click.ClickException(str(error)) from error
    source = str(path) if path.exists() else "built-in defaults (no policy.toml)"
    running = "" if policy_file else " (no daemon running: what it would load)"
    click.echo(f"policy from {source}{running}\n")
    click.echo(loaded.explain())


@device.command()
@data_option
@click.option("--model", "model_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A keystay model checkpoint (e.g. the run's final.pt).")
def evaluate(data_dir: Path, model_file: Path) -> None:
    """Score a model on your own held-out data, here. Nothing is sent anywhere.

    \b
    The daemon runs the model over the held-out windows of your eligible days
    and tells you its next-event accuracy and loss. The federation cannot ask
    for this: the figure is not paid for from your privacy budget.
    """
    from keystay.client.serde import weights_to_proto
    from keystay.common.model import read_checkpoint

    try:
        checkpoint = read_checkpoint(model_file)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    request = device_pb2.EvaluateRequest(weights=weights_to_proto(checkpoint.weights))
    reply = _call(data_dir, "Evaluate", request, timeout=EVALUATE_TIMEOUT_S)
    assert isinstance(reply, device_pb2.EvaluateReply)
    click.echo(f"{model_file}: next-event accuracy {reply.accuracy:.3f}, loss {reply.loss:.3f} "
               f"on {reply.num_examples} held-out windows of device {reply.device_id}")


@device.command()
@data_option
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port on 127.0.0.1 (0: a free one is picked).")
@click.option("--no-browser", is_flag=True, help="Print the link; do not open a browser.")
@click.option("--refresh", type=click.IntRange(min=0), default=30, show_default=True,
              help="Reload the page's figures every this many seconds while idle (0: never).")
def ui(data_dir: Path, port: int, no_browser: bool, refresh: int) -> None:
    """Open your page: what is kept, what left, pause, export, forget.

    \b
    The page is served on 127.0.0.1 only, to a link with a fresh secret in it
    (printed here and opened in your browser). Other people and other web
    sites cannot use it: without the secret every request is refused. It
    shows and changes only what the running daemon allows; stop it with
    Ctrl-C (the daemon keeps running).

    \b
    Exit codes: 0 stopped with Ctrl-C, 2 usage, 40 no running daemon for
    --data (start one with 'keystay device run'), 41 cannot listen on
    127.0.0.1 (port taken).
    """
    import webbrowser

    from keystay.client.ui.access import AccessError, DaemonAccess
    from keystay.client.ui.server import PageServer

    access = DaemonAccess(data_dir)
    try:
        access.status()  # refuse to serve a page about a daemon that is not there
    except AccessError as error:
        click.echo(f"keystay device ui: {error}", err=True)
        sys.exit(ExitCode.PAGE_NO_DAEMON)
    try:
        server = PageServer(access, port=port, refresh=refresh)
    except OSError as error:
        click.echo(f"keystay device ui: cannot listen on 127.0.0.1:{port}: {error.strerror}; "
                   "pick another --port or leave it at 0", err=True)
        sys.exit(ExitCode.PAGE_CANNOT_LISTEN)
    click.echo(f"your keystay page: {server.url}\n(only this link opens it; Ctrl-C stops it)",
               nl=True)
    sys.stdout.flush()
    if not no_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@device.command()
@data_option
@click.option("--server", required=True,
              help="The SuperLink's Fleet API, HOST:PORT, exactly as this device will dial it "
              "(the host must be named in the server certificate).")
@click.option("--ca", "ca_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The server's CA certificate (its tls/ca.pem), from the operator.")
@click.option("--supernode-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the SuperNode key and pinned CA go (default: DATA). Use the SuperNode "
              "user's folder when it runs as its own OS user.")
@click.option("--new-key", is_flag=True,
              help="Replace the SuperNode key (if it may have leaked). A revoked device is never "
              "re-admitted: it needs a new identity (remove DATA/signing.key) and a new key.")
@click.option("--offline", is_flag=True,
              help="Do not contact the server (it is not reachable from here yet).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the request here.")
def enroll(data_dir: Path, server: str, ca_file: Path, supernode_dir: Path | None,
           new_key: bool, offline: bool, out: Path | None) -> None:
    """Ask to join a federation: check the server, make keys, write the request.

    \b
    It verifies the server against the CA you were given (TLS, and the name
    you dial), creates this computer's SuperNode key, and writes
    DATA/enrollment-request.json: public keys only, signed. Send that file to
    your server operator and read them the fingerprint it prints; they run
    'keystay server enroll' with it. Then start the daemon with the command
    it prints (the settings are also saved in DATA/federation.toml).

    \b
    Exit codes: 0 request written, 2 usage (bad address or CA file), 30 server
    unreachable, 31 server not trusted (wrong CA, name not in its
    certificate, or someone else answering), 32 unusable SuperNode key.
    """
    from keystay.client.enroll import EnrollError
    from keystay.client.enroll import enroll as do_enroll

    try:
        result = do_enroll(data_dir, server, ca_file, key_dir=supernode_dir, new_key=new_key,
                           check=not offline, out=out)
    except EnrollError as error:
        click.echo(f"keystay device enroll: {error}", err=True)
        sys.exit(int(error.code))
    if result.server is not None:
        click.echo(f"server {server} verified: {result.server.subject}, certificate names "
                   f"{', '.join(result.server.names)}, valid until "
                   f"{result.server.not_after:%Y-%m-%d}")
    else:
        click.echo(f"server {server} NOT checked (--offline)")
    click.echo(f"device      {result.device_id}")
    click.echo(f"SuperNode key {result.settings.auth_private_key}"
               f"{' (new)' if result.new_key else ' (kept)'}")
    click.echo(f"request     {result.request_file}" + (f" and {out}" if out else ""))
    click.echo(f"fingerprint {result.fingerprint}")
    click.echo("\nSend the request to your server operator and read them the fingerprint;\n"
               "they run: keystay server enroll --dir SERVER_DIR --fingerprint "
               f"{result.fingerprint} {result.request_file.name}")
    settings = result.settings
    click.echo("\nOnce enrolled, start the two-user systemd units (docs/deployment.md, "
               "'Device install'), "
               "or, accepting that the server's code runs as you and can read your data, "
               f"join with: keystay device run --data {data_dir} --superlink "
               f"{settings.superlink} --root-certificates {settings.root_certificates} "
               f"--auth-key {settings.auth_private_key} --accept-server-code-access")

