"""keystay's round time against the floor of a bare Flower round, side by side.

For each device count it starts one local federation
(:class:`keystay.server.deploy.local.LocalFederation`: a SuperLink with TLS and
node authentication, and N enrolled device daemons, each supervising its
SuperNode), then on those same SuperNodes, back to back:

1. *bare*: the trivial app in ``bench/bare_flwr_app`` (an echo ClientApp and
   a one-phase ServerApp with Flower's stock ``Grid``), sending arrays the
   size of keystay's model to every node, ``--rounds`` times;
2. *keystay*: ``keystay round start``'s run (:func:`keystay.server.rounds.start_run`)
   with ``--local-steps`` DP-SGD steps per device, ``--rounds`` times.

A round's time is the ServerApp's own wall clock from sending to every reply
(keystay's ``seconds`` in ``rounds.jsonl`` also holds its aggregation, ledger
and held-out scoring). The first round of each run is shown but left out of
the median: it pays one-off costs (the SuperNodes fetch the app bundle, a
device starts its trainer on demand). Goal (issue "Fast and light on the
laptop"): keystay ≤ 1.2× the bare floor.

Both apps run on the same device processes, so what the device side sets
(the SuperNode's idle poll, the SuperExec's task poll) applies to both; the
ServerApp's pull interval is each app's own. The machine's load average is
printed with the figures: on a shared machine, read them with it.

    .venv/bin/python bench/bench_round.py [--devices 3 10] [--rounds 4] [--local-steps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keystay.server.deploy.local import LocalFederation, PartFailed
from keystay.server.deploy.superlink import FEDERATION_NAME, ServerConfig, executable, flower_env
from keystay.server.rounds import run_config_arg, start_run
from keystay.server.settings import RunSettings

GOAL_RATIO = 1.2
BARE_APP = Path(__file__).resolve().parent / "bare_flwr_app"


def _model_floats() -> int:
    # Imported here: torch is only needed for this one number.
    from keystay.common.model import ModelConfig, initial_weights

    return sum(int(w.size) for w in initial_weights(ModelConfig(), 0))


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def bare_rounds(federation: LocalFederation, devices: int, rounds: int, floats: int,
                out: Path) -> list[float]:
    """Round times of the bare app on this federation's SuperNodes."""
    server_dir = federation.server_dir
    home = ServerConfig.load(server_dir).write_flwr_home(server_dir)
    times = out / "bare-times.jsonl"
    config = {"num-server-rounds": rounds, "min-nodes": devices, "payload-floats": floats,
              "times-file": str(times)}
    log = out / "bare-run.log"
    with log.open("wb") as sink:
        result = subprocess.run(
            [executable("flwr"), "run", str(BARE_APP), FEDERATION_NAME, "--run-config",
             run_config_arg(config), "--stream"],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=flower_env(home), check=False, timeout=1800,
        )
    rows = [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
    if result.returncode != 0 or len(rows) != rounds:
        raise SystemExit(f"the bare Flower run failed (exit {result.returncode}); see {log}")
    short = [r for r in rows if r["answered"] != devices]
    if short:
        raise SystemExit(f"the bare run had rounds where not every node answered: {short}")
    return [float(r["seconds"]) for r in rows]


def keystay_rounds(federation: LocalFederation, devices: int, rounds: int,
                   local_steps: int) -> list[float]:
    """Round times of a keystay run (``keystay round start``'s path)."""
    settings = RunSettings(server_dir=federation.server_dir, run_name=f"bench-{devices}",
                           num_server_rounds=rounds, min_devices=devices,
                           local_steps=local_steps)
    outcome = start_run(federation.server_dir, settings)
    if not outcome.ok:
        raise SystemExit(f"the keystay run failed (flwr run exit {outcome.returncode}, "
                         f"{len(outcome.rounds)} of {rounds} rounds written); see "
                         f"{outcome.log_file} and the SuperLink's logs in "
                         f"{federation.server_dir / 'logs'}")
    reported = [r for r in outcome.rounds if r.get("devices_reported") != devices]
    if reported:
        raise SystemExit(f"keystay rounds where not every device reported: "
                         f"{[r['round'] for r in reported]}; see {outcome.log_file}")
    return [float(r["seconds"]) for r in outcome.rounds]


def _steady(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def measure(devices: int, rounds: int, local_steps: int, floats: int, root: Path,
            ) -> tuple[list[float], list[float], str]:
    federation = LocalFederation(root / f"devices-{devices}", devices=devices,
                                 simulate_days=2, events_per_day=4000)
    with federation:
        federation.start()
        federation.wait_online(devices)
        before = _load()
        bare = bare_rounds(federation, devices, rounds, floats, root / f"devices-{devices}")
        ours = keystay_rounds(federation, devices, rounds, local_steps)
        return bare, ours, f"{before}; after: {_load()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds per run (the first is left out of the median)")
    parser.add_argument("--local-steps", type=int, default=1,
                        help="DP-SGD steps per device per keystay round (1: the floor)")
    parser.add_argument("--out", type=Path, help="keep the federations' folders here")
    args = parser.parse_args(argv)
    floats = _model_floats()
    print(f"keystay round vs bare Flower round ({args.rounds} rounds each, "
          f"{args.local_steps} local step(s), {floats} float32 each way; goal ≤ {GOAL_RATIO}×)")
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        root = (args.out or Path(tmp)).resolve()
        for devices in args.devices:
            try:
                bare, ours, load = measure(devices, args.rounds, args.local_steps, floats, root)
            except PartFailed as failure:
                print(f"bench_round: {failure}", file=sys.stderr)
                return 1
            ratio = _steady(ours) / _steady(bare)
            verdict = "meets" if ratio <= GOAL_RATIO else "misses"
            print(f"\n{devices} devices ({load})")
            print(f"  bare Flower  rounds {_fmt(bare)}  median after the first "
                  f"{_steady(bare):.2f} s")
            print(f"  keystay      rounds {_fmt(ours)}  median after the first "
                  f"{_steady(ours):.2f} s")
            print(f"  ratio {ratio:.2f}× (goal ≤ {GOAL_RATIO}×: {verdict})")
            sys.stdout.flush()
            time.sleep(1.0)
    return 0


def _fmt(times: list[float]) -> str:
    return " ".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    sys.exit(main())
