"""Event -> token vocabulary and the streaming tokenizer.

This module is the capture boundary's first step: raw OS events
(:mod:`keystay.common.events`) become *tokens* here, in memory, before
anything is written. It is shared with the model (the vocabulary fixes the
embedding size), so it must stay pure Python: no torch, no numpy.

The vocabulary itself (token names, ids, kinds, bucket edges) is
:mod:`keystay.common.vocab`; this module is the tokenizer that emits it, and
re-exports the vocabulary names it always exported.

Examples
--------
>>> tok = Tokenizer()
>>> from keystay.common.events import KeyEvent
>>> [token_name(r.token) for r in tok.feed(KeyEvent(0.0, True, vk=43, char="h"))]
['timing:flight:2000ms+', 'key:letter']
>>> [token_name(r.token) for r in tok.feed(KeyEvent(0.09, False, vk=43, char="h"))]
['timing:dwell:80-110ms']
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Callable, Collection

from keystay.common.events import AppFocus, Click, KeyEvent, MouseMove, RawEvent, Scroll
from keystay.common.vocab import (  # the names the tokenizer emits, and re-exports
    _ALT,
    _CTRL,
    _IDS,
    _MOD_BITS,
    _SHIFT,
    _SHORTCUT_MASKS,
    _SUPER,
    APP_CATEGORIES,
    BUTTONS,
    DIRECTIONS,
    DWELL_EDGES_MS,
    FLIGHT_EDGES_MS,
    IDLE_GAP_S,
    KEY_CLASSES,
    MODIFIERS,
    MOVE_DIST_EDGES_PX,
    MOVE_GAP_S,
    MOVE_MAX_SPAN_S,
    MOVE_MIN_PX,
    PAD_ID,
    SHIFT_SHORTCUT_CLASSES,
    SHORTCUT_CLASSES,
    VOCAB,
    VOCAB_SIZE,
    VOCAB_VERSION,
    TokenRecord,
    _combo_name,
    _ranges,
    token_id,
    token_kind,
    token_name,
)

__all__ = [
    "APP_CATEGORIES",
    "DWELL_EDGES_MS",
    "FLIGHT_EDGES_MS",
    "IDLE_GAP_S",
    "MOVE_DIST_EDGES_PX",
    "MOVE_GAP_S",
    "MOVE_MAX_SPAN_S",
    "MOVE_MIN_PX",
    "PAD_ID",
    "VOCAB",
    "VOCAB_SIZE",
    "VOCAB_VERSION",
    "TokenRecord",
    "Tokenizer",
    "app_category",
    "token_id",
    "token_kind",
    "token_name",
]

# ---------------------------------------------------------------------------
# Key classification

_MOD_NAMES: dict[str, str] = {}
for _alias, _mod in (
    (("shift", "shift_l", "shift_r"), "shift"),
    (("ctrl", "ctrl_l", "ctrl_r", "control", "control_l", "control_r"), "ctrl"),
    (("alt", "alt_l", "alt_r", "option", "option_l", "option_r", "meta_l", "meta_r"), "alt"),
    (("cmd", "cmd_l", "cmd_r", "super", "super_l", "super_r", "win", "win_l", "win_r",
      "hyper_l", "hyper_r"), "super"),
    (("alt_gr", "altgr", "iso_level3_shift", "mode_switch"), "altgr"),
):
    for _name in _alias:
        _MOD_NAMES[_name] = _mod

_NAMED_CLASSES: dict[str, str] = {
    "space": "space",
    "enter": "return", "return": "return", "kp_enter": "return",
    "backspace": "backspace",
    "tab": "tab", "iso_left_tab": "tab",
    "esc": "escape", "escape": "escape",
    "delete": "delete", "kp_delete": "delete",
    "insert": "insert", "kp_insert": "insert",
    "left": "left", "right": "right", "up": "up", "down": "down",
    "kp_left": "left", "kp_right": "right", "kp_up": "up", "kp_down": "down",
    "home": "home", "end": "end", "kp_home": "home", "kp_end": "end",
    "page_up": "page_up", "prior": "page_up", "kp_prior": "page_up", "kp_page_up": "page_up",
    "page_down": "page_down", "next": "page_down", "kp_next": "page_down",
    "kp_page_down": "page_down",
    "caps_lock": "capslock", "capslock": "capslock",
    "menu": "menu",
}
_FUNCTION_RE = re.compile(r"f\d{1,2}")
_NAV = frozenset({"left", "right", "up", "down", "home", "end", "page_up", "page_down"})
_SHORTCUT_CLASS: dict[str, str] = {c: c for c in SHORTCUT_CLASSES}
_SHORTCUT_CLASS.update({"upper": "letter"})
_SHORTCUT_CLASS.update({c: "nav" for c in _NAV})
for _c in ("insert", "capslock", "media", "menu"):
    _SHORTCUT_CLASS[_c] = "other"


def _classify(name: str | None, char: str | None) -> tuple[str, bool]:
    """Return ``(class, is_modifier)`` for a key; class is a KEY_CLASSES or MODIFIERS name."""
    if name:
        low = name.lower()
        low = low.removeprefix("key.")  # str(pynput.keyboard.Key.shift) == "Key.shift"
        mod = _MOD_NAMES.get(low)
        if mod is not None:
            return mod, True
        cls = _NAMED_CLASSES.get(low)
        if cls is not None:
            return cls, False
        if _FUNCTION_RE.fullmatch(low):
            return "function", False
        if low.startswith(("media_", "audio", "xf86")):
            return "media", False
    if char is not None and len(char) == 1:
        if char.isalpha():
            return ("upper" if char.isupper() else "letter"), False
        if char.isdigit():
            return "digit", False
        if char == " ":
            return "space", False
        code = ord(char)
        if char == "\t":
            return "tab", False
        if char in "\r\n":
            return "return", False
        if code == 8:
            return "backspace", False
        if code == 27:
            return "escape", False
        if code == 127:
            return "delete", False
        if 1 <= code <= 26:
            # Ctrl+A..Z arrive as control characters on some backends.
            return "letter", False
        if code >= 32 and char.isprintable():
            return "punct", False
    return "other", False


_classify_cache: dict[tuple[str | None, str | None], tuple[str, bool]] = {}


def _classify_cached(name: str | None, char: str | None) -> tuple[str, bool]:
    key = (name, char)
    hit = _classify_cache.get(key)
    if hit is None:
        hit = _classify(name, char)
        if len(_classify_cache) < 4096:  # bounded: names and characters are few
            _classify_cache[key] = hit
    return hit


# ---------------------------------------------------------------------------
# Applications

_APP_EXACT: dict[str, str] = {}
for _cat, _apps in (
    ("browser", ("firefox", "firefox-esr", "navigator", "chromium", "chromium-browser",
                 "google-chrome", "chrome", "brave-browser", "microsoft-edge", "msedge",
                 "safari", "epiphany", "vivaldi", "opera")),
    ("editor", ("code", "code-oss", "vscodium", "gvim", "vim", "nvim", "emacs", "gedit",
                "kate", "sublime_text", "pycharm", "idea", "zed", "notepad", "notepad++")),
    ("terminal", ("gnome-terminal", "gnome-terminal-server", "xterm", "konsole", "alacritty",
                  "kitty", "terminator", "tilix", "urxvt", "wezterm", "terminal", "iterm2",
                  "xfce4-terminal", "windowsterminal", "cmd", "powershell")),
    ("chat", ("slack", "discord", "teams", "ms-teams", "signal", "telegram",
              "telegramdesktop", "element", "zoom", "mattermost", "skype")),
    ("office", ("libreoffice", "soffice", "winword", "excel", "powerpnt", "onlyoffice",
                "evince", "okular", "acroread")),
    ("mail", ("thunderbird", "evolution", "outlook", "geary", "mail", "mailspring")),
    ("files", ("nautilus", "org.gnome.nautilus", "dolphin", "thunar", "pcmanfm", "nemo",
               "explorer", "finder", "caja")),
):
    for _app in _apps:
        _APP_EXACT[_app] = _cat
_APP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("libreoffice", "office"), ("jetbrains-", "editor"), ("firefox", "browser"),
    ("chrom", "browser"), ("thunderbird", "mail"),
)


def app_category(app: str) -> str:
    """Return the coarse category of an application name (one of ``APP_CATEGORIES``).

    Matching is case-insensitive; unknown applications are ``"other"``.

    >>> app_category("Firefox"), app_category("libreoffice-writer"), app_category("gimp")
    ('browser', 'office', 'other')
    """
    low = app.lower()
    low = low.removesuffix(".exe")
    cat = _APP_EXACT.get(low)
    if cat is not None:
        return cat
    for prefix, cat in _APP_PREFIXES:
        if low.startswith(prefix):
            return cat
    return "other"


# ---------------------------------------------------------------------------
# Id tables used on the hot path

_KEY_IDS: dict[str, int] = {c: _IDS[f"key:{c}"] for c in KEY_CLASSES}
_MOD_PRESS_IDS: dict[str, int] = {m: _IDS[f"key:{m}"] for m in MODIFIERS}
_MOD_UP_IDS: dict[str, int] = {m: _IDS[f"key:{m}_up"] for m in MODIFIERS}
_FLIGHT_IDS: tuple[int, ...] = tuple(
    _IDS[f"timing:flight:{r}"] for r in _ranges(FLIGHT_EDGES_MS, "ms"))
_DWELL_IDS: tuple[int, ...] = tuple(
    _IDS[f"timing:dwell:{r}"] for r in _ranges(DWELL_EDGES_MS, "ms"))
_FLIGHT_EDGES_S: tuple[float, ...] = tuple(e / 1000 for e in FLIGHT_EDGES_MS)
_DWELL_EDGES_S: tuple[float, ...] = tuple(e / 1000 for e in DWELL_EDGES_MS)
_MOVE_IDS: tuple[tuple[int, ...], ...] = tuple(
    tuple(_IDS[f"move:{d}:{r}"] for r in _ranges(MOVE_DIST_EDGES_PX, "px")) for d in DIRECTIONS)
_CLICK_IDS: dict[tuple[str, bool], int] = {
    (b, p): _IDS[f"click:{b}:{'press' if p else 'release'}"] for b in BUTTONS for p in (True, False)
}
_SCROLL_UP, _SCROLL_DOWN = _IDS["scroll:up"], _IDS["scroll:down"]
_SCROLL_LEFT, _SCROLL_RIGHT = _IDS["scroll:left"], _IDS["scroll:right"]
_APP_IDS: dict[str, int] = {c: _IDS[f"app:{c}"] for c in APP_CATEGORIES}
_PAUSED, _RESUMED, _IDLE = _IDS["marker:paused"], _IDS["marker:resumed"], _IDS["marker:idle"]
# (modifier mask, shortcut class) -> id; a mask without ctrl/alt/super maps only
# the shift-only classes.
_SHORTCUT_IDS: dict[tuple[int, str], int] = {
    (m, c): _IDS[f"shortcut:{_combo_name(m)}+{c}"]
    for m in _SHORTCUT_MASKS for c in SHORTCUT_CLASSES
}
_SHORTCUT_IDS.update({(_SHIFT, c): _IDS[f"shortcut:shift+{c}"] for c in SHIFT_SHORTCUT_CLASSES})
_MOVE_MIN2 = MOVE_MIN_PX * MOVE_MIN_PX
_SECTOR = math.pi / 4


def _button_class(button: str) -> str:
    low = button.lower()
    low = low.removeprefix("button.")  # str(pynput.mouse.Button.left)
    return low if low in ("left", "middle", "right") else "other"


# ---------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Turn a stream of raw events into token records, one event at a time.

    Parameters
    ----------
    raw_text : bool
        Keep typed characters (``TokenRecord.text`` of key and shortcut tokens)
        and window titles (``text`` of app tokens). Off unless the device policy
        allows raw text.
    excluded_apps : collection of str
        Application names (case-insensitive) during whose focus nothing is
        tokenized: entering one emits a single ``marker:paused`` record (with no
        app name) and nothing else until focus moves to a non-excluded app,
        which emits ``marker:resumed`` and the app token.

    Notes
    -----
    Not thread-safe: feed it from one thread (the recorder's queue consumer).
    Events are expected in time order; small inversions between listener
    threads are tolerated (negative intervals count as zero).

    A pending pointer movement is only emitted when a later event arrives (see
    the module docstring); call :meth:`flush` when the stream stops.
    """

    def __init__(self, *, raw_text: bool = False, excluded_apps: Collection[str] = ()) -> None:
        self._raw_text = raw_text
        self._excluded: frozenset[str] = frozenset(a.lower() for a in excluded_apps)
        self._app: str | None = None
        self._in_excluded = False
        self._user_paused = False
        # Modifier keys currently held: key id -> modifier. Tracked even while
        # silent, so a shortcut that started in an excluded app ends cleanly.
        self._mods_down: dict[object, str] = {}
        self._mod_mask = 0
        # Modifier presses whose token was emitted (their release gets a token).
        self._mods_emitted: set[object] = set()
        # Non-modifier keys pressed and emitted: key id -> press time (dwell).
        self._keys_down: dict[object, float] = {}
        self._last_press: float | None = None
        self._last_t: float | None = None
        # Pointer: last known position and the pending move segment.
        self._px: float | None = None
        self._py: float = 0.0
        self._pt: float = 0.0
        self._move_pending = False
        self._ax = self._ay = self._at = 0.0
        self._handlers: dict[type, Callable[[RawEvent], list[TokenRecord]]] = {
            KeyEvent: self._on_key,  # type: ignore[dict-item]
            MouseMove: self._on_move,  # type: ignore[dict-item]
            Click: self._on_click,  # type: ignore[dict-item]
            Scroll: self._on_scroll,  # type: ignore[dict-item]
            AppFocus: self._on_focus,  # type: ignore[dict-item]
        }

    # -- public -------------------------------------------------------------

    @property
    def raw_text(self) -> bool:
        """Whether typed characters and titles are kept in records."""
        return self._raw_text

    @property
    def recording(self) -> bool:
        """False while paused or while an excluded app has focus."""
        return not (self._user_paused or self._in_excluded)

    def feed(self, event: RawEvent) -> list[TokenRecord]:
        """Tokenize one raw event; return the records it completes (often none).

        Raises
        ------
        TypeError
            If ``event`` is not one of the raw event types.
        """
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"Tokenizer.feed expects a RawEvent, got {type(event).__name__}")
        return handler(event)

    def flush(self) -> list[TokenRecord]:
        """Emit a pending pointer movement now (call when the stream stops or idles)."""
        out: list[TokenRecord] = []
        if self._move_pending:
            self._flush_move(out)
        return out

    def set_excluded_apps(
        self, apps: Collection[str], t: float | None = None
    ) -> list[TokenRecord]:
        """Replace the excluded-app list; takes effect immediately.

        Returns the marker records the change causes (``marker:paused`` when the
        focused app became excluded; ``marker:resumed`` plus its app token when
        it stopped being excluded), stamped ``t`` (default: the last event's
        time). Store them like any other records.
        """
        self._excluded = frozenset(a.lower() for a in apps)
        t = t if t is not None else (self._last_t or 0.0)
        now_excluded = self._app is not None and self._app.lower() in self._excluded
        if now_excluded == self._in_excluded:
            return []
        if now_excluded:
            return self._enter_silence(t, excluded=True)
        self._in_excluded = False
        return [] if self._user_paused else self._leave_silence(t)

    def pause(self, t: float) -> list[TokenRecord]:
        """Pause recording (the employee asked); returns the ``marker:paused`` record,
        or nothing if already silent."""
        if self._user_paused:
            return []
        return self._enter_silence(t, excluded=False)

    def resume(self, t: float) -> list[TokenRecord]:
        """End a pause; returns ``marker:resumed`` and the current app token, or
        nothing while an excluded app still has focus."""
        if not self._user_paused:
            return []
        self._user_paused = False
        # Events were not fed while paused: what we knew about held keys is stale.
        self._mods_down.clear()
        self._mod_mask = 0
        return [] if self._in_excluded else self._leave_silence(t)

    # -- silence (pause / excluded app) ---------------------------------------

    def _enter_silence(self, t: float, *, excluded: bool) -> list[TokenRecord]:
        out: list[TokenRecord] = []
        if self.recording:
            if self._move_pending:
                self._flush_move(out)
            out.append(TokenRecord(t, _PAUSED))
        if excluded:
            self._in_excluded = True
        else:
            self._user_paused = True
        self._forget_activity()
        return out

    def _leave_silence(self, t: float, title: str | None = None) -> list[TokenRecord]:
        self._forget_activity()
        self._last_t = t
        out = [TokenRecord(t, _RESUMED)]
        if self._app is not None:
            out.append(self._app_record(t, self._app, title))
        return out

    def _forget_activity(self) -> None:
        # Nothing seen while silent may leak into later tokens: no dwell for a
        # key pressed in an excluded app, no flight across the gap.
        self._keys_down.clear()
        self._mods_emitted.clear()
        self._last_press = None
        self._move_pending = False
        self._px = None

    # -- helpers ----------------------------------------------------------------

    def _prelude(self, t: float, out: list[TokenRecord]) -> None:
        """Flush a pending move, then mark an idle gap, before an event's own tokens."""
        if self._move_pending:
            self._flush_move(out)
        last = self._last_t
        if last is not None and t - last >= IDLE_GAP_S:
            out.append(TokenRecord(t, _IDLE))
        self._last_t = t

    def _flush_move(self, out: list[TokenRecord]) -> None:
        self._move_pending = False
        dx = self._px - self._ax  # type: ignore[operator]
        dy = self._py - self._ay
        d2 = dx * dx + dy * dy
        if d2 < _MOVE_MIN2:
            return  # jitter
        sector = round(math.atan2(-dy, dx) / _SECTOR) % 8
        bucket = bisect_right(MOVE_DIST_EDGES_PX, math.sqrt(d2))
        out.append(TokenRecord(self._pt, _MOVE_IDS[sector][bucket]))

    def _app_record(self, t: float, app: str, title: str | None) -> TokenRecord:
        text = title if self._raw_text else None
        return TokenRecord(t, _APP_IDS[app_category(app)], app, text)

    # -- handlers ---------------------------------------------------------------

    def _on_key(self, ev: KeyEvent) -> list[TokenRecord]:
        key: object = ev.vk if ev.vk is not None else (ev.name or ev.char or "?").lower()
        cls, is_mod = _classify_cached(ev.name, ev.char)
        silent = self._user_paused or self._in_excluded
        t = ev.t
        if is_mod:
            if ev.pressed:
                if key in self._mods_down:
                    return []  # auto-repeat of a held modifier
                self._mods_down[key] = cls
                self._mod_mask |= _MOD_BITS[cls]
                if silent:
                    return []
                out: list[TokenRecord] = []
                self._prelude(t, out)
                out.append(TokenRecord(t, _MOD_PRESS_IDS[cls]))
                self._mods_emitted.add(key)
                return out
            mod = self._mods_down.pop(key, None)
            if mod is None:
                return []
            mask = 0
            for m in self._mods_down.values():
                mask |= _MOD_BITS[m]
            self._mod_mask = mask
            if key not in self._mods_emitted:
                return []
            self._mods_emitted.discard(key)
            if silent:
                return []
            out = []
            self._prelude(t, out)
            out.append(TokenRecord(t, _MOD_UP_IDS[mod]))
            return out

        if silent:
            return []
        if not ev.pressed:
            pressed_at = self._keys_down.pop(key, None)
            if pressed_at is None:
                return []  # press not seen (before start, or while silent)
            out = []
            self._prelude(t, out)
            i = bisect_right(_DWELL_EDGES_S, t - pressed_at)
            out.append(TokenRecord(t, _DWELL_IDS[i]))
            return out

        out = []
        self._prelude(t, out)
        last = self._last_press
        i = len(_FLIGHT_EDGES_S) if last is None else bisect_right(_FLIGHT_EDGES_S, t - last)
        out.append(TokenRecord(t, _FLIGHT_IDS[i]))
        self._last_press = t
        mask = self._mod_mask
        if mask & (_CTRL | _ALT | _SUPER):
            tok = _SHORTCUT_IDS[(mask, _SHORTCUT_CLASS[cls])]
        elif mask & _SHIFT and (_SHIFT, _SHORTCUT_CLASS[cls]) in _SHORTCUT_IDS:
            tok = _SHORTCUT_IDS[(_SHIFT, _SHORTCUT_CLASS[cls])]
        elif cls == "letter" and mask & _SHIFT:
            tok = _KEY_IDS["upper"]  # backends that report the unshifted character
        else:
            tok = _KEY_IDS[cls]
        out.append(TokenRecord(t, tok, None, ev.char if self._raw_text else None))
        if key not in self._keys_down:  # auto-repeat keeps the first press time
            if len(self._keys_down) >= 64:
                self._drop_stale_keys(t)
            self._keys_down[key] = t
        return out

    def _drop_stale_keys(self, t: float) -> None:
        # A release we never saw (lost by the backend) must not grow this forever.
        for k in [k for k, pt in self._keys_down.items() if t - pt > 10.0]:
            del self._keys_down[k]

    def _on_move(self, ev: MouseMove) -> list[TokenRecord]:
        if self._user_paused or self._in_excluded:
            return []
        t = ev.t
        out: list[TokenRecord] = []
        if self._move_pending and t - self._pt > MOVE_GAP_S:
            self._flush_move(out)
        last = self._last_t
        if last is not None and t - last >= IDLE_GAP_S:
            out.append(TokenRecord(t, _IDLE))
        self._last_t = t
        if not self._move_pending:
            # The segment starts where the pointer was last seen.
            if self._px is None:
                self._ax, self._ay = ev.x, ev.y
            else:
                self._ax, self._ay = self._px, self._py
            self._at = t
            self._move_pending = True
        self._px, self._py, self._pt = ev.x, ev.y, t
        if t - self._at >= MOVE_MAX_SPAN_S:
            self._flush_move(out)
        return out

    def _on_click(self, ev: Click) -> list[TokenRecord]:
        if self._user_paused or self._in_excluded:
            return []
        out: list[TokenRecord] = []
        self._prelude(ev.t, out)
        self._px, self._py, self._pt = ev.x, ev.y, ev.t
        out.append(TokenRecord(ev.t, _CLICK_IDS[(_button_class(ev.button), ev.pressed)]))
        return out

    def _on_scroll(self, ev: Scroll) -> list[TokenRecord]:
        if self._user_paused or self._in_excluded or (ev.dx == 0 and ev.dy == 0):
            return []
        out: list[TokenRecord] = []
        t = ev.t
        self._prelude(t, out)
        if ev.dy:
            out.append(TokenRecord(t, _SCROLL_UP if ev.dy > 0 else _SCROLL_DOWN))
        if ev.dx:
            out.append(TokenRecord(t, _SCROLL_RIGHT if ev.dx > 0 else _SCROLL_LEFT))
        return out

    def _on_focus(self, ev: AppFocus) -> list[TokenRecord]:
        previous = self._app
        self._app = ev.app
        t = ev.t
        if ev.app.lower() in self._excluded:
            if self._in_excluded:
                return []
            return self._enter_silence(t, excluded=True)
        if self._in_excluded:
            self._in_excluded = False
            return [] if self._user_paused else self._leave_silence(t, ev.title)
        if self._user_paused or ev.app == previous:
            return []  # a title change within the same app is not a switch
        out: list[TokenRecord] = []
        self._prelude(t, out)
        out.append(self._app_record(t, ev.app, ev.title))
        return out
