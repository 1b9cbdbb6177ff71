"""One SecAgg+ round of Flower's unchanged server workflow over nodes the test chooses.

A node is any function that answers a stage message as a ClientApp would
(``(Message, Context) -> Message``): the deployment relay to a real daemon
(:func:`keystay.client.secagg.secagg_train`), a simulated device's virtual
node (:func:`keystay.sim.federation.clientapp.secagg_reply`), or
:func:`zero_peer`, a bare :class:`SecAggStages` that sends a zero update
without noise. Each node's Context goes through a pickle round trip between
stages, as Flower's Simulation Engine hands it to whichever Ray actor runs
the next message. The strategy keeps the decoded mean and the replies'
metrics (the signed reports).
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from keystay.client.daemon.secagg_stages import SecAggStages, SessionKey
from keystay.server.secagg import CLIPPING_RANGE, MODULUS_RANGE, QUANTIZATION_RANGE

RUN_ID = 7
Node = Callable[[Message, Context], Message]


@contextlib.contextmanager
def superlink_identity() -> Iterator[None]:
    """Flower's workflow creates messages as the SuperLink of run :data:`RUN_ID`."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def zero_peer(shapes: list[tuple[int, ...]], min_summed: int = 3) -> Node:
    """A neighbour that masks the encoding of a zero update (no noise)."""
    stages = SecAggStages(min_summed)
    zero = [np.full(s, QUANTIZATION_RANGE // 2, dtype=np.int64) for s in shapes]  # γ·(0 + c)

    def answer(msg: Message, context: Context) -> Message:
        configs = copy.deepcopy(msg.content.config_records[RECORD_KEY_CONFIGS])
        key = SessionKey(str(RUN_ID), int(msg.metadata.group_id), msg.metadata.dst_node_id)
        stage = configs[Key.STAGE]
        content = RecordDict()
        if stage == Stage.SETUP:
            result = stages.setup(key, configs)
        elif stage == Stage.SHARE_KEYS:
            result = stages.share_keys(key, configs)
        elif stage == Stage.UNMASK:
            result = stages.unmask(key, configs)
        else:
            masking = stages.open_masking(key, configs)
            result = stages.masked_result(masking.mask(zero))
            content = compat.fitres_to_recorddict(
                FitRes(Status(Code.OK, ""), Parameters([], ""), 1, {}), False)
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(result, False)
        return Message(content, reply_to=msg)

    return answer


class OneProcessGrid(Grid):
    """Flower's Grid for a SuperLink whose SuperNodes live in this process.

    What every such stub shares: one run (:attr:`run_id`) and messages made
    in place; a subclass names its nodes (``get_node_ids``) and answers them
    (``send_and_receive``). The push/pull half of the API is never used by
    the SecAgg+ workflow.
    """

    run_id: ClassVar[int] = RUN_ID

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        return Run.create_empty(self.run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError


@dataclass
class NodesGrid(OneProcessGrid):
    """A SuperLink whose SuperNodes are the given node functions, each with its Context."""

    nodes: dict[int, Node]
    contexts: dict[int, Context]
    replies: list[Message] = field(default_factory=list)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            # As the engine: the node's context travels to an actor and back.
            context = pickle.loads(pickle.dumps(self.contexts[node]))
            reply = self.nodes[node](msg, context)
            self.contexts[node] = context
            self.replies.append(reply)
            out.append(reply)
        return out


class Capture(FedAvg):
    """Keeps the workflow's decoded mean; sends every node the round's config."""

    def __init__(self, initial: list[np.ndarray], config: dict[str, Any], nodes: int) -> None:
        super().__init__(fraction_evaluate=0.0, min_fit_clients=nodes,
                         min_available_clients=nodes,
                         initial_parameters=ndarrays_to_parameters(initial),
                         on_fit_config_fn=lambda rnd: {**config, "server-round": rnd})
        self.mean: list[np.ndarray] | None = None
        self.summed = 0

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.summed = len(results)
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return (results[0][1].parameters if results else None), {}


def node_context(node_id: int, node_config: dict[str, Any] | None = None) -> Context:
    return Context(run_id=RUN_ID, node_id=node_id, node_config=dict(node_config or {}),
                   state=RecordDict(), run_config={})


def secagg_round(grid: NodesGrid, initial: list[np.ndarray], config: dict[str, Any],
                 shares: int = 5, threshold: int = 3) -> Capture:
    """Run one round of Flower's SecAggPlusWorkflow with keystay's ranges over ``grid``."""
    strategy = Capture(initial, config, len(grid.nodes))
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(),
                      run_config={})
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = SecAggPlusWorkflow(shares, threshold, max_weight=1.0,
                                  clipping_range=CLIPPING_RANGE,
                                  quantization_range=QUANTIZATION_RANGE,
                                  modulus_range=MODULUS_RANGE)
    with superlink_identity():
        DefaultWorkflow(fit_workflow=workflow, evaluate_workflow=lambda g, c: None)(grid, legacy)
    return strategy


def reports(grid: NodesGrid) -> list[dict[str, Any]]:
    """The signed reports that came back beside masked vectors (metrics of a FitRes)."""
    found = []
    for reply in grid.replies:
        if reply.has_error() or "fitres.metrics" not in reply.content.config_records:
            continue
        metrics = reply.content.config_records["fitres.metrics"]
        if "payload-json" in metrics:
            found.append(dict(metrics))
    return found
