"""``keystay sim``: a federation of simulated employees on this machine (or a Ray cluster).

For the ML team and security: what accuracy and what ε per employee-day a
population of a given size gets, and how rounds behave, without a thousand
laptops. Each virtual device is keystay's real device code in-process (see
:mod:`keystay.sim.federation.device`); the server is the deployment's
ServerApp. Exit codes are documented in ``--help`` and
:mod:`keystay.common.exitcodes`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import click

from keystay.common.exitcodes import ExitCode


def _parse_value(raw: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def summary_line(line: dict[str, Any]) -> str:
    """The population's ε line under the round's table row."""
    means = line.get("epsilon_per_day_mean") or {}
    eps = "; ".join(f"{a}: {v:.3f}" for a, v in means.items()) or "no verified report"
    return (f"       {line.get('seconds', 0):.1f} s; mean ε per day charged "
            f"({line.get('days_charged', 0)} days): {eps}")


def reasons_line(row: dict[str, Any]) -> str | None:
    """Devices that did not answer, counted by kind and reason (``None`` if every one did).

    E.g. ``refused: no-data 85; unavailable: no reply 2``: what the table's
    per-device lines would say, for a population too large to list.
    """
    parts = []
    for kind, key in (("refused", "refusals"), ("unavailable", "unavailable"),
                      ("failed", "failed")):
        counts = Counter(str(entry.get("reason", "?")) for entry in row.get(key, []))
        if counts:
            parts.append(f"{kind}: " + ", ".join(
                f"{reason.removeprefix('refused by device policy: ')} {n}"
                for reason, n in counts.most_common()))
    return "       " + "; ".join(parts) if parts else None


@click.command("sim")
@click.option("--devices", "-n", type=click.IntRange(min=1), default=100, show_default=True,
              help="Simulated employees, one virtual device each.")
@click.option("--rounds", "-r", type=click.IntRange(min=1), default=3, show_default=True,
              help="Federated rounds.")
@click.option("--fraction", "-f", type=click.FloatRange(min=0, max=1, min_open=True),
              default=1.0, show_default=True,
              help="Share of the devices each round is sent to (a fixed count drawn without "
              "replacement; no privacy amplification is claimed for it).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write one JSON object per round to this file.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the devices' stores and ledgers and the server's run "
              "(default: a new temporary folder, removed at the end).")
@click.option("--days", type=click.IntRange(min=1), default=3, show_default=True,
              help="Days of simulated history per employee (days differ in volume by role).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The company: which employees, which roles, which days.")
@click.option("--ray-address", metavar="HOST:PORT",
              help="Run on an existing Ray cluster (ray start --head) instead of a "
              "private one; see docs/scale.md.")
@click.option("--cpus-per-device", type=float, default=1.0, show_default=True,
              help="Ray CPUs reserved per ClientApp actor (1: one device per core at a time).")
@click.option("--privacy-unit", type=click.Choice(["employee-day", "record"]),
              default="employee-day", show_default=True,
              help="The run's and every device's privacy unit: employee-day rounds go "
              "through SecAgg+ (the deployment default); record is DP-SGD per window.")
@click.option("--verbose", is_flag=True, help="Show Flower's and Ray's own log lines too.")
@click.option("--run-config", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any run config key (as keystay round start), e.g. noise-multiplier=3.0.")
def sim(devices: int, rounds: int, fraction: float, json_path: Path | None, out: Path | None,
        days: int, seed: int, ray_address: str | None, cpus_per_device: float,
        privacy_unit: str, verbose: bool, extra: tuple[str, ...]) -> None:
    """Run a federation of simulated employees here, on Flower's Simulation Engine.

    \b
    The server is keystay's own ServerApp (strategy, SecAgg+, report
    verification, checkpoints); every virtual device runs the real device
    code in-process: policy, ledger, an encrypted store of a simulated
    employee (developer, designer, support or manager), the daemon's SecAgg+
    stages, the trainer, the noise, the signed report. No daemon, no socket.
    Accuracy is the server's held-out score on simulated employees that
    never train. An employee-day run needs at least the devices'
    min_summed_devices (3) per round.

    \b
    Prints the table of keystay round start, one row per round, with the
    mean ε per employee-day the round's verified reports name, and while a
    round runs how many devices have answered each of its stages (a live
    bar in a terminal, a "waiting:" line every 30 s in a log); --json
    writes the same per round as JSON lines.

    \b
    Example (1,000 devices, a tenth of them per round):
      keystay sim --devices 1000 --rounds 20 --fraction 0.1 --json out.jsonl

    \b
    Exit codes: 0 every round completed, 2 bad option, 20 bad run config,
    50 the engine cannot start (Flower version, Ray), 51 the run failed.
    """
    import tempfile

    from keystay.server.progress import RoundProgress
    from keystay.server.rounds import TABLE_HEADER, format_round
    from keystay.server.settings import SettingsError
    from keystay.sim.federation.engine import SimError, SimOptions, run
    from keystay.sim.federation.flower_patch import FlowerPatchError
    from keystay.sim.federation.progress import StageTally

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if not verbose:
        # The table is the progress; Flower logs every row as JSON besides, and
        # the ServerApp a warning per refused or silent device (85 of them at
        # 1,000 devices), which the round's summary counts by reason instead.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    config: dict[str, Any] = {}
    for item in extra:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not key=value", param_hint="--run-config")
        config[key.strip()] = _parse_value(raw.strip())
    temp = None if out is not None else tempfile.TemporaryDirectory(prefix="keystay-sim-")
    folder = out if out is not None else Path(temp.name)  # type: ignore[union-attr]
    options = SimOptions(devices=devices, rounds=rounds, fraction=fraction, out=folder,
                         days=days, seed=seed, cpus_per_device=cpus_per_device,
                         ray_address=ray_address, run_config=config,
                         privacy_unit=privacy_unit,
                         run_name=time.strftime("sim-%Y%m%d-%H%M%S"))
    sink: IO[str] | None = None
    try:
        settings = options.settings()
        click.echo(f"keystay sim: {devices} simulated devices, {rounds} rounds, "
                   f"{settings.min_devices} per round; folder {folder}")
        click.echo(TABLE_HEADER)
        sink = json_path.open("w") if json_path is not None else None
        started = time.monotonic()

        def on_row(row: dict[str, Any], line: dict[str, Any]) -> None:
            # The round's line of the table; per-device lines only for a handful.
            lines = format_round(row)
            if len(lines) > 12:
                reasons = reasons_line(row)
                lines = [lines[0], *([reasons] if reasons else [])]
            progress.round_done(row, [*lines, summary_line(line)])
            if sink is not None:
                sink.write(json.dumps(line, sort_keys=True) + "\n")
                sink.flush()

        # Inside a round: how many devices have answered each stage so far.
        tally = StageTally(options.devices_dir, settings.min_devices)
        with RoundProgress(rounds, sys.stdout, activity=tally.text) as progress:
            run(options, on_row)
        click.echo(f"\n{rounds} rounds of {devices} devices in "
                   f"{time.monotonic() - started:.1f} s; run folder {settings.run_dir}")
    except SettingsError as error:
        click.echo(f"keystay sim: {error}", err=True)
        sys.exit(ExitCode.SERVER_CONFIG)
    except FlowerPatchError as error:
        click.echo(f"keystay sim: {error}", err=True)
        sys.exit(ExitCode.SIM_ENGINE)
    except SimError as error:
        click.echo(f"keystay sim: {error}", err=True)
        sys.exit(ExitCode.SIM_RUN_FAILED)
    finally:
        if sink is not None:
            sink.close()
        if temp is not None:
            temp.cleanup()
