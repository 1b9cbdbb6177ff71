"""Private files: mode 0600 from the first byte, fsync'd, and put in place atomically.

Design
------
Keys, certificates' private halves, checkpoints and the refusal log must never
be readable by another user, not even for the instant between ``open`` and
``chmod``, and a crash must leave either the old file or the new one, never
half of one. Every such write goes through this module:

1. the bytes go to a temporary name beside the target, created with
   ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 (then ``fchmod`` 0600, in
   case the umask was unusual: ``open`` masks the mode it is given);
2. the file is flushed and ``fsync``'d;
3. it is moved into place with ``os.replace`` (:func:`private_writer`,
   :func:`write_private`), or with ``os.link`` when the target must not be
   overwritten (:func:`create_private`: two processes creating the same key
   at once both end up with whichever landed first);
4. the folder is ``fsync``'d so the new name survives a power cut.

A full disk fails step 1 or 2 (``ENOSPC``; ``EDQUOT`` over a quota;
``EFBIG`` over ``RLIMIT_FSIZE``): the temporary file is removed and the
target keeps its old content. :func:`out_of_space` tells those errors (and
SQLite's "database or disk is full") from others, so a command can say the
disk is full rather than print an ``OSError``.

>>> import tempfile, stat
>>> folder = Path(tempfile.mkdtemp())
>>> write_private(folder / "k", b"secret")
>>> oct(stat.S_IMODE((folder / "k").stat().st_mode)), (folder / "k").read_bytes()
('0o600', b'secret')
>>> create_private(folder / "k", b"other"), (folder / "k").read_bytes()
(False, b'secret')
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

#: The mode of every private file keystay writes.
PRIVATE_MODE = 0o600

#: The errors a write gets when there is no room: a full file system, a quota,
#: a file-size limit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def out_of_space(error: BaseException) -> bool:
    """True when ``error`` (or what it was raised from) means a write found no room.

    An :class:`OSError` with an errno of :data:`NO_SPACE_ERRNOS`, or SQLite's
    ``SQLITE_FULL`` ("database or disk is full").

    >>> out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    True
    >>> out_of_space(sqlite3.OperationalError("database or disk is full"))
    True
    >>> out_of_space(OSError(errno.EACCES, "Permission denied"))
    False
    """
    seen: BaseException | None = error
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS:
            return True
        if isinstance(seen, sqlite3.OperationalError) and (
            getattr(seen, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "disk is full" in str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still add to the file system holding ``path``."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fsync_dir(path: Path) -> None:
    """``fsync`` a folder, so the names created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> tuple[Path, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_MODE)
    os.fchmod(fd, PRIVATE_MODE)
    return tmp, fd


@contextlib.contextmanager
def private_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose bytes replace ``path`` atomically when the block ends.

    Parameters
    ----------
    path : Path
        The target; its folder is created if missing.

    Yields
    ------
    BinaryIO
        Write the whole new content to it. If the block raises, ``path`` is
        left as it was and the temporary file is removed.
    """
    tmp, fd = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: 0600 from the first byte, fsync'd, atomic."""
    with private_writer(path) as handle:
        handle.write(data)


def create_private(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists; never overwrites.

    Returns
    -------
    bool
        True if this call created the file; False if ``path`` already existed
        (another process won a race, say), which is then left untouched.
    """
    tmp, fd = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def ensure_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it is missing; an existing file is kept.

    For SQLite files: SQLite would create the file with the umask's mode, and
    it gives the ``-wal`` and ``-shm`` files the database file's mode.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, PRIVATE_MODE)
    os.close(fd)
