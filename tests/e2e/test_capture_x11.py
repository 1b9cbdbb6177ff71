"""Real capture on a real X server: xdotool types, the store must hold exactly that.

Input is driven with xdotool, which injects through XTEST: the server treats it
as device input, so the X RECORD extension (what pynput listens through) sees
it as it would see a person's keyboard and mouse. pynput's own Controller would
not do: it uses XSendEvent, which a recorder does not see.

Each test starts its own Xvfb and X clients and stops them by PID in a
``finally`` (fixtures). Nothing here sleeps to "let things settle": the tests
wait for the event the backend reports (a probe wraps ``Recorder.submit``) and
fail with the events seen so far if it never comes.

Timing tokens (``timing:flight:*``, ``timing:dwell:*``) depend on how fast
xdotool typed, so the expected sequences name their *position* exactly and
their bucket as ``*``; every other token is compared exactly, in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import xserver

from keystay.client.capture.pynput_backend import PynputBackend, display_problem
from keystay.client.capture.recorder import Recorder
from keystay.client.store import EventStore
from keystay.common.events import AppFocus, KeyEvent, RawEvent
from keystay.common.tokens import Tokenizer, TokenRecord, token_name

MISSING = xserver.missing_tools()
needs_x = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# Focus events must arrive by X events alone (FocusOut, PropertyNotify): a
# poll this slow would make every focus wait below time out.
NO_POLL = 60.0
WAIT_S = 10.0


# -- helpers -------------------------------------------------------------------


class Probe:
    """Wraps ``Recorder.submit``: passes every event on, and lets a test wait for one."""

    def __init__(self, submit: Callable[[RawEvent], None]) -> None:
        self._submit = submit
        self._cond = threading.Condition()
        self.events: list[RawEvent] = []

    def __call__(self, event: RawEvent) -> None:
        self._submit(event)
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_for(
        self, what: str, pred: Callable[[RawEvent], bool], since: int, count: int = 1
    ) -> None:
        """Wait until ``count`` events after index ``since`` satisfy ``pred``; fail if not."""

        def found() -> bool:
            return sum(1 for e in self.events[since:] if pred(e)) >= count

        with self._cond:
            if not self._cond.wait_for(found, timeout=WAIT_S):
                tail = "\n  ".join(repr(e) for e in self.events[-12:])
                pytest.fail(f"the backend never reported {what} within {WAIT_S:.0f} s; "
                            f"last events:\n  {tail}")


def app_is(name: str) -> Callable[[RawEvent], bool]:
    return lambda e: isinstance(e, AppFocus) and e.app == name


def key_up(char: str) -> Callable[[RawEvent], bool]:
    return lambda e: isinstance(e, KeyEvent) and not e.pressed and e.char == char


def normalized(records: list[TokenRecord]) -> list[tuple[str, str | None, str | None]]:
    """(name, app, text) per record, timing buckets replaced by ``*``."""
    out = []
    for r in records:
        name = token_name(r.token)
        if name.startswith("timing:"):
            name = name.rsplit(":", 1)[0] + ":*"
        out.append((name, r.app, r.text))
    return out


def press(cls: str, text: str | None = None) -> list[tuple[str, str | None, str | None]]:
    """A non-modifier key press: its flight-time token, then its class."""
    return [("timing:flight:*", None, None), (f"key:{cls}", None, text)]


def tok(name: str, app: str | None = None, text: str | None = None) -> tuple[str, str | None,
                                                                              str | None]:
    return (name, app, text)


DWELL = tok("timing:dwell:*")


def read_all(store: EventStore) -> list[TokenRecord]:
    blocks = store.blocks()
    assert blocks, "the recorder wrote nothing to the store"
    records: list[TokenRecord] = []
    for info in blocks:
        records.extend(store.read_block(info.block))
    return records


# -- fixtures: every process is stopped by PID in the fixture's finally ----------


@pytest.fixture
def xvfb(monkeypatch: pytest.MonkeyPatch) -> Iterator[xserver.XServer]:
    server = xserver.start_xvfb()
    try:
        # pynput and python-xlib read DISPLAY when they connect.
        monkeypatch.setenv("DISPLAY", server.display)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        monkeypatch.delenv("XAUTHORITY", raising=False)
        yield server
    finally:
        server.stop()


@pytest.fixture
def two_apps(xvfb: xserver.XServer) -> Iterator[tuple[xserver.XClient, xserver.XClient]]:
    alpha = xserver.start_window(xvfb, "Alpha", "alpha title")
    try:
        beta = xserver.start_window(xvfb, "Beta", "beta title")
        try:
            yield alpha, beta
        finally:
            beta.stop()
    finally:
        alpha.stop()


@pytest.fixture
def ewmh_wm(xvfb: xserver.XServer) -> Iterator[xserver.XClient]:
    wm = xserver.start_ewmh_wm(xvfb)
    try:
        yield wm
    finally:
        wm.stop()


class Capture:
    """Recorder + PynputBackend + EventStore, wired as the daemon wires them."""

    def __init__(self, data_dir: Path, tokenizer: Tokenizer, *, window_titles: bool) -> None:
        self.store = EventStore.open(data_dir)
        self.recorder = Recorder(self.store, tokenizer)
        self.probe = Probe(self.recorder.submit)
        self.backend = PynputBackend(
            self.probe, window_titles=window_titles, focus_poll_interval=NO_POLL
        )

    def start(self) -> None:
        self.recorder.start()
        self.backend.start()

    def stop(self) -> bool:
        self.backend.stop()
        return self.recorder.stop()

    def close(self) -> None:
        self.backend.stop()
        self.recorder.stop()
        self.store.close()


# -- tests ---------------------------------------------------------------------------


@pytest.mark.e2e
@needs_x
def test_every_input_event_reaches_the_store_in_order(
    xvfb: xserver.XServer, two_apps: tuple[xserver.XClient, xserver.XClient], tmp_path: Path
) -> None:
    """Keys, shift, Return/BackSpace, moves, buttons 1-3, four scroll directions and
    focus changes (no window manager: the X input focus fallback) arrive exactly."""
    alpha, beta = two_apps
    x = xvfb.xdotool
    x("windowfocus", "--sync", str(alpha.window))
    cap = Capture(tmp_path / "store", Tokenizer(), window_titles=False)
    try:
        cap.start()
        probe = cap.probe
        probe.wait_for("the focused app Alpha", app_is("Alpha"), 0)
        # The pointer starts at the screen centre (640, 512); a click there
        # tells the tokenizer where it is, so the first move has a start.
        x("click", "1")
        x("type", "Hello")
        x("key", "shift+a", "Return", "BackSpace")
        x("mousemove", "640", "412", "click", "2")  # 100 px up
        x("mousemove", "840", "412", "click", "3")  # 200 px right
        x("mousemove", "840", "432")  # 20 px down
        x("click", "4", "click", "5", "click", "6", "click", "7")
        mark = probe.mark()
        x("windowfocus", "--sync", str(beta.window))
        probe.wait_for("the focus change to Beta", app_is("Beta"), mark)
        x("type", "ok")
        mark = probe.mark()
        x("windowfocus", "--sync", str(alpha.window))
        probe.wait_for("the focus change back to Alpha", app_is("Alpha"), mark)
        mark = probe.mark()
        x("type", "x")
        probe.wait_for("the release of the last key", key_up("x"), mark)
        assert cap.stop(), cap.recorder.stats
        stats = cap.recorder.stats
        records = read_all(cap.store)
    finally:
        cap.close()

    expected = [
        tok("app:other", "Alpha"),
        tok("click:left:press"), tok("click:left:release"),
        # xdotool type "Hello": Shift down, H down, Shift up, h up, then e l l o.
        tok("key:shift"), *press("upper"), tok("key:shift_up"), DWELL,
        *press("letter"), DWELL, *press("letter"), DWELL, *press("letter"), DWELL,
        *press("letter"), DWELL,
        # key shift+a: xdotool releases in press order, Shift first.
        tok("key:shift"), *press("upper"), tok("key:shift_up"), DWELL,
        *press("return"), DWELL,
        *press("backspace"), DWELL,
        tok("move:N:40-150px"), tok("click:middle:press"), tok("click:middle:release"),
        tok("move:E:150-400px"), tok("click:right:press"), tok("click:right:release"),
        tok("move:S:0-40px"),
        tok("scroll:up"), tok("scroll:down"), tok("scroll:left"), tok("scroll:right"),
        tok("app:other", "Beta"),
        *press("letter"), DWELL, *press("letter"), DWELL,
        tok("app:other", "Alpha"),
        *press("letter"), DWELL,
    ]
    assert normalized(records) == expected
    assert stats.tokens_written == len(expected)
    assert stats.events_dropped_error == stats.events_dropped_overflow == 0
    assert stats.last_error is None
    times = [r.t for r in records]
    assert times == sorted(times), "token times went backwards"


@pytest.mark.e2e
@needs_x
def test_excluded_app_and_pause_leave_only_markers(
    xvfb: xserver.XServer,
    ewmh_wm: xserver.XClient,
    two_apps: tuple[xserver.XClient, xserver.XClient],
    tmp_path: Path,
) -> None:
    """With an EWMH window manager (the _NET_ACTIVE_WINDOW path): while the excluded
    app has the focus, and while paused, only a marker is written; typed characters
    and titles reach the store only because raw text is allowed here."""
    alpha, beta = two_apps
    x = xvfb.xdotool
    x("windowactivate", "--sync", str(alpha.window))
    cap = Capture(
        tmp_path / "store",
        Tokenizer(raw_text=True, excluded_apps=["beta"]),
        window_titles=True,
    )
    try:
        cap.start()
        probe = cap.probe
        probe.wait_for("the active app Alpha", app_is("Alpha"), 0)
        x("type", "ab")
        mark = probe.mark()
        x("windowactivate", "--sync", str(beta.window))
        probe.wait_for("the activation of Beta", app_is("Beta"), mark)
        mark = probe.mark()
        x("type", "secret")
        x("click", "1", "mousemove", "100", "100", "click", "4")
        x("windowactivate", "--sync", str(alpha.window))
        probe.wait_for("the activation of Alpha", app_is("Alpha"), mark)
        mark = probe.mark()
        x("type", "c")
        probe.wait_for("the release of c", key_up("c"), mark)
        cap.recorder.pause()
        assert cap.recorder.paused
        mark = probe.mark()
        x("type", "zz")
        probe.wait_for("both paused keys", key_up("z"), mark, count=2)
        cap.recorder.resume()
        mark = probe.mark()
        x("type", "d")
        probe.wait_for("the release of d", key_up("d"), mark)
        assert cap.stop()
        stats = cap.recorder.stats
        records = read_all(cap.store)
    finally:
        cap.close()

    expected = [
        tok("app:other", "Alpha", "alpha title"),
        *press("letter", "a"), DWELL, *press("letter", "b"), DWELL,
        tok("marker:paused"),  # Beta has the focus: nothing else, not even its name
        tok("marker:resumed"), tok("app:other", "Alpha", "alpha title"),
        *press("letter", "c"), DWELL,
        tok("marker:paused"),  # the employee paused
        tok("marker:resumed"), tok("app:other", "Alpha"),
        *press("letter", "d"), DWELL,
    ]
    assert normalized(records) == expected
    assert stats.events_dropped_paused == 4  # z down, z up, z down, z up
    assert not any("beta" in (r.app or "").lower() or "beta" in (r.text or "") for r in records)


@pytest.mark.e2e
@needs_x
def test_recorder_process_never_imports_torch(xvfb: xserver.XServer, tmp_path: Path) -> None:
    """The always-on side (backend + recorder + tokenizer + store) stays light: run it
    alone in a fresh interpreter, record a key, and look at sys.modules."""
    script = r"""
import json, os, sys, time
display = os.environ.pop("DISPLAY")
from keystay.client.capture import pynput_backend
no_display = pynput_backend.display_problem()
pynput_at_import = "pynput" in sys.modules
os.environ["DISPLAY"] = display
from keystay.client.capture.recorder import Recorder
from keystay.client.store import EventStore
from keystay.common.tokens import Tokenizer
store = EventStore.open(sys.argv[1])
rec = Recorder(store, Tokenizer())
backend = pynput_backend.PynputBackend(rec.submit)
rec.start(); backend.start()
print("ready", flush=True)
sys.stdin.readline()  # the parent typed a key and waited for xdotool to finish
deadline = time.monotonic() + 10
while rec.stats.events_seen < 2 and time.monotonic() < deadline:
    time.sleep(0.01)
backend.stop(); rec.stop(); store.close()
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "opacus", "flwr")),
    "pynput_at_import": pynput_at_import,
    "pynput_loaded": "pynput" in sys.modules,
    "no_display": no_display,
    "tokens_written": rec.stats.tokens_written,
}), flush=True)
"""
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "store")],
        env=xvfb.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        assert line.strip() == "ready", f"recorder child did not start: {line!r}"
        xvfb.xdotool("key", "q")
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["modules"] == []
    assert report["pynput_at_import"] is False
    assert report["pynput_loaded"] is True  # it did record through pynput
    assert report["tokens_written"] >= 2  # flight + key:letter at least (+ dwell)
    assert "DISPLAY is not set" in report["no_display"]


def test_display_problem_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    message = display_problem()
    assert message is not None
    assert "DISPLAY is not set" in message and "--source simulated" in message
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert "Wayland" in (display_problem() or "")


def test_display_problem_when_no_server_answers() -> None:
    # A display number whose socket cannot exist: nothing answers there.
    message = display_problem(":65000")
    assert message is not None
    assert "No X server answers on DISPLAY=:65000" in message


@pytest.mark.e2e
@needs_x
def test_display_problem_is_none_on_a_live_server(xvfb: xserver.XServer) -> None:
    assert display_problem() is None
    assert os.environ["DISPLAY"] == xvfb.display
