"""The employee's controls: status, pause, show, forget, export, policy.

These answer the ``keystay device ...`` commands over the daemon's control
socket, which serves only the daemon's own uid (see
:mod:`keystay.client.daemon.control_socket`); the federation cannot reach them.
They describe what is kept — token counts by kind, apps seen, ε spent — and
never return raw text, except ``export``, which gives employees their own
data (raw text appears there only if their policy allowed recording it).
``show`` also lists recent training refusals with their full reasons: the
federation was told only each refusal's code (see
:mod:`keystay.client.daemon.refusals`), so this is where the employee, and
nobody else, reads why.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from datetime import datetime
from typing import Any, Protocol

from keystay.client.daemon.core import DeviceCore
from keystay.client.ledger.ledger import BlockTotal
from keystay.client.store import EventStore
from keystay.common.tokens import token_kind, token_name
from keystay.v1 import device_pb2

EXPORT_FORMAT = "keystay-export/1"
#: Longest timed pause: a year. Longer is "until resumed" (seconds = 0).
MAX_PAUSE_S = 366 * 86400.0


class PausableSource(Protocol):
    """What the controls need of a recorder."""

    def pause(self, until: float | None) -> None: ...
    def resume(self) -> None: ...
    @property
    def paused(self) -> bool: ...
    @property
    def paused_until(self) -> float | None: ...


class Controls:
    """Answers the employee's commands for one daemon.

    Parameters
    ----------
    core : DeviceCore
        Owns the store, ledger and policy.
    recorder : PausableSource | None
        The live recorder, if the daemon records (``--source pynput|simulated``).
    source : str
        The name of the source, for status.
    version : str
        keystay's version, for status.
    policy_source : str
        Where the policy was loaded from (a path, or "built-in defaults"), for
        ``policy``.
    """

    def __init__(
        self,
        core: DeviceCore,
        recorder: PausableSource | None,
        source: str,
        version: str,
        policy_source: str = "built-in defaults (no policy.toml)",
    ) -> None:
        self.core = core
        self.recorder = recorder
        self.source = source
        self.version = version
        self.policy_source = policy_source
        self._lock = threading.Lock()

    @property
    def store(self) -> EventStore:
        return self.core.store

    def status(self) -> device_pb2.StatusReply:
        totals = {t.block: t for t in self.core.ledger.totals()}
        today = self.core.today_block()
        blocks = []
        events_today = 0
        for info in self.store.blocks():
            if info.block == today:
                events_today = info.events
            total = totals.get(info.block)
            blocks.append(self._block_status(info.block, info.events, total))
        recording = self.recorder is not None and not self.recorder.paused
        # Only the real Recorder has stats; a bare PausableSource (tests) does not.
        stats = getattr(self.recorder, "stats", None)
        problem = getattr(stats, "store_problem", None) if stats is not None else None
        until = self.recorder.paused_until if self.recorder is not None else None
        return device_pb2.StatusReply(
            device_id=self.core.device_id,
            recording=recording,
            paused_until=_iso(until) if until else "",
            source=self.source,
            events_today=events_today,
            store_bytes=self.store.size_bytes(),
            blocks=blocks,
            delta=self.core.policy.delta,
            trainer_ready=self.core.trainer.ready,
            version=self.version,
            store_writing_stopped=bool(getattr(stats, "writing_stopped", False)),
            store_problem=problem or "",
        )

    def _block_status(
        self, block: str, events: int, total: BlockTotal | None
    ) -> device_pb2.BlockStatus:
        """One day's two ε (employee-day) or one (record), with its budgets and unit.

        A day never charged shows 0 of the policy's budgets in the policy's unit.
        """
        policy = self.core.policy
        day = policy.privacy_unit == "employee-day"
        unit = total.unit if total else policy.privacy_unit
        broken = total.epsilon_broken if total else (0.0 if day else None)
        broken_budget = (
            total.budget_broken if total and total.budget_broken is not None
            else policy.epsilon_per_day_broken_aggregation
        )
        return device_pb2.BlockStatus(
            block=block,
            events=events,
            epsilon=total.epsilon if total else 0.0,
            budget=total.budget if total else (
                policy.epsilon_per_day if day else policy.epsilon_per_block
            ),
            retired=bool(total.retired) if total else False,
            unit=unit,
            has_broken=broken is not None,
            epsilon_broken=broken or 0.0,
            budget_broken=broken_budget if broken is not None else 0.0,
        )

    def policy(self) -> tuple[str, str]:
        """The enforced policy explained, and where it came from."""
        return self.core.policy.explain(), self.policy_source

    def pause(self, seconds: float) -> str:
        """Pause recording for ``seconds`` (0: until resumed); the end, ISO 8601, or "".

        Raises
        ------
        ValueError
            ``seconds`` is not 0 or a finite number from 1 to :data:`MAX_PAUSE_S`
            (NaN would pause forever unnoticed, and a far end does not fit a date).
        """
        if not (math.isfinite(seconds) and (seconds == 0 or 1 <= seconds <= MAX_PAUSE_S)):
            raise ValueError(
                f"pause seconds must be 0 (until resumed) or from 1 to {MAX_PAUSE_S:.0f} "
                f"(a year), got {seconds!r}"
            )
        if self.recorder is None:
            return ""
        until = time.time() + seconds if seconds > 0 else None
        self.recorder.pause(until)
        return _iso(until) if until else ""

    def resume(self) -> None:
        if self.recorder is not None:
            self.recorder.resume()

    def show(self, day: str | None) -> dict[str, Any]:
        """Per kept block: events, token counts by kind, apps seen, ε. No text."""
        infos = self.store.blocks()
        if day is not None and day not in {i.block for i in infos}:
            raise KeyError(f"no block for day {day}; days kept: "
                           f"{', '.join(i.block for i in infos) or 'none'}")
        totals = {t.block: t for t in self.core.ledger.totals()}
        summary: dict[str, Any] = {
            "device_id": self.core.device_id,
            "blocks": [],
            # Full reasons of recent refusals: the federation was told only
            # their codes (they can name days held and window counts).
            "refusals": self.core.refusals.recent(),
        }
        for info in infos:
            if day is not None and info.block != day:
                continue
            records = self.store.read_block(info.block)
            kinds = Counter(token_kind(r.token) for r in records)
            apps = sorted({r.app for r in records if r.app})
            total = totals.get(info.block)
            summary["blocks"].append(
                {
                    "block": info.block,
                    "events": info.events,
                    "tokens_by_kind": dict(sorted(kinds.items())),
                    "apps_seen": apps,
                    "epsilon_spent": total.epsilon if total else 0.0,
                    "budget": total.budget if total else self.core.policy.epsilon_per_block,
                    "retired": bool(total.retired) if total else False,
                    "unit": total.unit if total else self.core.policy.privacy_unit,
                    "epsilon_broken_aggregation": total.epsilon_broken if total else None,
                    "budget_broken_aggregation": total.budget_broken if total else None,
                }
            )
        return summary

    def forget(self, days: list[str], everything: bool) -> tuple[list[str], bool]:
        """Delete blocks; ``everything`` also destroys the store key (crypto-shred).

        The ledger keeps its charges: they hold no event data, and they are the
        proof that budgets were respected.
        """
        with self._lock:
            if everything:
                forgotten = [i.block for i in self.store.blocks()]
                self.core.reset_store()
                return forgotten, True
            return self.store.delete_blocks(days), False

    def export(self, day: str) -> dict[str, Any]:
        """The employee's own data for one day, in the documented export format."""
        if day not in {i.block for i in self.store.blocks()}:
            raise KeyError(f"no block for day {day}")
        records = self.store.read_block(day)
        return {
            "format": EXPORT_FORMAT,
            "device_id": self.core.device_id,
            "block": day,
            "events": [
                {
                    "t": r.t,
                    "token": token_name(r.token),
                    "kind": token_kind(r.token),
                    **({"app": r.app} if r.app else {}),
                    **({"text": r.text} if r.text else {}),
                }
                for r in records
            ],
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")
