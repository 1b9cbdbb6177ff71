"""keystay's round time against the floor of bare Flower rounds, side by side.

For each device count it starts one local federation
(:class:`keystay.server.deploy.local.LocalFederation`: a SuperLink with TLS and
node authentication, and N enrolled device daemons, each supervising its
SuperNode), then on those same SuperNodes, back to back:

1. *bare Flower, one phase*: ``bench/bare_flwr_app`` (an echo ClientApp and a
   one-phase ServerApp with Flower's stock ``Grid``), sending arrays the size
   of keystay's model to every node;
2. *bare Flower SecAgg+*: ``bench/bare_secagg_app``, Flower 1.39's own
   ``SecAggPlusWorkflow`` and ``secaggplus_mod`` (four message phases) around a
   ClientApp that returns a constant vector the size of keystay's model, with
   keystay's default shares and threshold (``RunSettings``: 5 and 3) and its
   encoding ranges (``keystay.server.secagg``), on Flower's stock ``Grid``;
3. the same at keystay's pull interval (``keystay.server.grid_poll``: 0.5 s
   instead of Flower's 3 s), so the difference to keystay is keystay's own
   work and not how often the ServerApp asks for replies;
4. *keystay*: ``keystay round start``'s run (:func:`keystay.server.rounds.start_run`)
   with the default privacy unit, the employee-day (SecAgg+ in the daemons),
   and ``--local-steps`` steps per sampled day.

Each runs ``--rounds`` rounds. A round's time is the ServerApp's own wall clock:
from sending (for SecAgg+, from the strategy's ``configure_fit``) to every
reply (SecAgg+: to the aggregate). keystay's ``seconds`` in ``rounds.jsonl``
also holds its ledger, checkpoint and held-out scoring. The first round of
each run is shown but left out of the median: it pays one-off costs (the
SuperNodes fetch the app bundle, a device starts its trainer on demand). The
SecAgg+ variants also print their seconds per protocol stage (keystay's from
``stage_seconds`` in its rows), which is where keystay's time beyond the
SecAgg+ floor shows, and every variant prints the CPU seconds per round of
the federation's processes by role (:func:`federation_cpu`), which, unlike
wall time, a busy machine hardly moves. Goal (issue "Fast and light on the laptop"): keystay
≤ 1.2× the bare floor; the ratio is printed against each variant.

All apps run on the same device processes, so what the device side sets
(the SuperNode's idle poll, the SuperExec's task poll) applies to all; the
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procfs import processes

from keystay.server.deploy.local import LocalFederation, PartFailed
from keystay.server.deploy.superlink import FEDERATION_NAME, ServerConfig, executable, flower_env
from keystay.server.grid_poll import PULL_INTERVAL
from keystay.server.rounds import run_config_arg, start_run
from keystay.server.secagg import CLIPPING_RANGE, MODULUS_RANGE, QUANTIZATION_RANGE
from keystay.server.settings import RunSettings

GOAL_RATIO = 1.2
BARE_APP = Path(__file__).resolve().parent / "bare_flwr_app"
BARE_SECAGG_APP = Path(__file__).resolve().parent / "bare_secagg_app"
BARE = "bare Flower, one phase"
BARE_SECAGG = "bare Flower SecAgg+"
BARE_SECAGG_PROMPT = f"bare Flower SecAgg+, {PULL_INTERVAL:g} s pull"
KEYSTAY = "keystay (employee-day SecAgg+)"
#: The SecAgg+ stages, then keystay's report checks (inside the stages) and its
#: held-out scoring (after them), as its rows' ``stage_seconds`` name them.
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask", "report_checks",
          "heldout_score")


#: How a process of the federation is named in the CPU table: by the program
#: it runs (the words after the interpreter); a program not named here counts
#: with its parent, so a ServerApp or ClientApp is its SuperExec's, alive or
#: reaped.
PROGRAMS = (("flower-superlink", "SuperLink"), ("supernode_launch", "SuperNode"),
            ("flower-supernode", "SuperNode"), ("daemon.reaper", "SuperNode"),
            ("multiprocessing.spawn", "trainer"), ("resource_tracker", "daemon"),
            ("device run", "daemon"), ("server start", "keystay server"),
            ("flwr run", "flwr run"), ("flower-superexec", "SuperExec"))


def _role(cmd: str, parent: str) -> str:
    words = cmd.split()
    program = " ".join(words[1:5]) if words and "python" in words[0] else " ".join(words[:4])
    # A program not named (a ServerApp or ClientApp, say) counts with its parent.
    role = next((name for key, name in PROGRAMS if key in program), parent or "other")
    if role == "SuperExec":  # a SuperLink's runs ServerApps, a SuperNode's ClientApps
        return "SuperExec+ServerApps" if parent == "SuperLink" else "SuperExec+ClientApps"
    return role


def federation_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's descendants, by role (see :data:`PROGRAMS`).

    Each process counts its own CPU and that of the children it has reaped
    (``/proc/PID/stat`` utime, stime, cutime, cstime), so a ClientApp that
    came and went between two readings is in its SuperExec's figure. The
    difference of two readings is what the federation spent between them, on
    every core: unlike wall time, it hardly moves with the machine's load.
    """
    procs = {p.pid: (p.ppid, p.cpu_s + p.reaped_cpu_s, p.cmd) for p in processes()}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    todo = [(pid, "") for pid in children.get(os.getpid(), [])]
    while todo:
        pid, parent = todo.pop()
        _, cpu, cmd = procs[pid]
        role = _role(cmd, parent)
        todo.extend((child, role) for child in children.get(pid, []))
        out[role] = out.get(role, 0.0) + cpu
    return out


def _model_floats() -> int:
    # Imported here: torch is only needed for this one number.
    from keystay.common.model import ModelConfig, initial_weights

    return sum(int(w.size) for w in initial_weights(ModelConfig(), 0))


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def _flwr_run(federation: LocalFederation, app: Path, config: dict[str, object], out: Path,
              name: str, rounds: int) -> list[dict[str, Any]]:
    """Submit ``app`` with ``config`` to this federation; its rows from ``times-file``."""
    server_dir = federation.server_dir
    home = ServerConfig.load(server_dir).write_flwr_home(server_dir)
    times = out / f"{name}-times.jsonl"
    log = out / f"{name}-run.log"
    with log.open("wb") as sink:
        result = subprocess.run(
            [executable("flwr"), "run", str(app), FEDERATION_NAME, "--run-config",
             run_config_arg({**config, "times-file": str(times)}), "--stream"],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=flower_env(home), check=False, timeout=1800,
        )
    rows = [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
    if result.returncode != 0 or len(rows) != rounds:
        raise SystemExit(f"the {name} run failed (exit {result.returncode}, {len(rows)} of "
                         f"{rounds} rounds written); see {log}")
    return rows


def bare_rounds(federation: LocalFederation, devices: int, rounds: int, floats: int,
                out: Path) -> Run:
    """Round times of the one-phase bare app on this federation's SuperNodes."""
    config = {"num-server-rounds": rounds, "min-nodes": devices, "payload-floats": floats}
    rows = _flwr_run(federation, BARE_APP, config, out, "bare", rounds)
    short = [r for r in rows if r["answered"] != devices]
    if short:
        raise SystemExit(f"the bare run had rounds where not every node answered: {short}")
    return Run([float(r["seconds"]) for r in rows])


def bare_secagg_rounds(federation: LocalFederation, devices: int, rounds: int, floats: int,
                       out: Path, pull_interval: float) -> Run:
    """Round times of Flower's own SecAgg+ (``bench/bare_secagg_app``) on these SuperNodes.

    With keystay's default shares, threshold and encoding ranges; ``pull_interval``
    0 keeps Flower's Grid as given (3 s between pulls).
    """
    defaults = RunSettings(server_dir=federation.server_dir, run_name="bare-secagg")
    config = {"num-server-rounds": rounds, "min-nodes": devices, "payload-floats": floats,
              "num-shares": defaults.secagg_num_shares,
              "reconstruction-threshold": defaults.secagg_reconstruction_threshold,
              "clipping-range": CLIPPING_RANGE, "quantization-range": QUANTIZATION_RANGE,
              "modulus-range": MODULUS_RANGE, "pull-interval": pull_interval}
    name = "bare-secagg" if pull_interval == 0 else "bare-secagg-prompt"
    rows = _flwr_run(federation, BARE_SECAGG_APP, config, out, name, rounds)
    short = [r for r in rows if r["summed"] != devices]
    if short:
        raise SystemExit(f"the {name} run had rounds that did not sum every node: {short}")
    return Run([float(r["seconds"]) for r in rows], [r["stages"] for r in rows])


def keystay_rounds(federation: LocalFederation, devices: int, rounds: int,
                   local_steps: int) -> Run:
    """Round times of a keystay run (``keystay round start``'s path, the default unit)."""
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
    return Run([float(r["seconds"]) for r in outcome.rounds],
               [dict(r.get("stage_seconds") or {}) for r in outcome.rounds])


@dataclass
class Run:
    """One variant's rounds: wall seconds, and (SecAgg+ variants) seconds per stage."""

    seconds: list[float]
    stages: list[dict[str, float]] = field(default_factory=list)
    #: CPU seconds per round of the federation's processes, by role, over the
    #: whole run (its first round and the ServerApp's start included).
    cpu: dict[str, float] = field(default_factory=dict)
    load: str = ""

    def steady(self) -> float:
        """Median round time, the first round left out (one-off costs)."""
        return _steady(self.seconds)

    def steady_stages(self) -> dict[str, float]:
        """Median seconds of each stage, the first round left out."""
        rows = self.stages[1:] if len(self.stages) > 1 else self.stages
        names = [name for name in STAGES if any(name in row for row in rows)]
        return {name: statistics.median(row.get(name, 0.0) for row in rows) for name in names}


def _steady(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def measure(devices: int, rounds: int, local_steps: int, floats: int, root: Path,
            skip: Sequence[str] = ()) -> tuple[dict[str, Run], str]:
    """Every variant's rounds on one federation of ``devices``, back to back."""
    folder = root / f"devices-{devices}"
    federation = LocalFederation(folder, devices=devices, simulate_days=2, events_per_day=4000)
    variants: dict[str, Callable[[], Run]] = {
        BARE: lambda: bare_rounds(federation, devices, rounds, floats, folder),
        BARE_SECAGG: lambda: bare_secagg_rounds(federation, devices, rounds, floats, folder,
                                                0.0),
        BARE_SECAGG_PROMPT: lambda: bare_secagg_rounds(federation, devices, rounds, floats,
                                                       folder, PULL_INTERVAL),
        KEYSTAY: lambda: keystay_rounds(federation, devices, rounds, local_steps),
    }
    with federation:
        federation.start()
        federation.wait_online(devices)
        before = _load()
        runs = {}
        for name, variant in variants.items():
            if name in skip:
                continue
            cpu_before, load = federation_cpu(), _load()
            run = variant()
            cpu_after = federation_cpu()
            run.cpu = {role: (cpu_after.get(role, 0.0) - cpu_before.get(role, 0.0)) / rounds
                       for role in sorted(set(cpu_after) | set(cpu_before))}
            run.load = load
            runs[name] = run
        return runs, f"{before}; after: {_load()}"


def report(devices: int, runs: dict[str, Run], load: str) -> None:
    """Print one device count's figures: rounds, medians, ratios, stages."""
    ours = runs[KEYSTAY].steady()
    print(f"\n{devices} devices ({load})")
    print(f"  {'variant':<34} {'median s':>8}  {'keystay / it':>12}  goal ≤ {GOAL_RATIO}×  "
          f"rounds (s)")
    for name, run in runs.items():
        ratio = ours / run.steady()
        verdict = "" if name == KEYSTAY else ("meets" if ratio <= GOAL_RATIO else "misses")
        shown = "" if name == KEYSTAY else f"{ratio:.2f}×"
        print(f"  {name:<34} {run.steady():>8.2f}  {shown:>12}  {verdict:<9} {_fmt(run.seconds)}")
    staged = {name: run.steady_stages() for name, run in runs.items() if run.stages}
    if staged:
        print("  seconds per stage (median after the first round; keystay's round also "
              "scores the held-out set):")
        print(f"  {'variant':<34} " + " ".join(f"{name:>22}" for name in STAGES))
        for name, stages in staged.items():
            print(f"  {name:<34} " + " ".join(
                f"{stages[s]:>22.2f}" if s in stages else f"{'-':>22}" for s in STAGES))
    roles = sorted({role for run in runs.values() for role in run.cpu})
    print("  CPU seconds per round of the federation's processes (all rounds of the run; "
          "the load average when each started):")
    print(f"  {'variant':<34} {'total':>6} " + " ".join(f"{r:>{max(len(r), 6)}}" for r in roles)
          + "  load")
    for name, run in runs.items():
        print(f"  {name:<34} {sum(run.cpu.values()):>6.2f} " + " ".join(
            f"{run.cpu.get(r, 0.0):>{max(len(r), 6)}.2f}" for r in roles)
            + f"  {run.load.split(' (1 min)')[0].removeprefix('load ')}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds per run (the first is left out of the median)")
    parser.add_argument("--local-steps", type=int, default=1,
                        help="DP-SGD steps per device per keystay round (1: the floor)")
    parser.add_argument("--out", type=Path, help="keep the federations' folders here")
    parser.add_argument("--no-prompt-floor", action="store_true",
                        help=f"skip the bare SecAgg+ run at keystay's {PULL_INTERVAL:g} s pull "
                             "(saves a run at 10 devices)")
    args = parser.parse_args(argv)
    floats = _model_floats()
    print(f"keystay round vs bare Flower rounds ({args.rounds} rounds each, "
          f"{args.local_steps} local step(s), {floats} float32 each way; goal ≤ {GOAL_RATIO}×)")
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        root = (args.out or Path(tmp)).resolve()
        for devices in args.devices:
            try:
                runs, load = measure(devices, args.rounds, args.local_steps, floats, root,
                                     skip=[BARE_SECAGG_PROMPT] if args.no_prompt_floor else [])
            except PartFailed as failure:
                print(f"bench_round: {failure}", file=sys.stderr)
                return 1
            report(devices, runs, load)
            time.sleep(1.0)
    return 0


def _fmt(times: list[float]) -> str:
    return " ".join(f"{t:.2f}" for t in times)


if __name__ == "__main__":
    sys.exit(main())
