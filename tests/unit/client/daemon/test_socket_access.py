"""Device socket permissions: private by default, group-shared with --socket-group."""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

import pytest

from keystay.client.daemon.socket_access import (
    SocketAccessError,
    apply_socket_access,
    resolve_group,
    socket_umask,
)


def _bind(path: Path, group: str | None) -> socket.socket:
    old = os.umask(socket_umask(group))
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    finally:
        os.umask(old)
    return sock


def test_default_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "device.sock"
    with _bind(path, None):
        # Never more open than the final mode, even before apply_socket_access.
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0
        assert apply_socket_access(path, None) == 0o600
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_group_gets_read_write_nobody_else(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getegid()).gr_name
    path = tmp_path / "device.sock"
    with _bind(path, group):
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0
        assert apply_socket_access(path, group) == 0o660
        info = path.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == os.getegid()


def test_unknown_group_is_refused_with_advice() -> None:
    with pytest.raises(SocketAccessError, match="groupadd"):
        resolve_group("keystay-no-such-group-xyz")


def test_numeric_group() -> None:
    assert resolve_group(str(os.getegid())) == os.getegid()
