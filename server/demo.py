"""``keystay demo``: a whole federation on this machine, on simulated employees.

Starts a real SuperLink and N real device daemons (each supervising its real
SuperNode as the same OS user: single-user mode, accepted by name for these
simulated employees) on loopback, runs rounds the way the ML team does (``keystay round
start``), prints the per-round table (the server's own held-out figures, never
a device's) and the security team's budget report, and stops everything it
started. Exit 0 only if every part came up and every
round completed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from keystay.server.deploy.local import LocalFederation, PartFailed
from keystay.server.deploy.superlink import executable, flower_env
from keystay.server.settings import RUN_DEFAULTS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--devices", type=int, default=3, show_default=True,
              help="Simulated employees, each with its own daemon and SuperNode.")
@click.option("--rounds", type=int, default=RUN_DEFAULTS.num_server_rounds, show_default=True,
              help="Rounds; each charges every simulated day (the defaults spend most of a "
                   "day's budget in this many).")
@click.option("--days", type=int, default=3, show_default=True,
              help="Days of simulated history per employee (one privacy block per day).")
@click.option("--events-per-day", type=int, default=12000, show_default=True,
              help="Simulated input events per day; 33 make one training record.")
@click.option("--local-steps", type=int, default=RUN_DEFAULTS.local_steps, show_default=True,
              help="DP-SGD steps per device per round.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for this demo's server, devices and logs (default: runs/demo-TIME).")
def demo(devices: int, rounds: int, days: int, events_per_day: int, local_steps: int,
         out: Path | None) -> None:
    """Run a whole keystay federation here, then stop it.

    \b
    What you see: each part coming up, one table row per round (devices
    sampled, answered, aggregated, refused, unavailable or failed; each
    device's cumulative ε from its signed report; the global model's accuracy
    and loss on the server's own held-out simulated employees), where the
    final model is and how to load it, and the privacy budget report a
    security reviewer reads.

    \b
    The simulated devices run single-user (--accept-server-code-access): each
    SuperNode, and the code the server ships to it, runs as your OS user and
    could read that device's data folder. That is no guarantee against the
    server; it is fine here only because the employees are simulated.
    """
    root = (out or Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S")).resolve()
    started = time.monotonic()
    click.echo(f"keystay demo: {devices} simulated employees, {rounds} rounds; folder {root}")
    federation = LocalFederation(root, devices=devices, simulate_days=days,
                                 events_per_day=events_per_day)
    code = 0
    try:
        federation.start(progress=lambda msg: click.echo(f"  {msg}"))
        click.echo(f"federation up in {time.monotonic() - started:.1f} s\n")
        env = flower_env()
        round_cmd = [
            executable("keystay"), "round", "start", "--server-dir", str(federation.server_dir),
            "--rounds", str(rounds), "--min-devices", str(devices), "--name", "demo",
            "--local-steps", str(local_steps),
        ]
        result = subprocess.run(round_cmd, env=env, check=False)
        if result.returncode != 0:
            code = result.returncode
            click.echo("keystay demo: the run failed; device logs are in "
                       f"{root / 'devices'}/*/logs, the SuperLink's in "
                       f"{federation.server_dir / 'logs'}", err=True)
        else:
            if RUN_DEFAULTS.privacy_unit == "employee-day":
                # Say it where the figures are: the mechanism is sized for a company.
                click.echo(
                    f"\nnote: each device added noise σ·C/√t to its update, so the sum of "
                    f"{devices} carries noise σ·C: enough to swamp {devices} clipped updates, "
                    "which is why held-out accuracy does not improve here. The same noise "
                    "averages away over hundreds of devices: `keystay sim --devices 1000` "
                    "runs that scale on this machine (README, \"Scale\").")
            click.echo("\nprivacy budget report (what security reads):\n")
            subprocess.run([executable("keystay"), "budget", "report", "--server-dir",
                            str(federation.server_dir)], env=env, check=False)
    except PartFailed as failure:
        click.echo(f"keystay demo: {failure}", err=True)
        code = 1
    finally:
        federation.stop()
    click.echo(f"\nall processes stopped; demo took {time.monotonic() - started:.1f} s")
    sys.exit(code)
