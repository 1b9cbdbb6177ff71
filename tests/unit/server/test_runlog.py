"""The round's row on a full disk: whole or not at all, and a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from keystay.common.files import out_of_space
from keystay.server.rounds import complete_rows
from keystay.server.runlog import RoundsFileError, append_row
from tests.e2e.full_disk import fill, needs_root, small_tmpfs


def test_rows_are_appended_whole(tmp_path: Path) -> None:
    rounds = tmp_path / "rounds.jsonl"
    append_row(rounds, '{"round": 1}', 1)
    append_row(rounds, '{"round": 2}', 2)
    assert complete_rows(rounds.read_text()) == [{"round": 1}, {"round": 2}]


@needs_root
def test_a_row_that_finds_the_disk_full_is_cut_off_again(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        rounds = disk / "rounds.jsonl"
        append_row(rounds, '{"round": 1}', 1)
        before = rounds.read_bytes()
        filler = fill(disk)
        # Room for part of this row (the file's last page), never all of it.
        big = '{"round": 2, "pad": "' + "x" * 200_000 + '"}'
        with pytest.raises(RoundsFileError, match="server's disk is full") as raised:
            append_row(rounds, big, 2)
        assert out_of_space(raised.value)
        assert rounds.read_bytes() == before
        filler.unlink()
        append_row(rounds, '{"round": 2}', 2)
        assert complete_rows(rounds.read_text()) == [{"round": 1}, {"round": 2}]
