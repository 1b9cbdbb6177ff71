"""The simulation's in-round progress: stages counted through the devices folder."""

from __future__ import annotations

import os
from pathlib import Path

from keystay.sim.federation.progress import PROGRESS_FILE, StageTally, record


def test_counts_per_round_in_protocol_order(tmp_path: Path) -> None:
    for stage in ("share_keys", "setup", "setup", "share_keys", "setup"):
        record(tmp_path, 2, stage)
    record(tmp_path, 1, "unmask")
    tally = StageTally(tmp_path, per_round=3)
    assert tally.text(2) == "setup 3/3, share keys 2/3"
    assert tally.counts(1) == {"unmask": 1}
    assert tally.text(3) == "no device has answered yet"


def test_reads_only_what_was_appended_and_waits_for_a_torn_line(tmp_path: Path) -> None:
    tally = StageTally(tmp_path, per_round=5)
    tally.poll()  # no file yet: nothing, no error
    record(tmp_path, 1, "setup")
    assert tally.counts(1) == {"setup": 1}
    # Half a line (an actor mid-write): not counted until its end arrives.
    with (tmp_path / PROGRESS_FILE).open("ab") as handle:
        handle.write(b'{"round": 1, "sta')
    assert tally.counts(1) == {"setup": 1} and tally.text(1) == "setup 1/5"
    with (tmp_path / PROGRESS_FILE).open("ab") as handle:
        handle.write(b'ge": "setup"}\n')
    assert tally.text(1) == "setup 2/5"  # the first line was not counted twice


def test_garbage_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / PROGRESS_FILE).write_bytes(b'not json\n{"round": "x"}\n[]\n')
    record(tmp_path, 1, "train")
    assert StageTally(tmp_path, per_round=1).text(1) == "trained 1/1"


def test_recording_never_fails_a_device(tmp_path: Path) -> None:
    record(tmp_path / "missing", 1, "setup")  # no folder: silently nothing
    assert not (tmp_path / "missing").exists()
    if os.geteuid() != 0:  # root writes through modes
        tmp_path.chmod(0o500)
        try:
            record(tmp_path, 1, "setup")
        finally:
            tmp_path.chmod(0o700)
