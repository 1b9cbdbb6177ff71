"""Memory pressure on the warm trainer: stopped and replaced, and the round refused clearly.

The trainer child gets a real address-space limit (``prlimit(RLIMIT_AS)`` on
its pid, just above what it maps now) and then a job too large for it. The
call must end in :class:`TrainerCrashedError` (its out-of-memory subclass when
the allocation fails inside the job, the base class when the child dies
outright), the child must be gone, and the next call must run in a new child
without the limit. The daemon-side refusal the server sees is checked too.
"""
from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from keystay.client.trainer.process import TrainerCrashedError, WarmTrainer
from keystay.common.windows import WINDOW

from .test_warm_trainer import _gone, _job

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="prlimit on another process is Linux-only")


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


@pytest.fixture
def trainer() -> Iterator[WarmTrainer]:
    t = WarmTrainer(warm_up=False)
    t.start()
    yield t
    t.close()


def test_out_of_memory_stops_the_trainer_and_the_next_call_gets_a_new_one(
    trainer: WarmTrainer,
) -> None:
    assert trainer.train(_job(steps=1)).steps == 1  # warm: torch imported, model built
    pid = trainer.pid
    assert pid is not None
    limit = _vm_size(pid) + 32 * 2**20
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    rng = np.random.default_rng(0)
    # ~110 MB of windows: more than the 32 MB of headroom left to the child.
    big = _job(steps=1, train=rng.integers(1, 100, size=(400_000, WINDOW + 1)))
    with pytest.raises(TrainerCrashedError) as info:
        trainer.train(big)
    assert f"pid {pid}" in str(info.value)
    assert "next call starts a new trainer process" in str(info.value)
    assert _gone(pid)
    assert trainer.restarts >= 1
    assert trainer.train(_job(steps=2)).steps == 2
    assert trainer.pid != pid


class _AbortedError(Exception):
    pass


class _Context:
    """Records the servicer's abort, as grpc's context would end the call."""

    code: object = None
    details: str = ""

    def abort(self, code: object, details: str) -> None:
        self.code, self.details = code, details
        raise _AbortedError


def test_a_round_whose_trainer_dies_is_refused_clearly_and_stays_charged(
    tmp_path: Path,
) -> None:
    import grpc

    from keystay.client.daemon.service import FederationServicer
    from keystay.client.serde import weights_to_proto
    from keystay.v1 import device_pb2
    from tests.unit.client.daemon.test_core import SPEC, make_core, weights

    core, fake = make_core(tmp_path / "d")

    def killed(job: object) -> None:
        raise TrainerCrashedError("the trainer process (pid 1) was killed by SIGKILL")

    fake.train = killed  # type: ignore[method-assign]
    request = device_pb2.TrainRequest(
        run_id="run-a", server_round=1, weights=weights_to_proto(weights()),
        spec=device_pb2.TrainSpec(noise_multiplier=1.0, max_grad_norm=1.0, local_steps=5,
                                  sample_rate=0.05, learning_rate=0.01, dp=True))
    assert SPEC
    context = _Context()
    with pytest.raises(_AbortedError):
        FederationServicer(core).Train(request, context)  # type: ignore[arg-type]
    assert context.code == grpc.StatusCode.INTERNAL
    assert "trainer stopped during this round" in context.details
    assert "pid" not in context.details  # a fixed sentence: nothing of the device's state
    # Write-ahead: the charge made before training stands (never refunded).
    assert core.ledger.totals() and all(t.epsilon > 0 for t in core.ledger.totals())
