"""``keystay server`` and ``keystay round``: the ML team's commands."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from keystay.server.deploy.superlink import (
    ServerConfig,
    ServerConfigError,
    flower_env,
    wait_for_port,
)

server_dir_option = click.option(
    "--dir",
    "--server-dir",
    "server_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The server folder (made by `keystay server init`).",
)


class ServerExit:
    """Exit codes of ``keystay server`` / ``keystay round``."""

    OK = 0
    USAGE = 2
    CONFIG = 20
    SUPERLINK_DOWN = 21
    RUN_FAILED = 22


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def server() -> None:
    """Set up and run the federation server (for the ML team).

    \b
    The server is a Flower SuperLink (devices connect to its Fleet API over
    gRPC) plus keystay's ServerApp, which aggregates device updates with
    FedAvg and keeps a ledger of every signed privacy report.

    \b
      keystay server init --dir srv --fleet-address 0.0.0.0:9092
      keystay server start --dir srv
      keystay server enroll --dir srv DEVICE/enrollment.json
      keystay round start --server-dir srv --rounds 3
      keystay budget report --server-dir srv
    """


@server.command()
@server_dir_option
@click.option("--fleet-address", default="127.0.0.1:9092", show_default=True,
              help="Where devices connect (HOST:PORT).")
@click.option("--control-port", type=int, default=8000, show_default=True,
              help="Control API port (HTTP, bound to 127.0.0.1): where runs are submitted.")
@click.option("--insecure", is_flag=True,
              help="No TLS. Only for loopback demos and tests; warned about on every start.")
def init(server_dir: Path, fleet_address: str, control_port: int, insecure: bool) -> None:
    """Create a server folder: configuration, state paths, run folders."""
    server_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("runs", "logs"):
        (server_dir / sub).mkdir(exist_ok=True)
    config = ServerConfig(fleet_address=fleet_address, control_port=control_port,
                          insecure=insecure)
    path = config.save(server_dir.resolve())
    from keystay.server.ledger.ledger import ServerLedger

    ServerLedger.open(server_dir.resolve())
    click.echo(f"wrote {path}")


@server.command()
@server_dir_option
def start(server_dir: Path) -> None:
    """Run the SuperLink for this server folder (until Ctrl-C / SIGTERM).

    Prints 'ready' once the Fleet and Control APIs accept connections.
    Exit codes: 0 stopped, 20 bad server folder, 21 SuperLink did not come up
    or died (see DIR/logs/superlink.log).
    """
    server_dir = server_dir.resolve()
    try:
        config = ServerConfig.load(server_dir)
    except ServerConfigError as error:
        click.echo(f"keystay server: {error}", err=True)
        sys.exit(ServerExit.CONFIG)
    if config.insecure:
        click.echo("WARNING: the SuperLink runs WITHOUT TLS (--insecure): model updates and "
                   "privacy reports cross the network in plain text.", err=True)
    (server_dir / "logs").mkdir(exist_ok=True)
    log_path = server_dir / "logs" / "superlink.out"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            config.superlink_command(server_dir), stdout=log, stderr=subprocess.STDOUT,
            env=flower_env(), start_new_session=True,
        )
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    alive = lambda: process.poll() is None  # noqa: E731
    if not (wait_for_port(config.fleet_address, 60, alive)
            and wait_for_port(config.control_address, 60, alive)):
        process.terminate()
        process.wait(10)
        click.echo(f"keystay server: the SuperLink did not come up; see {log_path}", err=True)
        sys.exit(ServerExit.SUPERLINK_DOWN)
    click.echo(f"ready: fleet {config.fleet_address}, control {config.control_address}",
               err=False)
    sys.stdout.flush()
    code = process.wait()
    if not stopping:
        click.echo(f"keystay server: the SuperLink exited ({code}); see {log_path}", err=True)
        sys.exit(ServerExit.SUPERLINK_DOWN)


@server.command()
@server_dir_option
@click.argument("request", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="A label for the device (default: its id).")
def enroll(server_dir: Path, request: Path, name: str | None) -> None:
    """Enroll a device from its enrollment request file (enrollment.json)."""
    from keystay.server.ledger.ledger import ServerLedger

    data = json.loads(request.read_text())
    if data.get("format") != "keystay-enrollment/1":
        raise click.ClickException(f"{request} is not a keystay enrollment request")
    ledger = ServerLedger.open(server_dir.resolve())
    ledger.enroll_device(data["device_id"], data["signing_public_key_pem"],
                         name or data["device_id"])
    click.echo(f"enrolled {data['device_id']}")


@server.command()
@server_dir_option
def devices(server_dir: Path) -> None:
    """List enrolled devices."""
    from keystay.server.ledger.ledger import ServerLedger

    for row in ServerLedger.open(server_dir.resolve()).devices():
        click.echo(json.dumps(row if isinstance(row, dict) else row.__dict__, default=str))


@click.group("round", context_settings={"help_option_names": ["-h", "--help"]})
def round_() -> None:
    """Start federated training rounds (for the ML team)."""


@round_.command("start")
@server_dir_option
@click.option("--rounds", type=int, default=3, show_default=True, help="Number of rounds.")
@click.option("--name", help="Run name (default: run-YYYYmmdd-HHMMSS).")
@click.option("--min-devices", type=int, default=2, show_default=True,
              help="Wait for this many connected devices before each round.")
@click.option("--noise-multiplier", type=float, default=1.0, show_default=True,
              help="DP-SGD σ asked of devices (each enforces its own floor).")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True,
              help="Per-sample clip asked of devices (each enforces its own maximum).")
@click.option("--local-steps", type=int, default=30, show_default=True,
              help="DP-SGD steps per device per round.")
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="Expected (Poisson) batch size.")
@click.option("--learning-rate", type=float, default=0.05, show_default=True)
@click.option("--central-dp", is_flag=True,
              help="Also clip each device update and noise the sum on the server.")
@click.option("--central-noise-multiplier", type=float, default=0.5, show_default=True)
@click.option("--central-clip", type=float, default=1.0, show_default=True)
@click.option("--run-config", "extra", multiple=True,
              help="Any other run config key=value (repeatable), e.g. blocks=\"2026-11-20\".")
def round_start(server_dir: Path, rounds: int, name: str | None, min_devices: int,
                noise_multiplier: float, max_grad_norm: float, local_steps: int,
                batch_size: int, learning_rate: float, central_dp: bool,
                central_noise_multiplier: float, central_clip: float,
                extra: tuple[str, ...]) -> None:
    """Submit a run to the SuperLink and print one table row per round.

    Exit codes: 0 every round completed, 20 bad configuration, 22 the run
    failed or ended early (see RUN_DIR/flwr-run.log).
    """
    from keystay.server.rounds import TABLE_HEADER, format_round, start_run
    from keystay.server.settings import RunSettings, SettingsError

    server_dir = server_dir.resolve()
    values: dict[str, Any] = {
        "server-dir": str(server_dir),
        "run-name": name or datetime.now().strftime("run-%Y%m%d-%H%M%S"),
        "num-server-rounds": rounds,
        "min-devices": min_devices,
        "noise-multiplier": noise_multiplier,
        "max-grad-norm": max_grad_norm,
        "local-steps": local_steps,
        "batch-size": batch_size,
        "learning-rate": learning_rate,
        "central-dp": central_dp,
        "central-noise-multiplier": central_noise_multiplier,
        "central-clip": central_clip,
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
        sys.exit(ServerExit.CONFIG)
    click.echo(f"run {settings.run_name}: {settings.num_server_rounds} rounds, "
               f"waiting for {settings.min_devices} devices; folder {settings.run_dir}")
    click.echo(TABLE_HEADER)
    started = time.monotonic()
    outcome = start_run(server_dir, settings,
                        on_round=lambda row: click.echo("\n".join(format_round(row))))
    seconds = time.monotonic() - started
    if not outcome.ok:
        click.echo(f"keystay round: run {settings.run_name} ended after {len(outcome.rounds)} "
                   f"of {settings.num_server_rounds} rounds (flwr exit {outcome.returncode}); "
                   f"see {outcome.log_file}", err=True)
        sys.exit(ServerExit.RUN_FAILED)
    delta = next((r["delta"] for r in outcome.rounds if r.get("delta")), None)
    click.echo(f"\n{len(outcome.rounds)} rounds in {seconds:.1f} s. ε is each device's "
               f"cumulative per-block bound" + (f" at δ = {delta:g}." if delta else "."))
    click.echo(f"final model: {outcome.final_checkpoint}\n"
               f"load it with: keystay.client.model.load_checkpoint(\"{outcome.final_checkpoint}\")")


def _parse_value(raw: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
