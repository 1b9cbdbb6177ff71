"""The warm trainer process (keystay.client.trainer.process).

These tests start real child processes (each imports torch: a few seconds of
CPU), so they share one trainer where they can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from keystay.client.ledger import accounting
from keystay.client.ledger.accounting import Mechanism
from keystay.client.trainer.job import TrainJob
from keystay.client.trainer.process import (
    RemoteTraceback,
    TrainerCrashedError,
    TrainerError,
    TrainerTimeoutError,
    WarmTrainer,
)
from keystay.common.tokens import VOCAB_SIZE
from keystay.common.windows import WINDOW


def _weights() -> list[np.ndarray]:
    from keystay.common.model import initial_weights

    return initial_weights(seed=0)


def _job(steps: int = 3, **overrides: object) -> TrainJob:
    rng = np.random.default_rng(0)
    fields: dict[str, object] = {
        "weights": _weights(),
        "train": rng.integers(1, VOCAB_SIZE, size=(128, WINDOW + 1)),
        "heldout": rng.integers(1, VOCAB_SIZE, size=(16, WINDOW + 1)),
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "steps": steps,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "seed": 0,
    }
    fields.update(overrides)
    return TrainJob(**fields)  # type: ignore[arg-type]


def _gone(pid: int) -> bool:
    """True if nothing of ``pid`` runs any more: absent, or a zombie all of whose threads ended.

    (SIGKILL makes the main thread a zombie at once; other threads may take a moment.)
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return all(state in ("Z", "X") for state in states)


def _wait_until(condition: Callable[[], bool], limit: float = 30.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _wait_gone(pid: int, limit: float = 30.0) -> bool:
    return _wait_until(lambda: _gone(pid), limit)


@pytest.fixture(scope="module")
def trainer() -> Iterator[WarmTrainer]:
    t = WarmTrainer(warm_up=False)  # warm-up is exercised by the subprocess test
    t.start()
    yield t
    t.close()


# A parent that imports only what the daemon imports: no torch.
PARENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from keystay.client.ledger.accounting import Mechanism
    from keystay.common.tokens import VOCAB_SIZE
    from keystay.client.trainer.job import TrainJob
    from keystay.client.trainer.process import WarmTrainer

    if __name__ == "__main__":
        trainer = WarmTrainer()
        trainer.start()
        pid = trainer.pid
        rng = np.random.default_rng(0)
        windows = rng.integers(1, VOCAB_SIZE, size=(100, 33))
        weights = np.load(sys.argv[1], allow_pickle=False)
        job = TrainJob(
            weights=[weights[k] for k in weights.files], train=windows, heldout=windows[:10],
            noise_multiplier=1.0, max_grad_norm=1.0, steps=4, batch_size=10,
            learning_rate=1e-3,
        )
        outcome = trainer.train(job)
        eps = trainer.epsilons([Mechanism(1.0, outcome.sample_rate, outcome.steps)], 1e-5)
        loss, accuracy = trainer.evaluate(outcome.weights, windows[:10])
        info = trainer.ping()
        print(json.dumps({
            "pid": pid, "ready": trainer.ready, "steps": outcome.steps, "eps": eps.rdp,
            "loss": loss, "ping_pid": info["pid"], "torch": "torch" in sys.modules,
        }), flush=True)
        trainer.close()
        print(json.dumps({"pid_after_close": trainer.pid}), flush=True)
    """
)


def _save_weights(path: Path) -> Path:
    np.savez(path, *_weights())
    return path


def test_daemon_side_never_imports_torch(tmp_path: Path) -> None:
    weights = _save_weights(tmp_path / "w.npz")
    result = subprocess.run(
        [sys.executable, "-c", PARENT, str(weights)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    first, second = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert first["torch"] is False
    assert first["ready"] is True
    assert first["steps"] == 4
    assert first["eps"] > 0
    assert np.isfinite(first["loss"])
    assert first["ping_pid"] == first["pid"]
    assert second["pid_after_close"] is None
    assert _gone(first["pid"])


def test_import_does_not_import_torch() -> None:
    code = "import keystay.client.trainer.process, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_evaluate_and_epsilons(trainer: WarmTrainer) -> None:
    from keystay.client.trainer.dpsgd import train_dp

    job = _job(steps=3)
    outcome = trainer.train(job)
    assert outcome.steps == 3
    # Same seed in and out of the child: the same weights (the child runs train_dp).
    local = train_dp(job)
    assert all(np.array_equal(a, b) for a, b in zip(outcome.weights, local.weights, strict=True))
    history = [Mechanism(1.0, outcome.sample_rate, 300), Mechanism(2.0, 0.1, 50)]
    assert trainer.epsilons(history, 1e-5) == accounting.epsilons(history, delta=1e-5)
    loss, accuracy = trainer.evaluate(outcome.weights, job.heldout)
    assert loss == pytest.approx(outcome.heldout_loss)
    assert accuracy == pytest.approx(outcome.heldout_accuracy)
    assert trainer.ready


def test_a_failing_job_raises_in_the_caller_and_the_child_lives_on(trainer: WarmTrainer) -> None:
    pid = trainer.pid
    bad = _job(train=np.full((64, WINDOW + 1), VOCAB_SIZE + 5))
    with pytest.raises(ValueError, match="vocabularies") as excinfo:
        trainer.train(bad)
    assert isinstance(excinfo.value.__cause__, RemoteTraceback)
    assert "dpsgd.py" in excinfo.value.__cause__.text
    assert trainer.pid == pid
    assert trainer.ping()["pid"] == pid


def test_calls_from_threads_are_serialised(trainer: WarmTrainer) -> None:
    history = [Mechanism(1.0, 0.01, 100)]
    results: list[object] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(trainer.epsilons(history, 1e-5))
        except BaseException as error:  # collected and re-checked below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 4 and all(r == results[0] for r in results)


def test_a_child_killed_while_idle_is_replaced_transparently(trainer: WarmTrainer) -> None:
    pid = trainer.pid
    assert pid is not None
    restarts = trainer.restarts
    os.kill(pid, signal.SIGKILL)
    assert _wait_until(lambda: trainer.pid is None)
    assert not trainer.ready
    new_pid = trainer.ping()["pid"]
    assert new_pid != pid
    assert trainer.restarts == restarts + 1


def test_a_child_killed_mid_job_raises_a_clear_error_then_recovers(trainer: WarmTrainer) -> None:
    pid = trainer.pid
    assert pid is not None
    caught: list[BaseException] = []
    endless = _job(steps=10_000_000)

    def run() -> None:
        try:
            trainer.train(endless)
        except BaseException as error:  # checked below
            caught.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while not trainer.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trainer.busy
    time.sleep(0.3)  # the job is sent right after the call starts; it cannot finish
    os.kill(pid, signal.SIGKILL)
    worker.join(60)
    assert not worker.is_alive()
    assert len(caught) == 1
    error = caught[0]
    assert isinstance(error, TrainerCrashedError)
    assert f"pid {pid}" in str(error) and "SIGKILL" in str(error) and "'train'" in str(error)
    assert "next call starts a new trainer process" in str(error)
    outcome = trainer.train(_job(steps=2))
    assert outcome.steps == 2
    assert trainer.pid != pid


def test_a_call_past_its_timeout_kills_the_child(trainer: WarmTrainer) -> None:
    pid = trainer.pid
    assert pid is not None
    with pytest.raises(TrainerTimeoutError, match="did not finish 'train'"):
        trainer.train(_job(steps=10_000_000), timeout=1.0)
    assert _wait_gone(pid)
    assert trainer.ping()["pid"] != pid


def test_close_stops_the_child_and_start_reopens() -> None:
    t = WarmTrainer(warm_up=False)
    t.start()
    pid = t.pid
    assert pid is not None and t.ready
    t.close()
    assert _gone(pid)
    assert t.pid is None and not t.ready
    with pytest.raises(TrainerError, match="closed"):
        t.ping()
    t.close()  # idempotent
    t.start()
    try:
        assert t.ping()["pid"] not in (None, pid)
    finally:
        t.close()


def test_a_start_failure_names_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child runs with the parent's sys.path: shadow opacus with a broken one.
    broken = tmp_path / "opacus"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('opacus is broken here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    t = WarmTrainer(warm_up=False)
    try:
        with pytest.raises(TrainerError, match=r"could not start.*opacus is broken here"):
            t.start()
        assert t.pid is None
    finally:
        t.close()


ORPHAN = textwrap.dedent(
    """
    import sys, time
    from keystay.client.trainer.process import WarmTrainer

    if __name__ == "__main__":
        trainer = WarmTrainer(warm_up=False)
        trainer.start()
        print(trainer.pid, flush=True)
        time.sleep(600)
    """
)


def test_the_child_exits_when_its_parent_dies() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _gone(child)
    finally:
        parent.kill()  # SIGKILL: no atexit, no close()
        parent.wait(30)
    assert _wait_gone(child)


def test_an_idle_child_is_stopped_and_the_next_call_starts_one() -> None:
    t = WarmTrainer(warm_up=False, idle_timeout=2.0)
    t.start()
    try:
        pid = t.pid
        assert pid is not None
        t.ping()  # a call keeps it: not idle yet
        assert t.pid == pid
        assert _wait_gone(pid, 30.0), "the idle trainer was not stopped"
        assert t.pid is None and t.idle_stops == 1
        assert t.restarts == 0, "an idle stop is not a crash"
        assert t.ping()["pid"] not in (None, pid)
        assert t.last_start_seconds is not None and t.last_start_seconds > 0
    finally:
        t.close()


def test_a_busy_child_is_not_stopped_for_idleness() -> None:
    t = WarmTrainer(warm_up=False, idle_timeout=1.0)
    t.start()
    try:
        started = time.monotonic()
        outcome = t.train(_job(steps=1500))  # a child stopped mid-call would raise here
        assert time.monotonic() - started > 2.0, "the job was too short to test anything"
        assert outcome.steps == 1500
    finally:
        t.close()


def test_idle_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        WarmTrainer(idle_timeout=0)
