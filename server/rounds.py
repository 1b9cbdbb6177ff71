"""Submitting a keystay run to the SuperLink and following it round by round.

``keystay round start`` calls :func:`start_run`: it builds the run config,
submits the app bundle with ``flwr run`` (the way Flower deployments start
runs), and while the run goes, prints each round's row as the ServerApp
appends it to ``rounds.jsonl``. The CLI shows the run's progress
(:mod:`keystay.server.progress`) and copies each row's numbers to
``rounds.csv`` and TensorBoard (:mod:`keystay.server.metrics`).

The follower reads only newline-ended lines (:func:`complete_rows`), so a
row being written, or one torn by a ServerApp killed mid-append, is never
half-parsed.

``flwr run --stream`` ends with status 0 whenever the SuperLink closes its
log stream, and under load (20 devices on two cores) it did so mid-run:
``keystay round start`` then reported a run of 0 rounds while the ServerApp
went on. So when the stream ends, the run's status is asked of the
SuperLink (``flwr ls --run-id``), and while it is not finished the rows go
on being followed (:func:`_follow_to_the_end`).

Killing ``keystay round start`` itself loses nothing: the run lives in the
SuperLink and its ServerApp goes on writing ``rounds.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from keystay.server.deploy.superlink import FEDERATION_NAME, ServerConfig, executable, flower_env
from keystay.server.flwr_app import app_dir
from keystay.server.settings import RunSettings

#: How many of the run's last log lines :class:`RunOutcome` keeps in memory.
LOG_TAIL_LINES = 30
#: How ``flwr run`` names the run it submitted (followed by its id).
RUN_STARTED = "Successfully started run "


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, as ``keystay round start`` saw it.

    ``log_problem`` is empty, or says why ``log_file`` could not be written
    (a full disk); ``log_tail`` then holds the run's last lines, which
    reached no file.
    """

    settings: RunSettings
    rounds: list[dict[str, Any]]
    returncode: int
    log_file: Path
    log_problem: str = ""
    log_tail: tuple[str, ...] = ()
    log_error: OSError | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and len(self.rounds) == self.settings.num_server_rounds

    @property
    def final_checkpoint(self) -> Path:
        return self.settings.run_dir / "final.pt"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is JSON-compatible here


def run_config_arg(config: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={_toml_value(value)}" for key, value in config.items())


def complete_rows(text: str) -> list[dict[str, Any] | None]:
    r"""The rows of a ``rounds.jsonl`` text, one per complete (newline-ended) line.

    The last line is left out until its newline lands: the ServerApp may be
    writing it right now. A line that is not a JSON object (a ServerApp
    SIGKILLed mid-append, then the file appended to again) is ``None``, so
    that line numbers stay stable between reads.

    >>> complete_rows('{"round": 1}\n{"round"')
    [{'round': 1}]
    >>> complete_rows('{"rou\n{"round": 2}\n')
    [None, {'round': 2}]
    """
    rows: list[dict[str, Any] | None] = []
    for line in text[: text.rfind("\n") + 1].splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append(row if isinstance(row, dict) else None)
    return rows


def start_run(
    server_dir: Path,
    settings: RunSettings,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    poll: float = 0.5,
) -> RunOutcome:
    """Submit a run and wait for it; ``on_round`` sees each round's row as it lands."""
    config = ServerConfig.load(server_dir)
    flwr_home = config.write_flwr_home(server_dir)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    log_file = settings.run_dir / "flwr-run.log"
    rounds_path = settings.run_dir / "rounds.jsonl"
    cmd = [
        executable("flwr"),
        "run",
        str(app_dir()),
        FEDERATION_NAME,
        "--run-config",
        run_config_arg(settings.as_run_config()),
        "--stream",
    ]
    rows: list[dict[str, Any]] = []
    done = threading.Event()

    def follow() -> None:
        seen = 0
        while True:
            finished = done.is_set()
            if rounds_path.exists():
                for row in complete_rows(rounds_path.read_text(errors="replace"))[seen:]:
                    seen += 1
                    if row is None:
                        continue  # a torn line: its writer was killed mid-append
                    rows.append(row)
                    if on_round is not None:
                        on_round(row)
            if finished:
                return
            time.sleep(poll)

    follower = threading.Thread(target=follow, name="rounds", daemon=True)
    follower.start()
    log = _RunLog(log_file)
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=flower_env(flwr_home),
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    with process.stdout:
        for line in process.stdout:
            log.write(line)
    process.wait()
    if process.returncode == 0 and log.run_id is not None:
        _follow_to_the_end(server_dir, log, log.run_id, poll)
    log.close()
    # The ServerApp writes its last row just before the run ends; give the
    # follower one more look.
    done.set()
    follower.join()
    return RunOutcome(settings, rows, process.returncode, log_file,
                      log_problem=log.problem, log_tail=tuple(log.tail), log_error=log.error)


def _follow_to_the_end(server_dir: Path, log: _RunLog, run_id: int, poll: float) -> None:
    """Wait until the SuperLink says run ``run_id`` finished (rows are followed meanwhile).

    Gives up, as before this check, when the SuperLink cannot be asked
    (stopped, or a Control API that does not answer): the run is then as
    finished as ``keystay round start`` can know.
    """
    from keystay.server.deploy.enrollment import EnrollmentError, FlwrControl
    from keystay.server.deploy.superlink import ServerConfigError

    try:
        control = FlwrControl(server_dir, ServerConfig.load(server_dir), timeout=30.0)
    except (ServerConfigError, OSError):
        return
    noted = False
    while True:
        try:
            status = control.run_status(run_id)
        except (EnrollmentError, OSError):
            return  # SuperLinkUnavailableError is an EnrollmentError
        if not status or status.startswith("finished"):
            return
        if not noted:
            log.write(f"keystay: flwr's log stream ended while run {run_id} is {status}; "
                      "following its rounds until the SuperLink says it finished\n".encode())
            noted = True
        time.sleep(max(poll, 2.0))


#: The lines of a Python traceback other than its last: the header, the
#: chaining notes, and (indented) the frames, their code and carets.
_TRACEBACK_LINES = ("Traceback (most recent call last):",
                    "The above exception was the direct cause of the following exception:",
                    "During handling of the above exception, another exception occurred:")


def shown_to_a_person(line: str) -> bool:
    """Whether a line of ``flwr run``'s output is one to show a person (no traceback frames).

    >>> [shown_to_a_person(x) for x in ("Traceback (most recent call last):",
    ...  '  File "app.py", line 3, in main', "    ^^^^", "", "OSError: disk full",
    ...  "WARNING :   round 1: device on node 1 unavailable")]
    [False, False, False, True, True, True]
    """
    return not (line.startswith((" ", "\t")) or line.strip() in _TRACEBACK_LINES)


class _RunLog:
    """``flwr run``'s output, copied to the run's log file line by line.

    ``flwr run`` is not given the file itself: on a full disk its writes
    would fail and it would end (with status 0) while the run goes on,
    leaving ``keystay round start`` blind. Copied through here, a write that
    fails stops the copy (``problem`` says why) but not the reading, so the
    run is followed to its end and its last lines are kept in ``tail``.
    ``tail`` is shown to a person when the file could not keep them, so it
    leaves out Python tracebacks (Flower prints the ServerApp's own when a
    full disk stops it): their frames and headers, keeping the last line,
    which names what was raised and why (:func:`shown_to_a_person`).
    """

    def __init__(self, path: Path) -> None:
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        #: The SuperLink's id of the run, from ``flwr run``'s own line.
        self.run_id: int | None = None
        self.problem = ""
        self.error: OSError | None = None
        self._file: BinaryIO | None = None
        try:
            self._file = path.open("wb")
        except OSError as error:
            self._fail(path, error)
        self._path = path

    def _fail(self, path: Path, error: OSError) -> None:
        self.error = error
        self.problem = f"the run's log {path} could not be written ({error.strerror or error})"
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def write(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip("\n")
        if shown_to_a_person(text):
            self.tail.append(text)
        if self.run_id is None and text.startswith(RUN_STARTED):
            with contextlib.suppress(ValueError):
                self.run_id = int(text[len(RUN_STARTED):].split()[0])
        if self._file is None:
            return
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as error:
            self._fail(self._path, error)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as error:
                self._fail(self._path, error)


def connected_devices(server_dir: Path) -> Callable[[], int] | None:
    """A callable counting the SuperLink's online nodes, or ``None`` if it cannot be asked.

    It asks the Control API (``flwr supernode list``), as ``keystay server
    devices`` does; each call may raise when the SuperLink does not answer.
    """
    from keystay.server.deploy.enrollment import FlwrControl
    from keystay.server.deploy.superlink import ServerConfigError

    try:
        control = FlwrControl(server_dir, ServerConfig.load(server_dir), timeout=10.0)
    except (ServerConfigError, OSError):
        return None

    def count() -> int:
        return sum(1 for n in control.nodes().values() if n.get("status") == "online")

    return count


def format_round(row: dict[str, Any]) -> list[str]:
    """One round as table lines: the round's figures, then one line per device.

    Only what the server honestly has: how many devices were sampled, answered
    (sent an update and a signed report), were aggregated, refused (their
    policy said no), were unavailable or failed; each answering device's ε
    from its signed report; and the global model's figures on the server's
    own held-out set. No device's training loss or accuracy: devices do not
    send them.
    """
    acc = row.get("heldout_accuracy")
    loss = row.get("heldout_loss")
    head = (
        f"{row['round']:>5}"
        f"{row.get('devices_sampled', 0):>8}"
        f"{row.get('devices_answered', row.get('devices_reported', 0)):>9}"
        f"{row.get('devices_reported', 0):>11}"
        f"{len(row.get('refusals', [])):>8}"
        f"{len(row.get('unavailable', [])):>12}"
        f"{len(row.get('failed', [])):>7}"
        f"{'-' if acc is None else f'{acc:.3f}':>10}"
        f"{'-' if loss is None else f'{loss:.4f}':>9}"
    )
    lines = [head]
    indent = " " * 7
    for device_id, d in sorted(row.get("devices", {}).items()):
        eps = d.get("epsilon_total")
        flags = ",".join(d.get("flags", []))
        lines.append(
            f"{indent}{device_id:<20} ε {'-' if eps is None else f'{eps:.3f}':>8}"
            f"{'  ' + flags if flags else ''}"
        )
    for kind, key in (("refused", "refusals"), ("unavailable", "unavailable"),
                      ("failed", "failed")):
        for entry in row.get(key, []):
            lines.append(f"{indent}node {entry['node']} {kind}: {entry['reason']}")
    if row.get("epsilon_day_mean") is not None:
        broken = row.get("epsilon_day_mean_broken_aggregation")
        lines.append(
            f"{indent}mean ε per employee-day: {row['epsilon_day_mean']:.3f} "
            f"(honest-but-curious server), "
            f"{'-' if broken is None else f'{broken:.3f}'} (server that breaks secure "
            "aggregation)"
        )
    if row.get("central_epsilon") is not None:
        lines.append(f"{indent}central DP ε so far: {row['central_epsilon']:.3f}")
    return lines


TABLE_HEADER = (
    f"{'':>5}{'':>8}{'':>9}{'':>11}{'':>8}{'':>12}{'':>7}{'held-out':>10}{'held-out':>9}\n"
    f"{'round':>5}{'sampled':>8}{'answered':>9}{'aggregated':>11}{'refused':>8}"
    f"{'unavailable':>12}{'failed':>7}{'accuracy':>10}{'loss':>9}\n"
    "       (held-out: the global model on server-owned simulated employees that never "
    "train;\n"
    "        ε: each answering device's cumulative figure from its signed report)"
)
