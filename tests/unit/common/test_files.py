"""Private files: 0600 from the first byte, atomic, never half written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from keystay.common.files import create_private, private_writer, write_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "sub" / "key", b"k")
        assert create_private(tmp_path / "new", b"n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "sub" / "key") == 0o600
    assert _mode(tmp_path / "new") == 0o600


def test_the_temporary_file_is_private_before_any_byte(tmp_path: Path) -> None:
    with private_writer(tmp_path / "key") as handle:
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert _mode(tmp) == 0o600
        handle.write(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path: Path) -> None:
    target = tmp_path / "key"
    write_private(target, b"old")
    with pytest.raises(RuntimeError), private_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_replace_overwrites_and_create_does_not(tmp_path: Path) -> None:
    target = tmp_path / "key"
    assert create_private(target, b"first")
    assert not create_private(target, b"second")
    assert target.read_bytes() == b"first"
    write_private(target, b"third")
    assert target.read_bytes() == b"third"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    target = tmp_path / "key"
    target.symlink_to(outside)
    write_private(target, b"secret")
    assert outside.read_bytes() == b"untouched"
    assert not target.is_symlink() and target.read_bytes() == b"secret"
