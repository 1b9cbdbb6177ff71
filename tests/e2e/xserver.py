"""A private X server and tiny X clients, for end-to-end capture tests and benches.

Everything here starts real processes and hands back their PIDs; whoever
starts one stops it (``stop()``), by that PID, in a ``finally``.

- :func:`start_xvfb` starts ``Xvfb -displayfd`` so the server itself picks a
  free display number and tells us when it accepts connections (no guessing,
  no sleeping, no clash with other people's servers on a shared machine).
- :func:`start_window` starts a tiny python-xlib client with its own
  ``WM_CLASS``, ``_NET_WM_PID`` and title: an "application" to focus.
- :func:`start_ewmh_wm` starts a minimal EWMH "window manager" that only
  implements ``_NET_ACTIVE_WINDOW`` (enough for ``xdotool windowactivate``),
  so the recorder's PropertyNotify path can be tested without installing a WM.

Run as a script, this module is those clients::

    python xserver.py window CLASS TITLE
    python xserver.py ewmh
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
REQUIRED_TOOLS = ("Xvfb", "xdotool")


def missing_tools() -> str | None:
    """Say which X test tools are missing, or ``None`` when all are installed."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not installed; install the Debian packages "
        "xvfb and xdotool (`make apt-deps`) to run the X11 capture tests"
    )


def _stop_pid(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 5.0) -> None:
    """Stop one process we started, by its PID: TERM, then KILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


@dataclass
class XServer:
    """A running Xvfb. ``display`` is ``":N"``."""

    display: str
    proc: subprocess.Popen[bytes]
    width: int
    height: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for child processes that talks to this server only."""
        env = dict(os.environ if base is None else base)
        env["DISPLAY"] = self.display
        # A desktop's Wayland or XAUTHORITY settings must not leak into tests.
        env.pop("WAYLAND_DISPLAY", None)
        env.pop("XAUTHORITY", None)
        return env

    def xdotool(self, *args: str, timeout: float = 30.0) -> str:
        """Run one xdotool command against this server (XTEST input); raise on failure."""
        done = subprocess.run(
            ["xdotool", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"xdotool {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def stop(self) -> None:
        _stop_pid(self.proc)


def start_xvfb(width: int = 1280, height: int = 1024, timeout: float = 15.0) -> XServer:
    """Start Xvfb on a display number it picks itself; return once it accepts clients."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [
                "Xvfb",
                "-displayfd",
                str(write_fd),
                "-screen",
                "0",
                f"{width}x{height}x24",
                "-nolisten",
                "tcp",
                # Keep server state (properties, keymap) when the last client leaves.
                "-noreset",
            ],
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(write_fd)
    try:
        number = b""
        deadline = time.monotonic() + timeout
        while not number.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(left, 0))
            if not ready:
                raise RuntimeError(f"Xvfb did not report a display within {timeout:.0f} s")
            chunk = os.read(read_fd, 64)
            if not chunk:
                raise RuntimeError(f"Xvfb exited before it was ready (code {proc.wait()})")
            number += chunk
    except BaseException:
        _stop_pid(proc)
        raise
    finally:
        os.close(read_fd)
    return XServer(display=f":{int(number)}", proc=proc, width=width, height=height)


@dataclass
class XClient:
    """A tiny X client process (a window or the EWMH stand-in)."""

    proc: subprocess.Popen[str]
    window: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _stop_pid(self.proc)


def _start_client(server: XServer, *args: str, timeout: float = 15.0) -> XClient:
    proc = subprocess.Popen(
        [sys.executable, str(HERE), *args],
        env=server.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = XClient(proc=proc)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
            raise RuntimeError(f"X client {args} did not start: {line!r} {err}")
        parts = line.split()
        if len(parts) > 1:
            client.window = int(parts[1])
    except BaseException:
        client.stop()
        raise
    return client


def start_window(server: XServer, wm_class: str, title: str) -> XClient:
    """Start a mapped top-level window with ``WM_CLASS = (wm_class.lower(), wm_class)``."""
    return _start_client(server, "window", wm_class, title)


def start_ewmh_wm(server: XServer) -> XClient:
    """Start the minimal ``_NET_ACTIVE_WINDOW`` window manager."""
    return _start_client(server, "ewmh")


# --- the client processes themselves (python-xlib only) ---------------------


def _serve_until_stdin_closes(display: object, on_event: object = None) -> None:
    """Process X events until the parent closes our stdin or stops us."""
    fds = [display.fileno(), sys.stdin.fileno()]  # type: ignore[attr-defined]
    while True:
        while display.pending_events():  # type: ignore[attr-defined]
            event = display.next_event()  # type: ignore[attr-defined]
            if on_event is not None:
                on_event(event)  # type: ignore[operator]
        ready, _, _ = select.select(fds, [], [], 1.0)
        if sys.stdin.fileno() in ready and not os.read(sys.stdin.fileno(), 1):
            return


def _run_window(wm_class: str, title: str) -> None:
    from Xlib import X, Xatom
    from Xlib.display import Display

    display = Display()
    screen = display.screen()
    window = screen.root.create_window(
        50,
        50,
        300,
        200,
        0,
        screen.root_depth,
        X.InputOutput,
        X.CopyFromParent,
        background_pixel=screen.white_pixel,
        event_mask=X.StructureNotifyMask | X.KeyPressMask | X.FocusChangeMask,
    )
    window.set_wm_class(wm_class.lower(), wm_class)
    window.set_wm_name(title)
    window.change_property(
        display.intern_atom("_NET_WM_NAME"),
        display.intern_atom("UTF8_STRING"),
        8,
        title.encode(),
    )
    window.change_property(
        display.intern_atom("_NET_WM_PID"), Xatom.CARDINAL, 32, [os.getpid()]
    )
    window.map()
    while True:
        event = display.next_event()
        if event.type == X.MapNotify:
            break
    print(f"ready {window.id}", flush=True)
    _serve_until_stdin_closes(display)


def _run_ewmh_wm() -> None:
    from Xlib import X, Xatom
    from Xlib.display import Display

    display = Display()
    root = display.screen().root
    atom = display.intern_atom
    net_active = atom("_NET_ACTIVE_WINDOW")
    check = root.create_window(-10, -10, 1, 1, 0, X.CopyFromParent)
    check.change_property(atom("_NET_SUPPORTING_WM_CHECK"), Xatom.WINDOW, 32, [check.id])
    check.change_property(atom("_NET_WM_NAME"), atom("UTF8_STRING"), 8, b"keystay-test-wm")
    root.change_property(
        atom("_NET_SUPPORTED"), Xatom.ATOM, 32, [net_active, atom("_NET_SUPPORTING_WM_CHECK")]
    )
    root.change_property(atom("_NET_SUPPORTING_WM_CHECK"), Xatom.WINDOW, 32, [check.id])
    root.change_property(net_active, Xatom.WINDOW, 32, [0])
    # xdotool windowactivate sends a _NET_ACTIVE_WINDOW ClientMessage to the
    # root with SubstructureNotify|Redirect; selecting Notify is enough to get
    # it without taking over window management (no redirect, no frames).
    root.change_attributes(event_mask=X.SubstructureNotifyMask)
    display.sync()

    def on_event(event: object) -> None:
        if getattr(event, "type", None) != X.ClientMessage:
            return
        if event.client_type != net_active:  # type: ignore[attr-defined]
            return
        target = event.window  # type: ignore[attr-defined]
        target.set_input_focus(X.RevertToParent, X.CurrentTime)
        root.change_property(net_active, Xatom.WINDOW, 32, [target.id])
        display.flush()

    print("ready", flush=True)
    _serve_until_stdin_closes(display, on_event)


if __name__ == "__main__":
    if sys.argv[1:2] == ["window"] and len(sys.argv) == 4:
        _run_window(sys.argv[2], sys.argv[3])
    elif sys.argv[1:] == ["ewmh"]:
        _run_ewmh_wm()
    else:
        sys.exit("usage: xserver.py window CLASS TITLE | xserver.py ewmh")
