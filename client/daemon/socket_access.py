"""Who may connect to the daemon's federation socket.

By default only the daemon's own OS user may (socket mode 0600): the
SuperNode, and the ClientApp it spawns, run as the same user (single-user
mode, accepted by name only).

When the SuperNode runs as its own OS user (the systemd deployment:
``keystay-device`` runs the daemon and owns the data, ``keystay-supernode`` runs
``flower-supernode``), the daemon is started with ``--socket-group GROUP``: the
socket is created 0660 and handed to GROUP, a group the SuperNode's user is in
and nobody else is. The folder holding the socket must let that group through
(systemd: ``RuntimeDirectory=keystay``, ``RuntimeDirectoryMode=0750``, the
daemon's ``Group=`` being GROUP); the data folder stays 0700, so the SuperNode
user can reach the federation socket and nothing else. The employee's control
socket is never shared with a group: see
:mod:`keystay.client.daemon.control_socket`.

The socket is created under a umask that already excludes everyone the mode
will exclude, so there is no moment at which it is more open than it ends up.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from keystay.common.errors import KeystayError
from keystay.common.exitcodes import ExitCode


class SocketAccessError(KeystayError, ValueError):
    """The socket group cannot be used; the message says what to do."""

    exit_code = ExitCode.DEVICE_SOCKET


def resolve_group(name: str) -> int:
    """The gid of ``name`` (a group name or a number).

    Raises
    ------
    SocketAccessError
        If no such group exists, or the daemon may not hand files to it.
    """
    try:
        gid = int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError as error:
        raise SocketAccessError(
            f"--socket-group {name}: no such group; create it (e.g. 'groupadd --system "
            f"{name}') and add the SuperNode's user to it"
        ) from error
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise SocketAccessError(
            f"--socket-group {name}: this user ({os.geteuid()}) is not in that group, so it "
            "cannot hand the socket to it; make it the daemon's group (systemd Group=) or "
            "add the daemon's user to it"
        )
    return gid


def socket_umask(group: str | None) -> int:
    """The umask to bind the socket under: 0o177 (-> 0600) or 0o117 (-> 0660) with a group."""
    return 0o117 if group else 0o177


def apply_socket_access(sock: Path, group: str | None) -> int:
    """Set the socket's final group and mode; returns the mode set (0o600 or 0o660)."""
    if group:
        os.chown(sock, -1, resolve_group(group))
        mode = 0o660
    else:
        mode = 0o600
    os.chmod(sock, mode)
    return mode


def describe(sock: Path) -> str:
    """``"srw-rw---- keystay-device:keystay-socket"``-style line for status and logs."""
    info = sock.stat()
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"{stat.filemode(info.st_mode)} uid {info.st_uid} group {group}"
