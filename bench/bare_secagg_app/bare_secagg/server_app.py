"""The ServerApp of the bare SecAgg+ app: Flower's own ``SecAggPlusWorkflow``, timed.

Flower 1.39's own pieces, set up as its secure-aggregation example does: the
ServerApp runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` over a
``LegacyContext`` and Flower's legacy ``FedAvg`` (no evaluation); the
ClientApp is :mod:`bare_secagg.client_app`.

The protocol settings come from the run config: ``bench/bench_round.py``
passes keystay's defaults (5 shares, threshold 3, keystay's clipping,
quantization and modulus ranges, so the masked vectors have the same size
and dtype). The ServerApp uses the ``Grid`` Flower gives it, with Flower's own
3 s pull interval, unless ``pull-interval`` > 0: then replies are pulled that
often, through keystay's :class:`~keystay.server.grid_poll.PromptGrid` (the
ServerApp runs in the server's environment, where keystay is installed), so
the bench can compare keystay with this floor at the same pull interval too.

The only addition to Flower's workflow is a stopwatch: a subclass that times
each stage and the round (from the strategy's ``configure_fit`` to its
``aggregate_fit``), and appends one JSON line per round to ``times-file``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid, ServerApp

server = ServerApp()

Stage = Callable[[Grid, LegacyContext, WorkflowState], bool]


class TimedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow`` with a stopwatch on each stage.

    Parameters
    ----------
    times_file : Path
        Where each round's line is appended.
    **kwargs
        ``SecAggPlusWorkflow``'s own parameters.
    """

    def __init__(self, times_file: Path, **kwargs: float | int | None) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._times_file = times_file
        self._stages: dict[str, float] = {}
        self._summed = 0

    def __call__(self, grid: Grid, context: Context) -> None:
        self._stages, self._summed = {}, 0
        started = time.perf_counter()
        super().__call__(grid, context)
        seconds = time.perf_counter() - started
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        row = {"round": int(cast(int, cfg[WorkflowKey.CURRENT_ROUND])),
               "seconds": round(seconds, 3),
               "stages": {name: round(s, 3) for name, s in self._stages.items()},
               "summed": self._summed}
        with self._times_file.open("a") as out:
            out.write(json.dumps(row) + "\n")

    def _timed(self, name: str, stage: Stage, grid: Grid, context: LegacyContext,
               state: WorkflowState) -> bool:
        started = time.perf_counter()
        ok = stage(grid, context, state)
        self._stages[name] = time.perf_counter() - started
        return ok

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._timed("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext,
                         state: WorkflowState) -> bool:
        return self._timed("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext,
                                     state: WorkflowState) -> bool:
        return self._timed("collect_masked_vectors", super().collect_masked_vectors_stage,
                           grid, context, state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = self._timed("unmask", super().unmask_stage, grid, context, state)
        self._summed = len(state.legacy_results) if ok else 0
        return ok


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` SecAgg+ rounds over all ``min-nodes`` nodes."""
    config = context.run_config
    min_nodes = int(config["min-nodes"])
    if float(config["pull-interval"]) > 0:
        from keystay.server.grid_poll import PromptGrid

        grid = PromptGrid(grid, float(config["pull-interval"]))
    payload = np.zeros(int(config["payload-floats"]), dtype=np.float32)
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_nodes,
                      min_evaluate_clients=0, min_available_clients=min_nodes,
                      initial_parameters=ndarrays_to_parameters([payload]))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=int(
        config["num-server-rounds"])), strategy=strategy)
    fit = TimedSecAggPlusWorkflow(
        Path(str(config["times-file"])),
        num_shares=int(config["num-shares"]),
        reconstruction_threshold=int(config["reconstruction-threshold"]),
        max_weight=1.0,
        clipping_range=float(config["clipping-range"]),
        quantization_range=int(config["quantization-range"]),
        modulus_range=int(config["modulus-range"]),
        timeout=600.0,
    )
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
