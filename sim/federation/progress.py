"""Progress inside a simulated round: how many devices have answered each stage.

Design note
-----------
A round of 1,000 employee-day devices takes minutes, and the round table
prints a line only when a round ends. The virtual nodes run in Ray actors
(other processes, on a cluster other hosts), so what they have done is
counted through the run folder, like everything else the simulation
measures: each message a virtual node answers appends one short line,
``{"round": r, "stage": s}``, to :data:`PROGRESS_FILE` in the devices folder
with a single ``write`` on an ``O_APPEND`` descriptor. A line this short is
written whole on a local filesystem, so two actors never interleave. The
driver tails the file from where it last read (:class:`StageTally`): a poll
costs what was appended since, not the run's history.

Only counts are written: the stage a device answered is what the
ServerApp's own messages already say, and nothing of the device's data or
decision (answered and refused count alike) is in the file.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path

#: In the devices folder: one line per message a virtual node answered.
PROGRESS_FILE = "progress.jsonl"

#: Flower's SecAgg+ stages in protocol order, and how the progress line names
#: them; a record-level round has the one ``train`` message.
STAGE_NAMES = {
    "setup": "setup",
    "share_keys": "share keys",
    "collect_masked_vectors": "masked vectors",
    "unmask": "unmask",
    "train": "trained",
}


def record(devices_dir: Path, server_round: int, stage: str) -> None:
    """Append that a virtual node answered ``stage`` of ``server_round`` (never raises)."""
    line = (json.dumps({"round": int(server_round), "stage": stage}) + "\n").encode()
    try:
        fd = os.open(devices_dir / PROGRESS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return  # progress is a courtesy: a device's answer never fails for it
    try:
        os.write(fd, line)
    except OSError:
        pass
    finally:
        os.close(fd)


class StageTally:
    """Counts of answered stages per round, read incrementally from :data:`PROGRESS_FILE`.

    Parameters
    ----------
    devices_dir : Path
        The population's devices folder.
    per_round : int
        Devices each round is sent to (the denominator shown).
    """

    def __init__(self, devices_dir: Path, per_round: int) -> None:
        self.path = devices_dir / PROGRESS_FILE
        self.per_round = per_round
        self._offset = 0
        self._partial = b""
        self._counts: dict[int, Counter[str]] = {}
        self._lock = threading.Lock()

    def poll(self) -> None:
        """Read what was appended since the last poll (a torn last line waits for the rest)."""
        with self._lock:
            try:
                with self.path.open("rb") as handle:
                    handle.seek(self._offset)
                    chunk = handle.read()
            except OSError:
                return
            self._offset += len(chunk)
            data = self._partial + chunk
            *lines, self._partial = data.split(b"\n")
            for raw in lines:
                try:
                    entry = json.loads(raw)
                    counts = self._counts.setdefault(int(entry["round"]), Counter())
                    counts[str(entry["stage"])] += 1
                except (ValueError, KeyError, TypeError):
                    continue

    def counts(self, server_round: int) -> dict[str, int]:
        """Answered messages per stage of ``server_round``, in protocol order."""
        self.poll()
        with self._lock:
            counts = self._counts.get(server_round, Counter())
            ordered = [s for s in STAGE_NAMES if s in counts]
            ordered += sorted(set(counts) - set(STAGE_NAMES))
            return {stage: counts[stage] for stage in ordered}

    def text(self, server_round: int) -> str:
        """E.g. ``setup 1000/1000, share keys 1000/1000, masked vectors 412/1000``."""
        counts = self.counts(server_round)
        if not counts:
            return "no device has answered yet"
        return ", ".join(f"{STAGE_NAMES.get(stage, stage)} {n}/{self.per_round}"
                         for stage, n in counts.items())


__all__ = ["PROGRESS_FILE", "StageTally", "record"]
