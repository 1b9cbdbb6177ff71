"""Record real keyboard, mouse and focus events from an X11 session.

Two threads feed one ``submit`` callable (normally
:meth:`keystay.client.capture.recorder.Recorder.submit`) with the raw events
of :mod:`keystay.common.events`; neither does anything but build the
event object and call ``submit``:

- **Input** comes from one pynput X listener (the X RECORD extension, which
  sees every device event the server processes, including XTEST input, but not
  ``XSendEvent`` injections). pynput normally runs a keyboard and a mouse
  listener, each on its own RECORD connection and thread; we run *one*
  listener that records key, button and motion events together, because two
  connections deliver independently and a click followed quickly by a key
  could reach ``submit`` in the wrong order. One stream keeps the server's
  order, and halves the RECORD traffic. The listener reads that stream itself
  (see ``_InputListener``): about 10x less CPU than pynput's generic parsing.
- **The active application** comes from a small python-xlib watcher, because
  pynput has no focus events. With an EWMH window manager it wakes on
  ``PropertyNotify`` for the root's ``_NET_ACTIVE_WINDOW``; without one it
  falls back to the X input focus (woken by ``FocusOut`` on the focused window,
  and polled at ``focus_poll_interval`` as a safety net), walking up to the
  client window that carries ``WM_CLASS``.

Timestamps: input events carry the X server's millisecond time of the event,
mapped onto :func:`time.monotonic` (see :class:`_ServerClock`), so dwell and
flight times stay true although the listener reads in bursts (every
``_READ_PAUSE_S`` at most, to wake up less); focus events are stamped with
:func:`time.monotonic` when they are seen. The two sources reach ``submit`` out
of order by up to that pause; :class:`~keystay.client.capture.recorder.Recorder`
puts them back in time order before tokenizing.

pynput reads ``DISPLAY`` when it is imported, so it is imported only in
:meth:`PynputBackend.start`; :func:`display_problem` uses python-xlib alone and
can be called first to explain to a person why capture cannot start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from keystay.common.errors import KeystayError
from keystay.common.events import AppFocus, Click, KeyEvent, MouseMove, RawEvent, Scroll
from keystay.common.exitcodes import ExitCode

log = logging.getLogger(__name__)

Submit = Callable[[RawEvent], None]

_SIMULATED_HINT = "or use --source simulated for a demo"

# X core event types and protocol constants, spelled out so this module does not
# import Xlib at import time (the values are fixed by the X11 protocol).
_KEY_PRESS, _KEY_RELEASE, _BUTTON_PRESS, _BUTTON_RELEASE, _MOTION_NOTIFY = 2, 3, 4, 5, 6
_SCROLL_BUTTONS = {4: (0, 1), 5: (0, -1), 6: (-1, 0), 7: (1, 0)}
# A core KeyPress/ButtonPress/MotionNotify record: type, detail, sequence, time,
# root, event, child, root x/y, event x/y, state, same-screen, pad. RECORD sends
# it in the recording client's byte order, which python-xlib sets to native.
_CORE_EVENT = struct.Struct("=BBxxIxxxxxxxxxxxxhhxxxxHxx")
_UINT32 = struct.Struct("=I")
_ENABLE_CONTEXT = struct.Struct("=BBHI")  # major opcode, minor opcode, length (words), context
# Seconds the listener waits after a read so events gather (one wake-up per
# burst). Must stay well below keystay.client.capture.recorder.REORDER_S.
_READ_PAUSE_S = 0.04
_BUTTON_NAMES = {1: "left", 2: "middle", 3: "right"}


class CaptureUnavailableError(KeystayError, RuntimeError):
    """Input capture cannot start; the message says why and what to do."""

    exit_code = ExitCode.DEVICE_NO_DISPLAY


def display_problem(display: str | None = None) -> str | None:
    """Say why X11 capture cannot run here, or return ``None`` when it can.

    Importable and callable without pynput (which needs ``DISPLAY`` at import
    time). Checks that ``DISPLAY`` is set, that an X server answers on it, and
    that the server offers the RECORD extension pynput listens through.

    Parameters
    ----------
    display
        The display to check; defaults to the ``DISPLAY`` environment variable.

    Returns
    -------
    str or None
        A plain sentence naming the problem and the fix, for a person to read.
    """
    name = display if display is not None else os.environ.get("DISPLAY", "")
    if not name:
        if os.environ.get("WAYLAND_DISPLAY"):
            return (
                "No X display: this is a Wayland session without DISPLAY set. keystay records "
                "from X11; log in to an X11 (\"Xorg\") session, " + _SIMULATED_HINT + "."
            )
        return (
            "No X display: DISPLAY is not set. keystay records from an X11 session; run it "
            "inside your desktop session, " + _SIMULATED_HINT + "."
        )
    try:
        import pynput  # noqa: F401  (only whether it is installed)
        from Xlib.display import Display
    except ImportError:  # a server install, or keystay without its device extra
        return (
            "pynput or python-xlib is not installed: they come with keystay's device "
            "extra (pip install 'keystay[device]', or `make venv`), " + _SIMULATED_HINT + "."
        )
    try:
        conn = Display(name)
    except Exception as exc:  # python-xlib raises many kinds (DisplayError, OSError, ...)
        return (
            f"No X server answers on DISPLAY={name} ({exc}). Start keystay from inside your "
            "desktop session (check `echo $DISPLAY` there, and XAUTHORITY if you use sudo), "
            + _SIMULATED_HINT
            + "."
        )
    try:
        if not conn.has_extension("RECORD"):
            return (
                f"The X server on DISPLAY={name} has no RECORD extension, which keystay needs "
                "to see input. Enable it in xorg.conf (Section \"Module\": Load \"record\"), "
                + _SIMULATED_HINT
                + "."
            )
    finally:
        conn.close()
    return None


class _ServerClock:
    """Map X server timestamps (ms, wrapping at 2**32) onto :func:`time.monotonic`.

    The offset comes from a calibration round trip (:meth:`calibrate`: the
    server stamps a property change made between two monotonic readings),
    repeated every ``RECALIBRATE_S`` to follow drift between the clocks. An
    event's delivery can only be late, never early, so a mapped time later
    than ``now`` shows the offset is too large: it is lowered on the spot.
    Before the first calibration (or after the 32-bit server clock wraps,
    every 49.7 days) the first event's arrival sets the offset.
    """

    __slots__ = ("_calibrated_at", "_last_ms", "_offset")

    RECALIBRATE_S = 30.0
    _MAX_LAG_S = 5.0

    def __init__(self) -> None:
        self._offset: float | None = None
        self._calibrated_at = float("-inf")
        self._last_ms = 0

    def stale(self, now: float) -> bool:
        return now - self._calibrated_at >= self.RECALIBRATE_S

    def calibrate(self, server_ms: int, before: float, after: float) -> None:
        """The server stamped ``server_ms`` between monotonic ``before`` and ``after``."""
        self._offset = (before + after) / 2 - server_ms / 1000.0
        self._calibrated_at = after
        self._last_ms = server_ms

    def to_monotonic(self, server_ms: int, now: float) -> float:
        if server_ms < self._last_ms - 0x8000_0000:  # the 32-bit ms clock wrapped
            self._offset = None
            self._calibrated_at = float("-inf")
        self._last_ms = server_ms
        stamp = server_ms / 1000.0
        if self._offset is None:
            self._offset = now - stamp
        t = stamp + self._offset
        if t > now:
            self._offset -= t - now
            return now
        if t < now - self._MAX_LAG_S:  # never trust an estimate that far off
            return now - self._MAX_LAG_S
        return t


class _KeyFields:
    """The two fields of an X key event that pynput's key translation reads."""

    __slots__ = ("detail", "state")

    def __init__(self, detail: int, state: int) -> None:
        self.detail = detail
        self.state = state


def _listener_class() -> type:
    """Build the combined pynput listener class (imports pynput: needs DISPLAY)."""
    from pynput._util.xorg import display_manager
    from pynput.keyboard import Key, KeyCode
    from pynput.keyboard._xorg import Listener as XorgKeyListener
    from Xlib import X, Xatom
    from Xlib.display import Display
    from Xlib.ext import record

    class _InputListener(XorgKeyListener):  # type: ignore[misc]
        """pynput's X keyboard listener, widened to buttons and motion, reading
        the RECORD stream itself.

        Overrides pynput-internal hooks (pynput is pinned to 1.8.2 in
        pyproject.toml): ``_run`` (the RECORD session), ``_stop_platform`` (a
        hang on stop). pynput still provides the listener thread, its
        start/wait/stop protocol and the key translation (keycode + modifier
        state -> Key/KeyCode, with its keyboard-mapping handling).

        Why read the stream ourselves: pynput hands each recorded event through
        python-xlib's generic reply and event parsers (~190 Python calls per
        event); with them the recorder process used 12.5 % of a core at 5,000
        events/s, and about 3 % without them (bench/bench_recorder.py). A
        RECORD reply is a 32-byte header plus raw 32-byte core events, so
        ``recv`` + ``struct`` does.

        ``vk`` is the X keycode: pynput's ``vk`` is the keysym, which differs
        between the press and the release of one key when Shift changes in
        between ("H" down, "h" up); the keycode is what pairs them.
        """

        def __init__(self, submit: Submit) -> None:
            super().__init__()
            self.name = "keystay-input"
            self._keystay_submit = submit
            self._keystay_clock = _ServerClock()
            self._keystay_keys: dict[tuple[int, int], tuple[str | None, str | None]] = {}
            self._keystay_clock_window: Any = None
            self._keystay_clock_atom = 0
            self.recording = threading.Event()
            self.failure: str | None = None
            self.events_received = 0  # input events the X server delivered to us

        def _run(self) -> None:
            try:
                self._display_stop = Display()
                self._display_record = Display()
                with display_manager(self._display_record) as dm:
                    # The same context pynput creates: device events from every
                    # client, here the range KeyPress..MotionNotify (keys,
                    # buttons, motion) instead of keys only.
                    self._context = dm.record_create_context(
                        0,
                        [record.AllClients],
                        [
                            {
                                "core_requests": (0, 0),
                                "core_replies": (0, 0),
                                "ext_requests": (0, 0, 0, 0),
                                "ext_replies": (0, 0, 0, 0),
                                "delivered_events": (0, 0),
                                "device_events": (X.KeyPress, X.MotionNotify),
                                "errors": (0, 0),
                                "client_started": False,
                                "client_died": False,
                            }
                        ],
                    )
                self._initialize(self._display_stop)  # pynput: read the keyboard mapping
                self._calibrate()
                major = self._display_record.display.get_extension_major(record.extname)
                sock = self._display_record.display.socket
                # EnableContext (minor opcode 5) by hand: python-xlib's version
                # blocks in its own parser loop. This connection carries nothing
                # else from now on, so its request counter no longer matters.
                sock.sendall(_ENABLE_CONTEXT.pack(major, 5, 2, self._context))
                self._mark_ready()
                self._read_records(sock)
            except Exception as exc:  # X went away or refused RECORD: report, end the thread
                self.failure = f"the X input listener stopped: {exc!r}"
                log.warning("%s", self.failure)
            finally:
                self._mark_ready()  # never leave stop()/wait() waiting
                with contextlib.suppress(Exception):
                    if hasattr(self, "_context"):
                        self._display_stop.record_free_context(self._context)
                        self._display_stop.sync()
                with contextlib.suppress(Exception):
                    self._display_stop.close()
                with contextlib.suppress(Exception):
                    self._display_record.close()

        def _read_records(self, sock: Any) -> None:
            """Read EnableContext replies until EndOfData (or the server goes away)."""
            buf = bytearray()
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the X server closed the connection")
                self._poll_display_stop()
                buf += chunk
                used = 0
                while len(buf) - used >= 32:
                    kind = buf[used]
                    if kind != 1:  # 0 = error, else an event: 32 bytes, not ours
                        if kind == 0:
                            raise RuntimeError(f"X error {buf[used + 1]} on the RECORD stream")
                        used += 32
                        continue
                    total = 32 + 4 * _UINT32.unpack_from(buf, used + 4)[0]
                    if len(buf) - used < total:
                        break
                    category = buf[used + 1]
                    if category == record.FromServer:
                        self.events_received += (total - 32) // 32
                        try:
                            self._decode(bytes(buf[used + 32 : used + total]))
                        except Exception:  # one bad record must not end capture
                            log.exception("could not decode recorded X input; skipped")
                    elif category == record.StartOfData:
                        # From here on nothing is missed: start() waits for this.
                        self.recording.set()
                    elif category == record.EndOfData:
                        return
                    used += total
                del buf[:used]
                # Let a few events gather before the next read: one wake-up per
                # burst instead of per event. Events carry the server's time, so
                # reading later changes no timestamp; the recorder puts input and
                # focus events back in time order (Recorder.REORDER_S > this).
                time.sleep(_READ_PAUSE_S)

        def _poll_display_stop(self) -> None:
            """Per read: apply keyboard-mapping changes; recalibrate the clock when due."""
            display = self._display_stop
            if display.pending_events():
                self._take_events(None)
            if self._keystay_clock.stale(time.monotonic()):
                self._calibrate()

        def _take_events(self, until_property: int | None) -> int:
            """Read events on the control connection: apply MappingNotify; if
            ``until_property`` is an atom, block until our PropertyNotify for it
            and return its server time."""
            display = self._display_stop
            while until_property is not None or display.pending_events():
                event = display.next_event()
                if event.type == X.MappingNotify:
                    # Only MappingNotify reaches this connection unasked: apply
                    # it, so a changed layout translates correctly.
                    display.refresh_keyboard_mapping(event)
                    self._keystay_keys.clear()
                elif event.type == X.PropertyNotify and event.atom == until_property:
                    return int(event.time)
            return 0

        def _calibrate(self) -> None:
            """Read the X server's clock: it stamps a property change on our window."""
            display = self._display_stop
            if self._keystay_clock_window is None:
                self._keystay_clock_atom = display.intern_atom("_KEYSTAY_CLOCK")
                self._keystay_clock_window = display.screen().root.create_window(
                    -1, -1, 1, 1, 0, 0, X.InputOnly, X.CopyFromParent,
                    event_mask=X.PropertyChangeMask,
                )
            before = time.monotonic()
            self._keystay_clock_window.change_property(
                self._keystay_clock_atom, Xatom.INTEGER, 32, [0]
            )
            server_ms = self._take_events(self._keystay_clock_atom)
            self._keystay_clock.calibrate(server_ms, before, time.monotonic())

        def _stop_platform(self) -> None:
            # pynput queues DisableContext on the recording connection without
            # flushing it (stop() then hangs until the next input event); we
            # send it on the other connection: the server ends the stream.
            if not hasattr(self, "_context"):
                self.wait()
            if hasattr(self, "_context"):
                self._display_stop.record_disable_context(self._context)
                self._display_stop.flush()

        def _decode(self, data: bytes) -> None:
            submit = self._keystay_submit
            unpack = _CORE_EVENT.unpack_from
            now = time.monotonic()
            to_monotonic = self._keystay_clock.to_monotonic
            for offset in range(0, len(data) - 31, 32):
                kind, detail, server_ms, root_x, root_y, state = unpack(data, offset)
                kind &= 0x7F  # the top bit only says "sent by SendEvent"
                t = to_monotonic(server_ms, now)
                if kind == _MOTION_NOTIFY:
                    submit(MouseMove(t, root_x, root_y))
                elif kind in (_KEY_PRESS, _KEY_RELEASE):
                    char, name = self._translate(detail, state)
                    submit(KeyEvent(t, kind == _KEY_PRESS, detail, char, name))
                elif kind in (_BUTTON_PRESS, _BUTTON_RELEASE):
                    scroll = _SCROLL_BUTTONS.get(detail)
                    if scroll is not None:
                        # A wheel step is a press+release pair; one Scroll per step.
                        if kind == _BUTTON_PRESS:
                            submit(Scroll(t, root_x, root_y, scroll[0], scroll[1]))
                        continue
                    button = _BUTTON_NAMES.get(detail) or f"button{detail}"
                    submit(Click(t, root_x, root_y, button, kind == _BUTTON_PRESS))

        def _translate(self, keycode: int, state: int) -> tuple[str | None, str | None]:
            display = self._display_stop
            cache = self._keystay_keys
            hit = cache.get((keycode, state))
            if hit is not None:
                return hit
            try:
                key = self._event_to_key(display, _KeyFields(keycode, state))
            except IndexError:
                key = None
            if isinstance(key, Key):
                hit = (None, key.name)
            elif isinstance(key, KeyCode):
                hit = (key.char, None)
            else:
                hit = (None, None)
            if len(cache) < 4096:  # bounded: a keyboard has few keys and states
                cache[(keycode, state)] = hit
            return hit

    return _InputListener


class _FocusWatcher(threading.Thread):
    """Report the active application as :class:`AppFocus` events (see module doc)."""

    def __init__(
        self,
        submit: Submit,
        *,
        display_name: str | None,
        window_titles: bool,
        poll_interval: float,
    ) -> None:
        super().__init__(name="keystay-focus", daemon=True)
        self._submit = submit
        self._display_name = display_name
        self._titles = window_titles
        self._poll = poll_interval
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self.ready = threading.Event()
        self.error: str | None = None
        self.ewmh = False
        self._last: tuple[str, str | None] | None = None
        self._watched: Any = None  # window whose focus/title we selected events on
        self._net_active = 0  # _NET_ACTIVE_WINDOW (0: none, or no EWMH)
        self._focus_id = -1  # last X input focus window, and its client window
        self._focus_client: Any = None
        self._client_id = -1  # the client window last described

    def stop(self, timeout: float) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self.join(timeout)
        if not self.is_alive():
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def run(self) -> None:
        from Xlib import X, Xatom, error
        from Xlib.display import Display

        try:
            disp = Display(self._display_name)
        except Exception as exc:  # reported through .error
            self.error = f"focus watcher could not connect to X: {exc}"
            self.ready.set()
            return
        # Requests on windows that vanish meanwhile fail asynchronously (BadWindow):
        # expected, harmless, and not worth a line on stderr each time.
        disp.set_error_handler(lambda *_: None)
        root = disp.screen().root
        self._x = X
        self._xerror = error
        self._xatom = Xatom
        self._disp = disp
        self._root = root
        self._a_active = disp.intern_atom("_NET_ACTIVE_WINDOW")
        self._a_pid = disp.intern_atom("_NET_WM_PID")
        self._a_name = disp.intern_atom("_NET_WM_NAME")
        try:
            # Root PropertyNotify: _NET_ACTIVE_WINDOW changed. Root FocusOut: the
            # focus left the root (no application had it, so none was watched).
            root.change_attributes(event_mask=X.PropertyChangeMask | X.FocusChangeMask)
            self._read_net_active()
            self._check(refresh=True)
            self.ready.set()
            while not self._stopping:
                # With EWMH, PropertyNotify wakes us; the timeout is only a safety net.
                timeout = max(5.0, self._poll) if self.ewmh else self._poll
                readable, _, _ = select.select([disp.fileno(), self._wake_r], [], [], timeout)
                if self._wake_r in readable:
                    break
                active_changed = refresh = False
                while disp.pending_events():
                    event = disp.next_event()
                    if event.type == X.PropertyNotify:
                        if event.atom == self._a_active:
                            active_changed = True
                        elif event.atom in (self._a_name, Xatom.WM_NAME):
                            refresh = True  # a title changed (only selected with titles)
                    elif event.type == X.DestroyNotify:
                        self._forget_windows()
                if active_changed:
                    self._read_net_active()
                self._check(refresh=refresh)
        except Exception as exc:  # the X connection died: report, end the thread
            self.error = f"focus watcher stopped: {exc}"
            log.warning("%s", self.error)
        finally:
            self.ready.set()
            with contextlib.suppress(Exception):  # the connection may be broken already
                disp.close()

    # -- window inspection (runs on the watcher thread only) --------------
    #
    # A check costs one round trip to the X server at most (get_input_focus,
    # without EWMH) when nothing changed: the focus window's client and the
    # client's description are cached until the focus moves or a window dies.

    def _forget_windows(self) -> None:
        self._focus_id = self._client_id = -1
        self._focus_client = None

    def _read_net_active(self) -> None:
        try:
            prop = self._root.get_full_property(self._a_active, self._xatom.WINDOW)
        except self._xerror.XError:
            prop = None
        self.ewmh = prop is not None
        self._net_active = int(prop.value[0]) if prop is not None and len(prop.value) else 0

    def _check(self, *, refresh: bool) -> None:
        window = self._active_window()
        self._watch(window)
        if window is None:
            # Nothing identifiable has the focus (the root, PointerRoot, a
            # window that just closed): keep the last app, so an excluded app
            # stays excluded until another real application takes the focus.
            return
        if window.id == self._client_id and not refresh:
            return
        described = self._describe(window)
        if described is None:
            # The window vanished while we looked: keep the last app (as above)
            # and look again at the next wake-up.
            self._forget_windows()
            return
        self._client_id = window.id
        app, title = described
        if (app, title) != self._last:
            self._last = (app, title)
            self._submit(AppFocus(time.monotonic(), app, title))

    def _active_window(self) -> Any:
        if self._net_active:
            return self._disp.create_resource_object("window", self._net_active)
        # No EWMH, or it names no active window (the desktop, or a WM that
        # does not keep it up to date): the X input focus decides.
        try:
            focus = self._disp.get_input_focus().focus
        except self._xerror.XError:
            return None
        if isinstance(focus, int) or focus.id == self._root.id:  # None or PointerRoot
            return None
        if focus.id != self._focus_id:
            self._focus_id = focus.id
            self._focus_client = self._client_of(focus)
        return self._focus_client

    def _client_of(self, window: Any) -> Any:
        """The nearest window at or above ``window`` with WM_CLASS (else below it)."""
        error = self._xerror
        root_id = self._root.id
        current = window
        try:
            for _ in range(32):
                if current.get_wm_class() is not None:
                    return current
                parent = current.query_tree().parent
                if isinstance(parent, int) or parent.id in (0, root_id):
                    break
                current = parent
            # A reparenting WM without EWMH may focus its frame: look just below.
            frontier = [window]
            for _ in range(2):
                children = [c for w in frontier for c in w.query_tree().children]
                for child in children:
                    if child.get_wm_class() is not None:
                        return child
                frontier = children
        except error.XError:
            return None
        return window

    def _describe(self, window: Any) -> tuple[str, str | None] | None:
        """(application, title or None) of a client window; None if it is gone."""
        error = self._xerror
        app = "unknown"
        title: str | None = None
        try:
            wm_class = window.get_wm_class()
            if wm_class is not None and (wm_class[1] or wm_class[0]):
                app = wm_class[1] or wm_class[0]
            else:
                pid = window.get_full_property(self._a_pid, self._xatom.CARDINAL)
                if pid is not None and len(pid.value):
                    app = _process_name(int(pid.value[0])) or app
            if self._titles:
                # Any type: some clients set _NET_WM_NAME as STRING, not UTF8_STRING.
                name = window.get_full_property(self._a_name, self._x.AnyPropertyType)
                if name is not None and name.value:
                    raw = name.value
                    title = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                else:
                    wm_name = window.get_wm_name()
                    title = str(wm_name) if wm_name else None
        except error.XError:
            return None
        return app, title

    def _watch(self, window: Any) -> None:
        """Select the events that tell us this window lost focus or changed title."""
        x = self._x
        if self._watched is not None and (window is None or window.id != self._watched.id):
            self._watched.change_attributes(event_mask=x.NoEventMask)
            self._watched = None
        if window is None or self._watched is not None:
            return
        mask = x.StructureNotifyMask | x.FocusChangeMask
        if self._titles:
            mask |= x.PropertyChangeMask
        window.change_attributes(event_mask=mask)
        self._watched = window
        self._disp.flush()


def _process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


class PynputBackend:
    """Real input capture on X11 through pynput, plus an active-window watcher.

    Parameters
    ----------
    submit
        Called with every :data:`~keystay.common.events.RawEvent`, from
        the backend's threads. It must return quickly and never raise
        (:meth:`Recorder.submit` only enqueues).
    window_titles
        Also report window titles in :class:`AppFocus` (and title changes).
        Off by default: titles often carry document names and e-mail subjects.
    focus_poll_interval
        Seconds between focus checks when no EWMH window manager announces the
        active window. Focus events (``FocusOut`` on the focused window,
        ``PropertyNotify`` on the root) wake the watcher at once either way;
        polling only catches what they miss. With EWMH the safety re-check
        runs every ``max(5, focus_poll_interval)`` seconds.

    Examples
    --------
    >>> backend = PynputBackend(recorder.submit)      # doctest: +SKIP
    >>> backend.start(); ...; backend.stop()          # doctest: +SKIP
    """

    def __init__(
        self,
        submit: Submit,
        *,
        window_titles: bool = False,
        focus_poll_interval: float = 1.0,
    ) -> None:
        if focus_poll_interval <= 0:
            raise ValueError(f"focus_poll_interval must be > 0, got {focus_poll_interval}")
        self._submit = submit
        self._titles = window_titles
        self._poll = focus_poll_interval
        self._listener: Any = None
        self._watcher: _FocusWatcher | None = None

    @property
    def alive(self) -> bool:
        """Both the input listener and the focus watcher are running."""
        return (
            self._listener is not None
            and self._listener.is_alive()
            and self._watcher is not None
            and self._watcher.is_alive()
        )

    @property
    def events_received(self) -> int:
        """Input events the X server delivered (RECORD records), before any decoding.

        Compared with the recorder's ``events_seen`` this tells a loss inside
        keystay apart from what the X server never produced (under load it
        merges consecutive pointer motions not yet processed, as for a real
        mouse; key events are never merged).
        """
        return int(self._listener.events_received) if self._listener is not None else 0

    @property
    def problem(self) -> str | None:
        """Why capture stopped on its own (the X server went away, ...), if it did."""
        if self._watcher is not None and self._watcher.error:
            return self._watcher.error
        if self._listener is not None and not self._listener.is_alive():
            return self._listener.failure or "the X input listener stopped (did the X session end?)"
        return None

    def start(self, timeout: float = 10.0) -> None:
        """Start capturing; when this returns, no later input event is missed.

        Raises
        ------
        CaptureUnavailableError
            No usable X display (the message says what to do), or the
            listener did not start recording within ``timeout`` seconds.
        """
        if self._listener is not None:
            raise RuntimeError("PynputBackend.start() called twice")
        problem = display_problem()
        if problem is not None:
            raise CaptureUnavailableError(problem)
        # Focus first: the current application must be known before the
        # first key is recorded, or an excluded app's keys could slip through.
        watcher = _FocusWatcher(
            self._submit,
            display_name=os.environ.get("DISPLAY"),
            window_titles=self._titles,
            poll_interval=self._poll,
        )
        watcher.start()
        self._watcher = watcher
        if not watcher.ready.wait(timeout) or watcher.error:
            self.stop()
            raise CaptureUnavailableError(watcher.error or "the X focus watcher did not start")
        listener = _listener_class()(self._submit)
        self._listener = listener
        listener.start()
        deadline = time.monotonic() + timeout
        while not listener.recording.wait(0.05):
            if not listener.is_alive() or time.monotonic() > deadline:
                failure = listener.failure
                self.stop()
                raise CaptureUnavailableError(
                    f"{failure or 'the X input listener did not start recording'}; check that "
                    "the X server's RECORD extension works (`xdpyinfo -queryExtensions`)"
                )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads; no event is submitted after this returns."""
        listener, self._listener = self._listener, None
        watcher, self._watcher = self._watcher, None
        if listener is not None:
            try:
                listener.stop()
            except Exception:  # the X connection may already be gone
                log.debug("listener stop failed", exc_info=True)
            listener.join(timeout)
        if watcher is not None:
            watcher.stop(timeout)
