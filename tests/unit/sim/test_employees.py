"""Simulated employees: determinism, distinct styles, learnable streams, store filling."""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter
from datetime import date
from pathlib import Path

from keystay.client.store import EventStore
from keystay.common.events import AppFocus, KeyEvent, RawEvent
from keystay.common.tokens import Tokenizer, token_name
from keystay.sim.employees import (
    EmployeeStyle,
    SimulatedEmployee,
    SimulatedSource,
    fill_store,
)

DAY = date(2024, 3, 4)


def first_events(seed: int, n: int, session_seed: int | None = None) -> list[RawEvent]:
    return list(itertools.islice(SimulatedEmployee(seed).events(session_seed=session_seed), n))


def test_same_seed_same_events_other_seed_other_events() -> None:
    assert first_events(3, 3000) == first_events(3, 3000)
    assert first_events(3, 3000) != first_events(4, 3000)
    assert EmployeeStyle.draw(3) == EmployeeStyle.draw(3) != EmployeeStyle.draw(4)


def test_no_global_random_state_is_used() -> None:
    import random

    random.seed(1)
    a = first_events(5, 500)
    random.seed(2)
    assert first_events(5, 500) == a


def test_events_are_time_ordered_and_keys_are_released() -> None:
    events = first_events(11, 20000)
    assert isinstance(events[0], AppFocus)
    assert all(a.t <= b.t for a, b in itertools.pairwise(events))
    down: Counter[int | None] = Counter()
    for e in events:
        if isinstance(e, KeyEvent):
            down[e.vk] += 1 if e.pressed else -1
            assert down[e.vk] >= 0, f"release before press of keycode {e.vk}"
    assert sum(down.values()) <= 3  # only keys still held at the cut


def test_day_records_are_exact_deterministic_and_differ_by_day() -> None:
    employee = SimulatedEmployee(2)
    day1 = employee.day_records(DAY, 3000)
    assert len(day1) == 3000
    assert SimulatedEmployee(2).day_records(DAY, 3000) == day1
    assert employee.day_records(date(2024, 3, 5), 3000) != day1
    assert all(a.t <= b.t for a, b in itertools.pairwise(day1))


def entropy(counts: Counter[int]) -> float:
    total = counts.total()
    return -math.fsum(c / total * math.log2(c / total) for c in counts.values())


def test_streams_are_learnable() -> None:
    """The previous two tokens must say a lot about the next one."""
    tokens = [r.token for r in SimulatedEmployee(1).day_records(DAY, 20000)]
    unigram = entropy(Counter(tokens))
    context: dict[tuple[int, int], Counter[int]] = {}
    for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
        context.setdefault((a, b), Counter())[c] += 1
    n = len(tokens) - 2
    conditional = math.fsum(cnt.total() / n * entropy(cnt) for cnt in context.values())
    assert unigram - conditional > 1.5, (unigram, conditional)


def test_styles_show_in_the_tokens() -> None:
    """Employees differ more from each other than one employee's days do."""

    def distribution(seed: int, day: date = DAY) -> Counter[int]:
        return Counter(r.token for r in SimulatedEmployee(seed).day_records(day, 10000))

    def distance(p: Counter[int], q: Counter[int]) -> float:  # total variation
        return 0.5 * sum(abs(p[k] / p.total() - q[k] / q.total()) for k in set(p) | set(q))

    one, other = distribution(1), distribution(2)
    one_later = distribution(1, date(2024, 3, 5))
    assert distance(one, other) > 0.1
    assert distance(one, one_later) < distance(one, other)


def test_typos_are_followed_by_backspaces() -> None:
    employee = next(SimulatedEmployee(s) for s in range(100)
                    if SimulatedEmployee(s).style.error_rate > 0.04)
    names = [token_name(r.token) for r in employee.day_records(DAY, 20000)]
    assert names.count("key:backspace") > 20


def test_fill_store_writes_daily_blocks(tmp_path: Path) -> None:
    with EventStore.open(tmp_path / "data") as store:
        written = fill_store(store, seed=9, days=3, events_per_day=2500, end_day=DAY,
                             batch_size=1000)
        assert written == 7500
        blocks = store.blocks()
        assert [b.block for b in blocks] == ["2024-03-02", "2024-03-03", "2024-03-04"]
        assert all(b.events == 2500 and b.batches == 3 for b in blocks)
        assert store.read_block("2024-03-04") == SimulatedEmployee(9).day_records(DAY, 2500)


def test_fill_store_terminates_when_everything_is_excluded(tmp_path: Path) -> None:
    employee = SimulatedEmployee(9)
    tok = Tokenizer(excluded_apps=employee.style.apps)
    with EventStore.open(tmp_path / "data") as store:
        written = fill_store(store, seed=9, days=1, events_per_day=50, end_day=DAY,
                             tokenizer=tok)
    assert written <= 1  # at most the single "paused" marker


def test_source_emits_ordered_events_until_stopped() -> None:
    source = SimulatedSource(4, speed=200.0)
    stop = threading.Event()
    got: list[RawEvent] = []

    def collect(event: RawEvent) -> None:
        got.append(event)
        if len(got) >= 300:
            stop.set()

    count = source.run(collect, stop)
    assert count == len(got) == 300
    assert all(a.t <= b.t for a, b in itertools.pairwise(got))
    # Same events as the generator, only re-timed.
    expected = first_events(4, 300, session_seed=None)
    assert [type(e) for e in got] == [type(e) for e in expected]


def test_source_thread_start_and_stop() -> None:
    source = SimulatedSource(4, speed=50.0)
    seen = threading.Event()
    source.start(lambda event: seen.set())
    try:
        assert seen.wait(10.0)
        assert source.running
    finally:
        source.stop()
    assert not source.running


# -- roles and populations -----------------------------------------------------

import pytest  # noqa: E402

from keystay.sim import employees as _emp  # noqa: E402


def test_role_shares_sum_to_one() -> None:
    assert abs(sum(r.share for r in _emp.ROLES) - 1.0) < 1e-9


def test_a_roster_is_reproducible_and_mixes_every_role() -> None:
    a, b = _emp.roster(200, seed=3), _emp.roster(200, seed=3)
    assert a == b and a != _emp.roster(200, seed=4)
    assert {r.name for _, r in a} == {r.name for r in _emp.ROLES}
    assert len({s for s, _ in a}) == 200 and max(s for s, _ in a) < 1_000_000_000


def test_a_role_sets_apps_and_habits_and_leaves_other_habits_to_the_seed() -> None:
    dev, mgr = _emp.role_named("developer"), _emp.role_named("manager")
    d, m = _emp.EmployeeStyle.draw(42, dev), _emp.EmployeeStyle.draw(42, mgr)
    plain = _emp.EmployeeStyle.draw(42)
    assert d.apps == dev.apps and m.apps == mgr.apps
    assert dev.wpm[0] <= d.wpm <= dev.wpm[1] and mgr.wpm[0] <= m.wpm <= mgr.wpm[1]
    assert d.error_rate == m.error_rate == plain.error_rate


def test_day_volumes_differ_widely_by_role_and_by_day() -> None:
    def median(role: str) -> float:
        vols = sorted(v for s in range(1, 60)
                      for v in _emp.day_volumes(s, _emp.role_named(role), 5))
        return vols[len(vols) // 2]

    assert median("support") > 2 * median("manager")
    manager = _emp.role_named("manager")
    manager_days = [v for s in range(1, 60) for v in _emp.day_volumes(s, manager, 5)]
    assert min(manager_days) < 200 < 5000 < max(manager_days)
    assert _emp.day_volumes(7, _emp.role_named("designer"), 4) == _emp.day_volumes(
        7, _emp.role_named("designer"), 4)


@pytest.mark.parametrize("role", [r.name for r in _emp.ROLES])
def test_every_role_simulates_a_day(role: str) -> None:
    from datetime import date

    # Designers use apps outside APPS (their taskbar slots come after it).
    records = _emp.SimulatedEmployee(5, _emp.role_named(role)).day_records(
        date(2026, 1, 5), 3000)
    assert len(records) == 3000


def test_an_unknown_role_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="accountant"):
        _emp.role_named("accountant")
