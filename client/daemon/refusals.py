"""The device's refusal log: full reasons for the employee, codes for the federation.

A refusal's full sentence can name window counts, which days exist, their
ages or budgets: facts about the employee's data that no DP mechanism paid
for. So the federation is told only ``"refused by device policy: CODE"``
(:attr:`keystay.client.policy.Refusal.public_reason`), and the sentence is
kept here, on the device, where ``keystay device show`` (the employee's
control surface) reads it back.

Format: one JSON object a line in ``DATA/refusals.v1.jsonl`` (mode 0600),
``{"t": unix seconds, "run_id", "server_round", "code", "reason"}``. The file
is append-only and trimmed to the newest :data:`KEEP` entries when it grows
past twice that, so a server that sends refused requests in a loop cannot
fill the disk. A line that does not parse is skipped on reading (a crash
mid-write leaves at most one torn line; the rest is still worth showing).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from keystay.client.policy import Refusal
from keystay.common.files import write_private

REFUSALS_FILE = "refusals.v1.jsonl"
#: Entries kept after a trim.
KEEP = 500


class RefusalLog:
    """Append and read the refusals of one device.

    Parameters
    ----------
    path : Path
        The log file, usually ``DATA/refusals.v1.jsonl``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._lines: int | None = None

    def record(self, refusal: Refusal, *, run_id: str, server_round: int) -> None:
        """Append one refusal with its full reason (never raises on disk errors)."""
        entry = {
            "t": round(time.time(), 3),
            # Truncated: a hostile run id must not turn the log into its storage.
            "run_id": str(run_id)[:128],
            "server_round": int(server_round),
            "code": refusal.code,
            "reason": refusal.reason[:1000],
        }
        line = json.dumps(entry, sort_keys=True, ensure_ascii=True) + "\n"
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a", encoding="ascii") as out:
                    out.write(line)
                if self._lines is None:
                    self._lines = len(self._read_lines())
                else:
                    self._lines += 1
                if self._lines > 2 * KEEP:
                    self._trim()
            except OSError:
                # Losing a log line must not turn a refusal into a crash: the
                # refusal itself is what protects the data, and the daemon log
                # has the reason too.
                return

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` refusals, oldest first."""
        with self._lock:
            lines = self._read_lines()
        out = []
        for line in lines[-limit:] if limit > 0 else []:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    def _read_lines(self) -> list[str]:
        try:
            return self.path.read_text(encoding="ascii", errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def _trim(self) -> None:
        keep = self._read_lines()[-KEEP:]
        write_private(self.path, "".join(f"{line}\n" for line in keep).encode("ascii"))
        self._lines = len(keep)
