"""Round metrics where ML people look: a CSV beside ``rounds.jsonl``, and TensorBoard.

Design note
-----------
``keystay round start`` hands each ``rounds.jsonl`` row to
:class:`RoundMetrics` as it lands. The row's fields belong to the ServerApp
and change as it grows (per-device train loss and held-out accuracy give
way to server-side ``heldout_accuracy``/``heldout_loss``; per-device ε
stays), so nothing here names a metric: :func:`numeric_fields` flattens
whatever numbers a row holds (``devices.<id>.<field>`` for per-device ones;
booleans, strings, lists and identifiers such as a device's Flower ``node``
id are not metrics) and both writers take them as they come.

* ``RUN_DIR/rounds.csv`` is written with :mod:`csv`. A new column can appear
  at any round (a device joins, a field is added), so the file is rewritten
  whole after each round with the union of columns seen, sorted with
  ``round`` first; a cell a round did not have stays empty. Rows are few (one
  per round), so rewriting is cheap and the file is always a valid CSV.
* TensorBoard event files come from ``tensorboardX``'s ``SummaryWriter``
  (no TensorFlow, no hand-written format), one scalar per field with the
  round as the step, in ``DIR/RUN_NAME`` so runs sit side by side in one
  TensorBoard.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CSV_FILE = "rounds.csv"


def numeric_fields(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number in ``row``, flattened to ``a.b.c`` keys (bools excluded).

    >>> numeric_fields({"round": 2, "delta": 1e-5, "devices": {"d1": {"epsilon_total": 0.5,
    ...     "flags": []}}, "checkpoint": "x.pt", "ok": True})
    {'round': 2.0, 'delta': 1e-05, 'devices.d1.epsilon_total': 0.5}
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or _is_identifier(str(key), value):
            continue
        if isinstance(value, int | float):
            if math.isfinite(float(value)):
                out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(numeric_fields(value, prefix=f"{name}."))
    return out


def _is_identifier(key: str, value: object) -> bool:
    # A Flower node id is a random 64-bit integer: a name, not a measurement,
    # and past 2**53 a float would not even hold it exactly.
    if key == "node" or key.endswith("_id"):
        return True
    return isinstance(value, int) and abs(value) > 2**53


def _tag(name: str) -> str:
    # TensorBoard groups by the first path segment: per-device figures go
    # under "device/<id>/<field>", round figures under "round/<field>".
    parts = name.split(".")
    if parts[0] == "devices" and len(parts) >= 3:
        return "device/" + parts[1] + "/" + "_".join(parts[2:])
    return "round/" + "_".join(parts)


class RoundMetrics:
    """Writes each round's numbers to ``rounds.csv`` and, optionally, TensorBoard.

    Parameters
    ----------
    run_dir : Path
        The run's folder (holds ``rounds.jsonl``); ``rounds.csv`` goes here.
    tensorboard_dir : Path, optional
        Where TensorBoard event files go (a ``run_name`` folder inside it).
    run_name : str
    """

    def __init__(self, run_dir: Path, tensorboard_dir: Path | None = None,
                 run_name: str = "run") -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.csv_path = Path(run_dir) / CSV_FILE
        self._rows: list[dict[str, float]] = []
        self._writer: Any = None
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self.tensorboard_dir: Path | None = Path(tensorboard_dir) / run_name
            self._writer = SummaryWriter(logdir=str(self.tensorboard_dir))
        else:
            self.tensorboard_dir = None

    def add(self, row: Mapping[str, Any]) -> None:
        """Record one ``rounds.jsonl`` row (call in round order)."""
        values = numeric_fields(row)
        self._rows.append(values)
        self._write_csv()
        if self._writer is not None:
            step = int(values.get("round", len(self._rows)))
            for name, value in sorted(values.items()):
                if name != "round":
                    self._writer.add_scalar(_tag(name), value, global_step=step)
            self._writer.flush()

    def _columns(self) -> list[str]:
        seen = {key for row in self._rows for key in row}
        return ["round", *sorted(seen - {"round"})] if "round" in seen else sorted(seen)

    def _write_csv(self) -> None:
        # Written beside and renamed over, so a reader never sees half a file.
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns(), restval="")
            writer.writeheader()
            for row in self._rows:
                writer.writerow({k: _cell(v) for k, v in row.items()})
        os.replace(tmp, self.csv_path)

    def rows(self) -> Iterator[dict[str, float]]:
        return iter(self._rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _cell(value: float) -> str | int:
    return int(value) if value.is_integer() and abs(value) < 2**53 else repr(value)
