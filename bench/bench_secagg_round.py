"""Round time of an employee-day round (SecAgg+ in the daemons) next to a plain record-level one.

Starts a local federation (TLS, enrolled devices) of ``--devices`` daemons
whose policy is the record unit, runs ``--rounds`` plain DP-SGD rounds, stops
it; then the same with the default employee-day policy and SecAgg+ rounds
(shares = devices, threshold = devices - 1, policies allowing that many).
Both use ``--local-steps`` steps; an employee-day round trains each sampled
day separately (``--day-sample-rate`` 1.0: every day, the slowest case).
A round's time is ``seconds`` in ``rounds.jsonl``; the first round pays
one-off costs (bundle fetch, trainer start) and is left out of the median.

    .venv/bin/python bench/bench_secagg_round.py [--devices 3] [--rounds 3] [--local-steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from keystay.server.deploy.local import LocalFederation
from keystay.server.rounds import start_run
from keystay.server.settings import RECORD_NOISE_MULTIPLIER, RunSettings


def _run(root: Path, unit: str, args: argparse.Namespace) -> list[float]:
    t = args.devices - 1
    policy = f'[policy]\nprivacy_unit = "{unit}"\nmin_summed_devices = {t}\n'
    fed = LocalFederation(root, devices=args.devices, simulate_days=2, events_per_day=2500,
                          policy_toml=policy)
    try:
        fed.start()
        values: dict[str, object] = dict(
            server_dir=fed.server_dir, run_name=f"bench-{unit}",
            num_server_rounds=args.rounds, min_devices=args.devices,
            local_steps=args.local_steps, sample_rate=0.1, round_timeout=300.0,
            privacy_unit=unit,
        )
        if unit == "employee-day":
            values.update(day_sample_rate=args.day_sample_rate, update_clip=0.5,
                          secagg_num_shares=args.devices if args.devices % 2 else args.devices + 1,
                          secagg_reconstruction_threshold=t)
        else:
            values.update(noise_multiplier=RECORD_NOISE_MULTIPLIER)
        outcome = start_run(fed.server_dir, RunSettings(**values))  # type: ignore[arg-type]
        if outcome.returncode != 0:
            raise SystemExit(outcome.log_file.read_text(errors="replace")[-3000:])
        return [float(row["seconds"]) for row in outcome.rounds]
    finally:
        fed.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--day-sample-rate", type=float, default=1.0)
    args = parser.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for unit in ("record", "employee-day"):
            seconds = _run(Path(tmp) / unit, unit, args)
            out[unit] = {"rounds_s": seconds, "median_after_first_s": statistics.median(
                seconds[1:] or seconds)}
    out["load_average"] = list(os.getloadavg())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
