"""Run keystay's ServerApp over a population of simulated devices on Flower's Simulation Engine.

What runs
---------
* The **deployment's ServerApp**, :data:`keystay.server.app.app`, unchanged:
  strategy, report verification in the server ledger, central DP if asked,
  checkpoints and its ``rounds.jsonl`` row per round, with the held-out score
  on the server's own simulated employees (:mod:`keystay.server.heldout`).
* Virtual nodes whose ClientApp (:mod:`keystay.sim.federation.clientapp`)
  answers through each simulated employee's real device core in-process.
* Flower 1.39's Simulation Engine with the Ray backend, one CPU per ClientApp
  actor (so a 2-core machine runs two devices at once; Flower's default of
  two CPUs per client would leave one actor), optionally on an existing Ray
  cluster (``ray_address``, see ``docs/scale.md``), with the message
  extractor replaced by a one-pass version (:mod:`keystay.sim.federation.flower_patch`).

Before the run, every device gets a folder and a signing key and is enrolled
in the server ledger (reports of unenrolled devices do not verify); its store
is filled with its simulated days on the first round that reaches it.

Sampling: the run's ``min-devices`` is ``int(N × fraction)`` (Flower's own
rounding of ``fraction_train``), so the ServerApp waits until that many
virtual nodes are registered and never samples fewer. At fraction 1 that is
the whole population in every round, the first one included. An
employee-day run never asks for fewer than the devices' policy's
``min_summed_devices`` t (each device refuses a SecAgg+ round that could
unmask a sum of fewer), and needs a population of at least t. From
:data:`WIDE_SHARES` devices per round up, SecAgg+ neighbourhoods are wider
than the deployment default unless the run config names them.

Privacy unit: the run's (``privacy_unit``, default the employee-day, as in
deployment) is also every simulated device's policy unit. Employee-day
rounds go through SecAgg+: the ServerApp runs Flower's SecAgg+ workflow and
every virtual device answers each stage through the daemon's own
``SecAggStage`` servicer and core (:mod:`keystay.sim.federation.clientapp`).

While it runs, :func:`follow` reads the ServerApp's rows as they land and
turns each into one line of the simulation's JSON output (:func:`sim_row`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from keystay.client.policy import DevicePolicy
from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode
from keystay.server.ledger.ledger import ServerLedger
from keystay.server.rounds import complete_rows
from keystay.server.runlog import ROUNDS_FILE
from keystay.server.settings import RunSettings, SettingsError
from keystay.sim.employees import day_volumes, roster
from keystay.sim.federation.clientapp import Population
from keystay.sim.federation.device import EmployeeData, SimulatedDevice

#: What a report's per-day ε keys mean: the assumption each series holds under.
ASSUMPTIONS = {
    "epsilon": "honest-but-curious server",
    "epsilon_broken": "server that breaks secure aggregation",
}


#: SecAgg+ neighbourhood (shares, reconstruction threshold) of a simulated run
#: of at least that many devices per round. The deployment default (5, 3)
#: halts a round when any device has 3 of its 5 neighbours drop out; in a
#: simulated company about a tenth of the devices hold no eligible day and
#: refuse every round (``no-data``), which at 100 devices stopped one round in
#: three. 11 shares, threshold 6, need 6 of 11 neighbours to drop.
WIDE_SHARES = (11, 6)


class SimError(KeystayError, RuntimeError):
    """The simulation could not run or did not complete its rounds."""

    exit_code = ExitCode.SIM_RUN_FAILED


@dataclass(frozen=True)
class SimOptions:
    """One ``keystay sim`` run.

    ``run_config`` overrides keys of the run configuration (the same keys as
    ``keystay round start``'s ``--run-config``), e.g. ``noise-multiplier``.
    """

    devices: int
    rounds: int
    out: Path
    fraction: float = 1.0
    days: int = 3
    seed: int = 0
    cpus_per_device: float = 1.0
    ray_address: str | None = None
    run_name: str = ""
    privacy_unit: str = "employee-day"
    run_config: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> RunSettings:
        """The run's settings: the deployment defaults, the population's size and overrides.

        Raises
        ------
        SettingsError
            A run config the ServerApp refuses, or an employee-day run over
            fewer devices than the policy's ``min_summed_devices``.
        """
        config: dict[str, Any] = {
            **RunSettings(server_dir=Path("/"), run_name="x").as_run_config(),
            "server-dir": str(self.out.resolve() / "server"),
            "run-name": self.run_name or time.strftime("sim-%Y%m%d-%H%M%S"),
            "num-server-rounds": self.rounds,
            "fraction-train": float(self.fraction),
            "privacy-unit": self.privacy_unit,
            **self.run_config,
        }
        asked = RunSettings.from_run_config(config)  # refuses a bad key or value first
        per_round = max(1, int(self.devices * asked.fraction_train))
        if asked.employee_day:
            t = self.policy(asked.privacy_unit).min_summed_devices
            if self.devices < t:
                raise SettingsError(
                    f"an employee-day run needs at least {t} devices (the devices' "
                    f"min_summed_devices); asked for {self.devices}"
                )
            per_round = max(per_round, t)
        if "min-devices" not in self.run_config:
            config["min-devices"] = per_round
        if asked.employee_day and per_round >= WIDE_SHARES[0] and not (
                {"secagg-num-shares", "secagg-reconstruction-threshold"} & set(self.run_config)):
            config["secagg-num-shares"], config["secagg-reconstruction-threshold"] = WIDE_SHARES
        return RunSettings.from_run_config(config)

    @property
    def devices_dir(self) -> Path:
        """Where the virtual devices' folders (and the run's progress file) are."""
        return self.out.resolve() / "devices"

    @staticmethod
    def policy(privacy_unit: str) -> DevicePolicy:
        """Every simulated device's policy: the built-in defaults, with the run's unit."""
        return DevicePolicy(privacy_unit=privacy_unit)  # type: ignore[arg-type]


def population(options: SimOptions) -> Population:
    """The run's simulated employees (a company of :data:`~keystay.sim.employees.ROLES`)."""
    end = date.today() - timedelta(days=1)
    employees = tuple(
        EmployeeData(seed=seed, role=role.name, day_events=day_volumes(seed, role, options.days),
                     end_day=end)
        for seed, role in roster(options.devices, options.seed)
    )
    unit = options.settings().privacy_unit
    return Population(options.devices_dir, employees, options.policy(unit))


def enroll(population: Population, settings: RunSettings) -> None:
    """Give every device its folder and key, and enroll the keys in the server ledger."""
    settings.server_dir.mkdir(parents=True, exist_ok=True)
    with ServerLedger.open(settings.server_dir) as ledger:
        known = {d.device_id for d in ledger.devices()}
        for i in range(len(population.employees)):
            identity = population.device(i).prepare()
            if identity.device_id not in known:
                ledger.enroll_device(identity.device_id, identity.public_key_pem(),
                                     name=f"simulated-{i:05d}")


def epsilon_means(ledger: ServerLedger, run_name: str, server_round: int) -> dict[str, Any]:
    """Mean ε per employee-day after ``server_round``, under each assumption reports carry.

    Over every day named by a verified report of this round (each a device's
    day with its ε after the round). Keys: :data:`ASSUMPTIONS`' names; also
    the reports' privacy unit.
    """
    sums: dict[str, list[float]] = {}
    units: set[str] = set()
    for report in ledger.reports(run_id=run_name):
        if report.server_round != server_round or not report.verified:
            continue
        payload = json.loads(report.payload_json)
        units.add(str(payload.get("unit", "")))
        for block in payload.get("blocks", []):
            for key, assumption in ASSUMPTIONS.items():
                value = block.get(key)
                if isinstance(value, int | float):
                    sums.setdefault(assumption, []).append(float(value))
    return {
        "epsilon_per_day_mean": {a: sum(v) / len(v) for a, v in sums.items()},
        "days_charged": max((len(v) for v in sums.values()), default=0),
        "privacy_unit": sorted(units),
    }


def sim_row(row: dict[str, Any], ledger: ServerLedger, run_name: str) -> dict[str, Any]:
    """One line of ``keystay sim --json``: the ServerApp's row, summed up for a population."""
    return {
        "round": row["round"],
        "devices_sampled": row.get("devices_sampled", 0),
        "devices_answered": row.get("devices_answered", 0),
        "devices_aggregated": row.get("devices_reported", 0),
        "refused": len(row.get("refusals", [])),
        "unavailable": len(row.get("unavailable", [])),
        "failed": len(row.get("failed", [])),
        "seconds": row.get("seconds"),
        **epsilon_means(ledger, run_name, int(row["round"])),
        "heldout_accuracy": row.get("heldout_accuracy"),
        "heldout_loss": row.get("heldout_loss"),
        "heldout_set": row.get("heldout_set"),
    }


def follow(
    rounds_path: Path, done: threading.Event, on_row: Callable[[dict[str, Any]], None],
    poll: float = 0.5,
) -> None:
    """Call ``on_row`` with each complete row of ``rounds_path`` until ``done`` (then once more)."""
    seen = 0
    while True:
        finished = done.is_set()
        if rounds_path.exists():
            for row in complete_rows(rounds_path.read_text(errors="replace"))[seen:]:
                seen += 1
                if row is not None:
                    on_row(row)
        if finished:
            return
        time.sleep(poll)


def backend_config(options: SimOptions) -> dict[str, Any]:
    """The Ray backend config keystay passes to Flower (see docs/scale.md)."""
    init_args: dict[str, Any] = {"logging_level": "error", "log_to_driver": False}
    if options.ray_address:
        init_args["address"] = options.ray_address
    else:
        # A private Ray: no dashboard (about 200 MB of processes nobody looks at).
        init_args["include_dashboard"] = False
    return {
        "client_resources": {"num_cpus": options.cpus_per_device, "num_gpus": 0.0},
        "init_args": init_args,
    }


def run(
    options: SimOptions, on_row: Callable[[dict[str, Any], dict[str, Any]], None]
) -> RunSettings:
    """Run the simulation; ``on_row(server_row, sim_row)`` per round as it lands.

    Raises
    ------
    SimError
        The engine failed, or fewer rounds completed than asked.
    FlowerPatchError
        The installed Flower is not the release the extractor fix was written for.
    """
    from flwr.app import Context, RecordDict
    from flwr.app.user_config import UserConfig
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from keystay.server.app import app as server_app
    from keystay.sim.federation import flower_patch
    from keystay.sim.federation.clientapp import client_app

    flower_patch.install()
    # Ray 2.55 prints a FutureWarning on every start unless told the coming
    # default (leave CUDA_VISIBLE_DEVICES alone when no GPU is asked for),
    # which is what keystay wants anyway: its actors ask for none.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    settings = options.settings()
    people = population(options)
    enroll(people, settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    done = threading.Event()

    def landed(row: dict[str, Any]) -> None:
        with ServerLedger.open(settings.server_dir) as ledger:
            line = sim_row(row, ledger, settings.run_name)
        rows.append(line)
        on_row(row, line)

    follower = threading.Thread(
        target=follow, args=(settings.run_dir / ROUNDS_FILE, done, landed), daemon=True
    )
    follower.start()
    context = Context(run_id=0, node_id=0, node_config=UserConfig(), state=RecordDict(),
                      run_config=UserConfig(settings.as_run_config()))
    try:
        _run_simulation(
            num_supernodes=options.devices,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app(people),
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config(options),
            server_app_context=context,
        )
    except Exception as error:
        raise SimError(f"the simulation stopped: {type(error).__name__}: {error}") from error
    finally:
        done.set()
        follower.join()
    if len(rows) < options.rounds:
        raise SimError(f"the simulation completed {len(rows)} of {options.rounds} rounds; "
                       f"see the ServerApp's log above and {settings.run_dir}")
    return settings


__all__ = ["SimOptions", "SimulatedDevice", "run"]
