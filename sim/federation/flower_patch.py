"""One function of Flower 1.39's Simulation Engine, replaced at start-up: the message extractor.

The problem (upstream bug report text: ``docs/scale.md``)
---------------------------------------------------------
``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`` runs in one
thread and, every 0.1 s, calls ``state.get_message_ins(node_id, limit=1)``
**once per virtual node**. With the in-memory LinkState each of those calls
walks every pending message (and re-checks each one's expiry), so one pass
costs O(nodes × pending messages): 3.5 s at 1,000 nodes and 26.5 s at 3,000
on a laptop core, during which no message reaches the ClientApp actors and
the ServerApp thread starves for the GIL. A round of 1,000 devices spent
most of its time there.

The fix
-------
:func:`add_messages_to_queue` does the same job in one pass over the
pending messages per tick: under the state's lock, every undelivered
message addressed to a node of this simulation is expiry-checked with the
state's own ``_check_stored_messages``, marked delivered and queued. At
most one message per node per tick is taken, as before (a node's next
message waits for the next tick), so message order and delivery semantics
are unchanged. For a LinkState that is not the in-memory one, the original
function runs.

Why a replacement at start-up and not a fork: it is one function of 10
lines; :func:`install` refuses to patch anything but the exact function it
was written against (:data:`FLOWER_VERSION` and the SHA-256 of its source,
:data:`ORIGINAL_SHA256`), so a Flower upgrade fails loudly in the unit test
instead of silently running a stale copy.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections.abc import Callable
from queue import Queue
from typing import Any

import flwr
from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState
from flwr.supercore.date import now

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode

#: The Flower release this replacement was written against.
FLOWER_VERSION = "1.39"
#: SHA-256 of ``inspect.getsource(vce_api.add_messages_to_queue)`` in that release.
ORIGINAL_SHA256 = "953f4bd41a931a7779a4a670ab17b633f6e20b08a0128535328674466419777a"
#: Seconds between passes, as Flower's own extractor.
TICK_S = 0.1


class FlowerPatchError(KeystayError, RuntimeError):
    """The installed Flower is not the one keystay's simulation patch was written for."""

    exit_code = ExitCode.SIM_ENGINE


def source_sha256(function: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


_ORIGINAL = vce_api.add_messages_to_queue


def add_messages_to_queue(
    state: LinkState,
    queue: Queue[Message],
    nodes_mapping: dict[int, int],
    f_stop: threading.Event,
) -> None:
    """Put pending messages in the queue, one pass over them per tick (see the module doc)."""
    if not isinstance(state, InMemoryLinkState):
        _ORIGINAL(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        for msg in _take_pending(state, nodes_mapping):
            queue.put(msg)
        f_stop.wait(TICK_S)


def _take_pending(state: InMemoryLinkState, nodes: dict[int, int]) -> list[Message]:
    taken: dict[int, Message] = {}
    with state.lock:
        for msg_id in list(state.message_ins_store):
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            node = msg.metadata.dst_node_id
            if node not in nodes or node in taken:
                continue
            state._check_stored_messages({msg_id})  # expiry, as get_message_ins does
            if (msg := state.message_ins_store.get(msg_id)) is not None:
                taken[node] = msg
        delivered_at = now().isoformat()
        for msg in taken.values():
            msg.metadata.delivered_at = delivered_at
    return list(taken.values())


def check() -> None:
    """Refuse to patch a Flower this replacement was not written against.

    Raises
    ------
    FlowerPatchError
        The installed Flower's version or the original function's source differs.
    """
    version = flwr.__version__
    if not version.startswith(FLOWER_VERSION + "."):
        raise FlowerPatchError(
            f"keystay sim replaces Flower {FLOWER_VERSION}.x's simulation message extractor; "
            f"Flower {version} is installed. Check docs/scale.md (the upstream report) and "
            "re-validate keystay.sim.federation.flower_patch against it"
        )
    digest = source_sha256(_ORIGINAL)
    if digest != ORIGINAL_SHA256:
        raise FlowerPatchError(
            "Flower's vce_api.add_messages_to_queue is not the function keystay's "
            f"replacement was written for (source SHA-256 {digest}); re-validate "
            "keystay.sim.federation.flower_patch"
        )


def install() -> None:
    """Replace Flower's extractor with :func:`add_messages_to_queue` (idempotent)."""
    check()
    vce_api.add_messages_to_queue = add_messages_to_queue
