"""A real full disk for tests: a small tmpfs mounted for the test, and a filler file.

Mounting needs root (CI runs as root); where it cannot mount, the test using
it is skipped with the reason. Writes to a filled tmpfs fail with ENOSPC,
and SQLite's with "database or disk is full": the real errors, not mocks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs to fill needs root"
)


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` (mode 0700) on ``path``; None, or why it could not."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "mounting a small tmpfs to fill needs root"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip()}"


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs on ``path`` for the block; skips the test where none can be mounted."""
    why = mount_tmpfs(path, size)
    if why is not None:
        pytest.skip(why)
    try:
        yield path
    finally:
        unmount(path)


def fill(path: Path) -> Path:
    """Write zeros until the file system refuses; return the filler file."""
    filler = path / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(chunk)
    # Then byte by byte: the last partial chunk must be used up too.
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 512)
    return filler
