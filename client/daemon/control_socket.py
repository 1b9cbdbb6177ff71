"""The employee's control socket: only the daemon's own uid gets through.

The daemon has two surfaces (see ``protos/keystay/v1/device.proto``). The
federation surface (``Federation.Train``) is served by gRPC directly on
``federation.sock``, which the SuperNode's user may reach. The control surface
(status, pause, resume, show, forget, export, policy, evaluate) is the
employee's alone, so ``control.sock`` gets two locks:

1. **File mode.** The socket is bound under umask 0o177 (so it is 0600 from
   the first instant) inside the data folder (0700).
2. **Peer credentials.** Every accepted connection's peer uid is read with
   ``getsockopt(SOL_SOCKET, SO_PEERCRED)`` (the kernel's record of who called
   ``connect``; the peer cannot forge it) and must equal the daemon's own uid.
   Anyone else (root, a process with ``CAP_DAC_OVERRIDE``, anyone let in by a
   mistaken ``chmod``) is disconnected before a single byte is read from them,
   so no RPC is ever served to them.

Why a relay: gRPC Python exposes neither the accepted socket nor the peer's
credentials (``ServicerContext.peer()`` is just ``"unix:"`` and a path; the
auth context of local credentials carries only a security level), and it
cannot serve an already-accepted file descriptor. So :class:`ControlGate`
accepts on ``control.sock`` itself, checks the peer, and relays each admitted
connection byte for byte to the control gRPC server, which listens on a
private socket in a 0700 folder of its own (``DATA/control.d/``). Nothing
else listens for control calls. The relay costs two threads per open
connection (one per direction, so a large reply can never deadlock against a
large request); only the employee's own processes get that far, and the CLI
opens one connection per command.

Refused connections are counted and logged with the peer's uid and pid, so
the employee can see who tried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("keystay.device.control")

#: ``struct ucred`` on Linux: pid_t pid; uid_t uid; gid_t gid.
_UCRED = struct.Struct("3i")
_CHUNK = 64 * 1024
_BACKLOG = 16
#: How often the accept loop looks at the stop flag.
_POLL_S = 0.2


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def bind_private(path: Path, backlog: int = _BACKLOG) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the moment it exists."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(backlog)
    return listener


class ControlGate:
    """Accept on the public control socket; relay only the allowed uid.

    Parameters
    ----------
    public : Path
        ``control.sock``, where ``keystay device ...`` connects.
    backend : Path
        The control gRPC server's private socket (in a 0700 folder).
    allowed_uid : int | None
        The one uid served; default the daemon's own (``os.geteuid()``).
    """

    def __init__(self, public: Path, backend: Path, allowed_uid: int | None = None) -> None:
        self.public = Path(public)
        self.backend = Path(backend)
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self.refused = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, name="control-gate",
                                        daemon=True)

    def start(self) -> None:
        """Bind ``public`` (0600) and start accepting."""
        self._listener = bind_private(self.public)
        self._listener.settimeout(_POLL_S)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, cut every relayed connection, remove the socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * _POLL_S + 1.0)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._open.clear()
        self.public.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if self._stop.is_set():
                    return
                # E.g. EMFILE: drop this attempt, keep serving the employee.
                logger.warning("control socket: accept failed: %s", error)
                self._stop.wait(_POLL_S)
                continue
            conn.settimeout(None)
            try:
                self._admit(conn)
            except OSError as error:
                logger.warning("control socket: connection dropped: %s", error)
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, _gid = peer_credentials(conn)
        if uid != self.allowed_uid:
            # Closed unread: the peer never reaches the gRPC server, so no RPC
            # (not even an unknown one) is answered for it.
            self.refused += 1
            logger.warning("control socket: refused a connection from uid %d (pid %d); "
                           "only uid %d may use the employee's controls", uid, pid,
                           self.allowed_uid)
            conn.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(self.backend))
        except OSError:
            upstream.close()
            raise
        with self._lock:
            self._open.update((conn, upstream))
        remaining = [2]

        def finished() -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
                self._open.discard(conn)
                self._open.discard(upstream)
            conn.close()
            upstream.close()

        for src, dst, name in ((conn, upstream, "in"), (upstream, conn, "out")):
            threading.Thread(target=_pump, args=(src, dst, finished),
                             name=f"control-relay-{name}-{pid}", daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket, finished: Callable[[], None]) -> None:
    """Copy ``src`` to ``dst`` until EOF, then half-close ``dst``."""
    try:
        while chunk := src.recv(_CHUNK):
            dst.sendall(chunk)
    except OSError:
        pass  # the other side went away; closing below tells its partner
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        finished()
