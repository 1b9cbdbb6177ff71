"""Simulated employees: deterministic raw-event streams with distinct styles.

A stand-in for a real keyboard and mouse, for demos, tests and benchmarks.
Each employee is drawn from a seed (:class:`EmployeeStyle`): typing speed and
rhythm, error and correction habits, keyboard-shortcut versus mouse habits,
pointer speed, click and scroll habits, which applications they use and how
often they switch. Everything comes from seeded :class:`random.Random`
instances (no global state), so a seed always yields the same events.

The streams are meant to be learnable by a next-event model: typing comes in
bursts of words with realistic lengths and flight/dwell rhythms; a typo is
followed by backspaces and a retype; ``Ctrl+S`` follows edits for employees
who habitually save; selections (``Shift+arrows``) precede copy or formatting;
each application has its own activities (code lines and saves in the editor,
scroll-and-click reading and address-bar searches in the browser, short
messages ended by Return in chat, commands and history recall in the
terminal, sentences with capitals and full stops in the office suite).

Events use X11 keycodes as ``vk`` and pynput key names as ``name``, like the
pynput backend.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import date, timedelta
from operator import attrgetter
from typing import Protocol

from keystay.common.events import AppFocus, Click, KeyEvent, MouseMove, RawEvent, Scroll
from keystay.common.tokens import Tokenizer, TokenRecord, app_category


class BlockSink(Protocol):
    """Where :func:`fill_store` writes: the device's encrypted ``EventStore`` fits.

    A protocol rather than the class itself, so this package does not import
    device code (the server runs the generator too).
    """

    def append(self, block: str, records: list[TokenRecord]) -> object:
        """Append token records to the named daily block."""
        ...

__all__ = [
    "APPS",
    "ROLES",
    "WORDS",
    "EmployeeStyle",
    "Role",
    "SimulatedEmployee",
    "SimulatedSource",
    "day_volumes",
    "fill_store",
    "roster",
]

APPS: tuple[str, ...] = ("firefox", "code", "slack", "libreoffice", "gnome-terminal",
                         "thunderbird")

# Whitespace-separated word lists, kept as text so they read like prose.
_WORDS_TEXT = """
the be to of and a in that have it for not on with he as you do at this but his by from they
we say her she or an will my one all would there their what so up out if about who get which
go me when make can like time no just him know take people into year your good some could them
see other than then now look only come its over think also back after use two how our work
first well way even new want because any these give day most us is are was were been has had
meeting report project team review update plan budget client deadline schedule draft email
please thanks today tomorrow morning call notes data issue fix test build release version
question answer check send share agree change feature design document sales order invoice
customer support ticket status week month quarter target number price offer contract
"""
_CODE_WORDS_TEXT = """
def return self import from for in if else elif while try except raise with as class
none true false print len range list dict set str int float value data result item key index
count name path config args kwargs items append update get load save parse read write open
close start stop run test check error user node batch size total sum min max sort filter
"""


def _word_list(text: str) -> tuple[str, ...]:
    return tuple(text.split())


WORDS: tuple[str, ...] = _word_list(_WORDS_TEXT)
"""Common English and office words typed by simulated employees."""

CODE_WORDS: tuple[str, ...] = _word_list(_CODE_WORDS_TEXT)

COMMANDS: tuple[str, ...] = (
    "ls", "ls -la", "cd src", "cd ..", "git status", "git diff", "git log", "git pull",
    "make test", "make", "python -m pytest", "grep -r todo .", "cat notes.txt", "htop",
    "docker ps", "ssh build", "vim notes.txt", "pip list", "du -sh", "tail -f app.log",
)

SCREEN_W, SCREEN_H = 1920, 1080

# X11 keycodes of a US layout: character -> (keycode, shift needed).
_KEYMAP: dict[str, tuple[int, bool]] = {}
for _row, _first in (("qwertyuiop", 24), ("asdfghjkl", 38), ("zxcvbnm", 52)):
    for _i, _c in enumerate(_row):
        _KEYMAP[_c] = (_first + _i, False)
        _KEYMAP[_c.upper()] = (_first + _i, True)
for _i, (_plain, _shifted) in enumerate(zip("1234567890", "!@#$%^&*()", strict=True)):
    _KEYMAP[_plain] = (10 + _i, False)
    _KEYMAP[_shifted] = (10 + _i, True)
for _plain, _shifted, _vk in (("-", "_", 20), ("=", "+", 21), ("[", "{", 34), ("]", "}", 35),
                              (";", ":", 47), ("'", '"', 48), ("`", "~", 49), ("\\", "|", 51),
                              (",", "<", 59), (".", ">", 60), ("/", "?", 61)):
    _KEYMAP[_plain] = (_vk, False)
    _KEYMAP[_shifted] = (_vk, True)
_KEYMAP[" "] = (65, False)

_NAMED_VK: dict[str, int] = {
    "space": 65, "enter": 36, "backspace": 22, "tab": 23, "esc": 9, "delete": 119,
    "shift": 50, "ctrl": 37, "alt": 64, "cmd": 133,
    "left": 113, "right": 114, "up": 111, "down": 116, "home": 110, "end": 115,
    "page_up": 112, "page_down": 117, "f2": 68, "f5": 71, "f11": 95,
}
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS: dict[str, str] = {}
for _row in _ROWS:
    for _i, _c in enumerate(_row):
        _NEIGHBOURS[_c] = _row[max(0, _i - 1):_i] + _row[_i + 1:_i + 2]


@dataclass(frozen=True, slots=True)
class Role:
    """What a kind of job does to how someone works, as ranges a style is drawn from.

    A population of one company mixes roles (:data:`ROLES`, :func:`roster`):
    developers live in an editor and a terminal and use shortcuts, designers
    in mouse-heavy tools, support staff switch between mail, chat and a
    browser all day, managers type little and have days of meetings. The
    volume of a day varies too (:func:`day_volumes`): a role's median day,
    a log-normal spread around it, and the chance of a nearly empty day
    (meetings, leave), so that some days are too thin to train on at all.

    Attributes
    ----------
    name : str
    share : float
        Its share of a company's employees (the shares of :data:`ROLES` sum to 1).
    apps, app_weights : tuple
        The applications the role uses and how much time each gets.
    wpm, shortcut_rate, switch_rate : tuple of float
        ``(low, high)`` ranges of the :class:`EmployeeStyle` fields of those names.
    events_per_day : int
        Token records on a median working day.
    day_spread : float
        Log-normal sigma of a day's volume around the median.
    quiet_day : float
        Chance that a day has almost no input (a tenth of the median or less).
    """

    name: str
    share: float
    apps: tuple[str, ...]
    app_weights: tuple[float, ...]
    wpm: tuple[float, float]
    shortcut_rate: tuple[float, float]
    switch_rate: tuple[float, float]
    events_per_day: int
    day_spread: float
    quiet_day: float


#: The roles of a simulated company, by share of employees.
ROLES: tuple[Role, ...] = (
    Role("developer", 0.4, ("code", "gnome-terminal", "firefox", "slack"), (4.0, 2.0, 1.5, 0.8),
         wpm=(55.0, 95.0), shortcut_rate=(0.6, 0.95), switch_rate=(0.5, 2.0),
         events_per_day=4000, day_spread=0.35, quiet_day=0.05),
    Role("designer", 0.15, ("gimp", "inkscape", "firefox", "slack"), (3.0, 2.0, 1.5, 0.7),
         wpm=(30.0, 60.0), shortcut_rate=(0.3, 0.7), switch_rate=(0.3, 1.5),
         events_per_day=3000, day_spread=0.5, quiet_day=0.08),
    Role("support", 0.3, ("thunderbird", "slack", "firefox", "libreoffice"), (3.0, 3.0, 2.0, 0.5),
         wpm=(45.0, 80.0), shortcut_rate=(0.1, 0.5), switch_rate=(2.5, 5.0),
         events_per_day=6000, day_spread=0.25, quiet_day=0.03),
    Role("manager", 0.15, ("thunderbird", "slack", "libreoffice", "firefox"), (3.0, 2.0, 2.0, 1.0),
         wpm=(28.0, 65.0), shortcut_rate=(0.05, 0.4), switch_rate=(1.0, 3.0),
         events_per_day=1800, day_spread=0.8, quiet_day=0.25),
)
_ROLE_BY_NAME = {r.name: r for r in ROLES}


def role_named(name: str) -> Role:
    """The role of :data:`ROLES` called ``name``."""
    try:
        return _ROLE_BY_NAME[name]
    except KeyError:
        raise ValueError(f"no role {name!r}; roles: {', '.join(_ROLE_BY_NAME)}") from None


def roster(employees: int, seed: int) -> list[tuple[int, Role]]:
    """``employees`` (employee seed, role) pairs of one company, reproducible from ``seed``.

    Employee seeds are ``seed * 1_000_000 + i + 1`` (below the server's
    held-out seeds, :data:`keystay.server.heldout.FIRST_SEED`); roles are
    drawn by :attr:`Role.share`.

    >>> [(s, r.name) for s, r in roster(3, seed=0)]
    [(1, 'support'), (2, 'support'), (3, 'developer')]
    """
    rng = random.Random(f"roster:{seed}")
    roles = rng.choices(ROLES, weights=[r.share for r in ROLES], k=employees)
    return [(seed * 1_000_000 + i + 1, role) for i, role in enumerate(roles)]


def day_volumes(employee_seed: int, role: Role, days: int) -> tuple[int, ...]:
    """Token records on each of ``days`` days of one employee (see :class:`Role`)."""
    rng = random.Random(f"days:{employee_seed}")
    volumes = []
    for _ in range(days):
        if rng.random() < role.quiet_day:
            volumes.append(int(role.events_per_day * 0.1 * rng.random()))
        else:
            volumes.append(int(role.events_per_day * rng.lognormvariate(0.0, role.day_spread)))
    return tuple(volumes)


@dataclass(frozen=True, slots=True)
class EmployeeStyle:
    """How one simulated employee works; drawn from a seed by :meth:`draw`.

    Attributes
    ----------
    wpm : float
        Typing speed, words (5 characters) per minute.
    flight_sigma : float
        Spread (log-normal sigma) of inter-key intervals: rhythm regularity.
    dwell_s : float
        Median key hold time, seconds.
    error_rate : float
        Chance per letter of hitting a neighbouring key.
    notice_lag : int
        Most characters typed after a typo before noticing it.
    word_pause : float
        Chance of a thinking pause at a word boundary.
    early_shift_release : float
        Chance Shift goes up before the shifted key does.
    shortcut_rate : float
        Chance of using a keyboard shortcut where the mouse would also do.
    save_habit : float
        Chance of ``Ctrl+S`` after an edit.
    mouse_speed : float
        Typical pointer speed, pixels per second.
    click_dwell_s : float
        Median mouse-button hold time, seconds.
    double_click : float
        Chance a click is a double click.
    scroll_ticks : int
        Typical wheel ticks per scroll burst.
    scroll_gap_s : float
        Time between wheel ticks in a burst, seconds.
    switch_rate : float
        Application switches per minute of activity.
    alt_tab : float
        Chance of switching apps with Alt+Tab rather than the taskbar.
    capitals : float
        Chance a chat message starts with a capital letter.
    apps : tuple of str
        The applications this employee uses.
    app_weights : tuple of float
        How much time goes to each of ``apps``.
    """

    wpm: float
    flight_sigma: float
    dwell_s: float
    error_rate: float
    notice_lag: int
    word_pause: float
    early_shift_release: float
    shortcut_rate: float
    save_habit: float
    mouse_speed: float
    click_dwell_s: float
    double_click: float
    scroll_ticks: int
    scroll_gap_s: float
    switch_rate: float
    alt_tab: float
    capitals: float
    apps: tuple[str, ...]
    app_weights: tuple[float, ...]

    @classmethod
    def draw(cls, seed: int, role: Role | None = None) -> EmployeeStyle:
        """Draw a style from ``seed`` (same seed, same style).

        With a ``role``, its apps and its ranges of typing speed, shortcut
        habit and app switching replace the general ones, drawn from a
        second generator so that every other habit is the one the seed
        alone gives.
        """
        style = cls._draw(seed)
        if role is None:
            return style
        rng = random.Random(f"role:{role.name}:{seed}")
        return replace(
            style,
            apps=role.apps,
            app_weights=tuple(round(w * rng.uniform(0.7, 1.3), 3) for w in role.app_weights),
            wpm=rng.uniform(*role.wpm),
            shortcut_rate=rng.uniform(*role.shortcut_rate),
            switch_rate=rng.uniform(*role.switch_rate),
        )

    @classmethod
    def _draw(cls, seed: int) -> EmployeeStyle:
        rng = random.Random(seed)
        n_apps = rng.randint(3, 5)
        apps = tuple(rng.sample(APPS, n_apps))
        weights = tuple(round(rng.uniform(0.5, 4.0), 3) for _ in apps)
        return cls(
            wpm=rng.uniform(28.0, 95.0),
            flight_sigma=rng.uniform(0.22, 0.5),
            dwell_s=rng.uniform(0.065, 0.13),
            error_rate=rng.uniform(0.004, 0.07),
            notice_lag=rng.randint(0, 3),
            word_pause=rng.uniform(0.02, 0.2),
            early_shift_release=rng.uniform(0.0, 0.6),
            shortcut_rate=rng.uniform(0.05, 0.95),
            save_habit=rng.uniform(0.05, 0.85),
            mouse_speed=rng.uniform(500.0, 2500.0),
            click_dwell_s=rng.uniform(0.06, 0.15),
            double_click=rng.uniform(0.0, 0.3),
            scroll_ticks=rng.randint(2, 10),
            scroll_gap_s=rng.uniform(0.02, 0.1),
            switch_rate=rng.uniform(0.3, 4.0),
            alt_tab=rng.uniform(0.0, 1.0),
            capitals=rng.uniform(0.0, 1.0),
            apps=apps,
            app_weights=weights,
        )


class _Session:
    """One run of work: a time cursor, pointer position, focused app, event buffer.

    Activities append events to ``buf`` (not necessarily in time order: a key
    may be released after the next one is pressed) and advance ``t``; the
    generator sorts the buffer by time after each activity.
    """

    def __init__(self, style: EmployeeStyle, rng: random.Random, start: float,
                 breaks: bool) -> None:
        self.s = style
        self.rng = rng
        self.t = start
        self.breaks = breaks
        self.x = float(rng.randint(200, SCREEN_W - 200))
        self.y = float(rng.randint(200, SCREEN_H - 200))
        self.app = style.apps[0]
        self.buf: list[RawEvent] = []
        # Median flight: 60 s / (wpm * 5 characters).
        self._flight_mu = math.log(12.0 / style.wpm)
        self._dwell_mu = math.log(style.dwell_s)

    # -- keyboard -----------------------------------------------------------------

    def _flight(self, factor: float = 1.0) -> float:
        return factor * self.rng.lognormvariate(self._flight_mu, self.s.flight_sigma)

    def _dwell(self) -> float:
        return max(0.02, self.rng.lognormvariate(self._dwell_mu, 0.25))

    def tap(self, name: str, factor: float = 1.0, char: str | None = None) -> None:
        """Press and release a named key after a flight interval."""
        self.t += self._flight(factor)
        vk = _NAMED_VK[name]
        d = self._dwell()
        self.buf.append(KeyEvent(self.t, True, vk, char, name))
        self.buf.append(KeyEvent(self.t + d, False, vk, char, name))

    def char(self, ch: str, factor: float = 1.0) -> None:
        """Type one character, with Shift around it when the layout needs it."""
        if ch == " ":
            self.tap("space", factor, " ")
            return
        if ch == "\n":
            self.tap("enter", factor)
            return
        if ch == "\t":
            self.tap("tab", factor)
            return
        vk, shifted = _KEYMAP[ch]
        if not ch.isalnum():
            factor *= 1.4  # symbols are slower to find
        self.t += self._flight(factor)
        d = self._dwell()
        if not shifted:
            self.buf.append(KeyEvent(self.t, True, vk, ch))
            self.buf.append(KeyEvent(self.t + d, False, vk, ch))
            return
        shift_down = self.t
        self.t += self.rng.uniform(0.04, 0.11)
        self.buf.append(KeyEvent(shift_down, True, 50, None, "shift"))
        self.buf.append(KeyEvent(self.t, True, vk, ch))
        if self.rng.random() < self.s.early_shift_release:
            # Shift goes up first: the release reports the unshifted character.
            up = self.t + d * 0.6
            self.buf.append(KeyEvent(up, False, 50, None, "shift"))
            self.buf.append(KeyEvent(self.t + d, False, vk, ch.lower()))
        else:
            self.buf.append(KeyEvent(self.t + d, False, vk, ch))
            self.buf.append(KeyEvent(self.t + d + self.rng.uniform(0.01, 0.06), False, 50,
                                     None, "shift"))

    def type_text(self, text: str) -> None:
        """Type ``text`` with this employee's rhythm, typos and corrections."""
        rng = self.rng
        i = 0
        n = len(text)
        while i < n:
            ch = text[i]
            if ch == " " and rng.random() < self.s.word_pause:
                self.t += rng.uniform(0.3, 1.5)
            if ch.isalpha() and ch.lower() in _NEIGHBOURS and rng.random() < self.s.error_rate:
                # A typo, a few more characters, the pause of noticing, then
                # one backspace per wrong character and a retype.
                k = min(rng.randint(0, self.s.notice_lag), n - i - 1)
                wrong = rng.choice(_NEIGHBOURS[ch.lower()])
                self.char(wrong.upper() if ch.isupper() else wrong)
                for j in range(i + 1, i + 1 + k):
                    self.char(text[j])
                self.t += rng.uniform(0.2, 0.6)
                for _ in range(k + 1):
                    self.tap("backspace", 0.8)
                for j in range(i, i + 1 + k):
                    self.char(text[j])
                i += k + 1
                continue
            self.char(ch, 1.25 if ch == " " else 1.0)
            i += 1

    def combo(self, mods: tuple[str, ...], key: str) -> None:
        """A keyboard shortcut: modifiers down, key tapped, modifiers up."""
        rng = self.rng
        self.t += self._flight(1.5)
        for m in mods:
            self.buf.append(KeyEvent(self.t, True, _NAMED_VK[m], None, m))
            self.t += rng.uniform(0.05, 0.15)
        if key in _NAMED_VK:
            vk, name, ch = _NAMED_VK[key], key, None
        else:
            vk, name, ch = _KEYMAP[key][0], None, key
        d = self._dwell()
        self.buf.append(KeyEvent(self.t, True, vk, ch, name))
        self.buf.append(KeyEvent(self.t + d, False, vk, ch, name))
        self.t += d
        for m in reversed(mods):
            self.t += rng.uniform(0.01, 0.08)
            self.buf.append(KeyEvent(self.t, False, _NAMED_VK[m], None, m))

    def select(self, direction: str, count: int) -> None:
        """Shift held while tapping an arrow ``count`` times (a selection)."""
        self.t += self._flight(1.5)
        self.buf.append(KeyEvent(self.t, True, 50, None, "shift"))
        self.t += self.rng.uniform(0.05, 0.12)
        for _ in range(count):
            self.tap(direction, 0.7)
        self.t += self.rng.uniform(0.05, 0.2)
        self.buf.append(KeyEvent(self.t, False, 50, None, "shift"))

    # -- mouse ------------------------------------------------------------------

    def move_to(self, x: float, y: float) -> None:
        """Move the pointer along a slightly curved minimum-jerk path, ~60 Hz samples."""
        rng = self.rng
        x = min(max(x, 0.0), SCREEN_W - 1.0)
        y = min(max(y, 0.0), SCREEN_H - 1.0)
        x0, y0 = self.x, self.y
        dist = math.hypot(x - x0, y - y0)
        if dist < 2:
            return
        self.t += rng.uniform(0.05, 0.25)  # reaction time
        duration = 0.08 + dist / self.s.mouse_speed * rng.uniform(0.8, 1.25)
        steps = max(2, int(duration * 60))
        bend = rng.gauss(0.0, 0.08) * dist
        nx, ny = -(y - y0) / dist, (x - x0) / dist  # unit normal of the straight path
        start = self.t
        for k in range(1, steps + 1):
            tau = k / steps
            s = tau * tau * tau * (10 - 15 * tau + 6 * tau * tau)
            off = bend * math.sin(math.pi * tau)
            px = x0 + (x - x0) * s + nx * off
            py = y0 + (y - y0) * s + ny * off
            self.buf.append(MouseMove(start + duration * tau, round(px), round(py)))
        self.t = start + duration
        self.x, self.y = x, y

    def click(self, button: str = "left") -> None:
        rng = self.rng
        clicks = 2 if button == "left" and rng.random() < self.s.double_click else 1
        for _ in range(clicks):
            self.t += rng.uniform(0.05, 0.15)
            d = max(0.03, rng.gauss(self.s.click_dwell_s, 0.02))
            xi, yi = round(self.x), round(self.y)
            self.buf.append(Click(self.t, xi, yi, button, True))
            self.buf.append(Click(self.t + d, xi, yi, button, False))
            self.t += d

    def click_at(self, x: float, y: float, button: str = "left") -> None:
        self.move_to(x, y)
        self.click(button)

    def scroll(self, down: bool = True, ticks: int | None = None) -> None:
        rng = self.rng
        ticks = ticks if ticks is not None else max(1, int(rng.gauss(self.s.scroll_ticks, 2)))
        xi, yi = round(self.x), round(self.y)
        for _ in range(ticks):
            self.t += self.s.scroll_gap_s * rng.uniform(0.6, 1.5)
            self.buf.append(Scroll(self.t, xi, yi, 0, -1 if down else 1))

    def wait(self, lo: float, hi: float) -> None:
        self.t += self.rng.uniform(lo, hi)

    def anywhere(self, x0: float = 100, x1: float = SCREEN_W - 100, y0: float = 100,
                 y1: float = SCREEN_H - 100) -> tuple[float, float]:
        """A target in the given area: often near the pointer (the next line, the
        next link), otherwise anywhere in it."""
        rng = self.rng
        if rng.random() < 0.5:
            x = min(max(self.x + rng.gauss(0.0, 120.0), x0), x1)
            y = min(max(self.y + rng.gauss(0.0, 90.0), y0), y1)
            return x, y
        return rng.uniform(x0, x1), rng.uniform(y0, y1)

    def switch_app(self) -> None:
        """Focus another of this employee's apps, by Alt+Tab or by the taskbar."""
        rng = self.rng
        others = [(a, w) for a, w in zip(self.s.apps, self.s.app_weights, strict=True)
                  if a != self.app]
        if not others:
            return
        target = rng.choices([a for a, _ in others], [w for _, w in others])[0]
        if rng.random() < self.s.alt_tab:
            self.t += self._flight(1.5)
            self.buf.append(KeyEvent(self.t, True, _NAMED_VK["alt"], None, "alt"))
            self.t += rng.uniform(0.05, 0.15)
            for _ in range(1 if rng.random() < 0.7 else rng.randint(2, 3)):
                self.tap("tab", 1.5)
            self.t += rng.uniform(0.1, 0.3)
            self.buf.append(KeyEvent(self.t, False, _NAMED_VK["alt"], None, "alt"))
        else:
            # Taskbar slot: the common apps in APPS order, a role's own apps after them.
            slot = (APPS.index(target) if target in APPS
                    else len(APPS) + self.s.apps.index(target))
            self.click_at(60 + 80 * slot, SCREEN_H - 20)
        self.t += rng.uniform(0.05, 0.2)
        self.buf.append(AppFocus(self.t, target))
        self.app = target

    # -- helpers ----------------------------------------------------------------

    def words(self, lo: int, hi: int, pool: tuple[str, ...] = WORDS) -> list[str]:
        return [self.rng.choice(pool) for _ in range(self.rng.randint(lo, hi))]

    def sentence(self) -> str:
        words = self.words(4, 14)
        if len(words) > 6 and self.rng.random() < 0.4:
            words[self.rng.randint(2, len(words) - 3)] += ","
        text = " ".join(words)
        return text[0].upper() + text[1:] + self.rng.choice(".....?!")

    def shortcut_or_click(self, mods: tuple[str, ...], key: str, x: float, y: float) -> None:
        """Do something with a shortcut or with the mouse, per this employee's habit."""
        if self.rng.random() < self.s.shortcut_rate:
            self.combo(mods, key)
        else:
            self.click_at(x, y)

    def maybe_save(self) -> None:
        if self.rng.random() < self.s.save_habit:
            self.combo(("ctrl",), "s")


# -- activities, per application category -----------------------------------------


def _editor(s: _Session) -> None:
    rng = s.rng
    r = rng.random()
    if r < 0.5:
        for _ in range(rng.randint(1, 5)):
            a, b, c = (rng.choice(CODE_WORDS) for _ in range(3))
            line = rng.choice((
                f"{a} = {b}({c})", f"def {a}_{b}({c}):", f"return {a}.{b}", f"if {a} in {b}:",
                f"for {a} in {b}:", f"print({a}[{c}])", f"{a}.{b}({c}, {a})", f"# {a} {b} {c}",
            ))
            if rng.random() < 0.3:
                s.tap("tab")
            s.type_text(line)
            s.tap("enter", 1.3)
            if rng.random() < 0.08:
                s.combo(("ctrl",), "z")
        s.maybe_save()
    elif r < 0.65:
        for _ in range(rng.randint(1, 4)):
            key = rng.choice(("up", "down", "down", "page_down", "end", "home"))
            for _ in range(rng.randint(1, 6)):
                s.tap(key, 0.6)
            s.wait(0.2, 1.0)
    elif r < 0.8:
        # Select, copy, go elsewhere, paste.
        s.select(rng.choice(("left", "right", "down")), rng.randint(2, 12))
        s.combo(("ctrl",), "c")
        s.shortcut_or_click(("ctrl",), "g", *s.anywhere(300, 1600, 150, 950))
        for _ in range(rng.randint(1, 5)):
            s.tap("down", 0.6)
        s.combo(("ctrl",), "v")
        s.maybe_save()
    elif r < 0.95:
        s.click_at(*s.anywhere(300, 1600, 150, 950))
        if rng.random() < 0.5:
            s.scroll(down=rng.random() < 0.7)
    else:
        s.shortcut_or_click(("ctrl", "shift"), "f", 30, 200)
        s.type_text(rng.choice(CODE_WORDS))
        s.tap("enter")


def _browser(s: _Session) -> None:
    rng = s.rng
    r = rng.random()
    if r < 0.45:
        # Read: scroll, pause, sometimes scroll back up.
        for _ in range(rng.randint(1, 5)):
            s.scroll(down=rng.random() < 0.85)
            s.wait(0.8, 5.0)
            if rng.random() < 0.3:
                s.move_to(*s.anywhere())
    elif r < 0.75:
        s.click_at(*s.anywhere(200, 1700, 180, 1000))
        s.wait(0.5, 2.5)
    elif r < 0.9:
        s.shortcut_or_click(("ctrl",), "l", rng.uniform(300, 1200), 60)
        s.type_text(" ".join(s.words(1, 4)))
        s.tap("enter", 1.2)
        s.wait(0.8, 3.0)
    else:
        choice = rng.random()
        if choice < 0.4:
            s.shortcut_or_click(("ctrl",), "t", rng.uniform(200, 1200), 20)
        elif choice < 0.7:
            s.shortcut_or_click(("ctrl",), "w", rng.uniform(200, 1200), 20)
        elif choice < 0.85:
            s.shortcut_or_click(("alt",), "left", 20, 60)
        else:
            s.combo(("ctrl",), "tab")


def _chat(s: _Session) -> None:
    rng = s.rng
    r = rng.random()
    if r < 0.55:
        words = s.words(1, 12)
        text = " ".join(words)
        if rng.random() < s.s.capitals:
            text = text[0].upper() + text[1:]
        text += rng.choice(("", "", "", "?", "!", " :)", "."))
        if rng.random() < 0.3:
            s.click_at(rng.uniform(400, 1700), rng.uniform(990, 1040))
        s.type_text(text)
        if rng.random() < 0.1:
            s.combo(("shift",), "enter")
            s.type_text(" ".join(s.words(1, 6)))
        s.tap("enter", 1.2)
        s.wait(0.5, 4.0)
    elif r < 0.8:
        s.scroll(down=rng.random() < 0.4, ticks=rng.randint(1, 6))
        s.wait(1.0, 4.0)
    elif r < 0.92:
        s.click_at(rng.uniform(20, 240), rng.uniform(120, 800))
        s.wait(0.5, 2.0)
    else:
        s.combo(("ctrl",), "k")
        s.type_text(rng.choice(WORDS)[:5])
        s.tap("enter")


def _office(s: _Session) -> None:
    rng = s.rng
    r = rng.random()
    if r < 0.6:
        for _ in range(rng.randint(1, 4)):
            s.type_text(s.sentence() + " ")
        if rng.random() < 0.5:
            s.tap("enter", 1.3)
        s.maybe_save()
    elif r < 0.8:
        s.select(rng.choice(("left", "right")), rng.randint(3, 15))
        s.shortcut_or_click(("ctrl",), rng.choice("bi"), rng.uniform(300, 700), 90)
        s.tap("end")
    else:
        s.scroll(down=rng.random() < 0.7)
        s.click_at(*s.anywhere(300, 1600, 150, 950))


def _terminal(s: _Session) -> None:
    rng = s.rng
    r = rng.random()
    if r < 0.6:
        cmd = rng.choice(COMMANDS)
        if " " in cmd and rng.random() < 0.4:
            # Tab completion part-way through the argument.
            head, tail = cmd.rsplit(" ", 1)
            s.type_text(head + " " + tail[: max(1, len(tail) // 2)])
            s.tap("tab")
        else:
            s.type_text(cmd)
        s.tap("enter", 1.2)
        s.wait(0.3, 3.0)
    elif r < 0.8:
        for _ in range(rng.randint(1, 3)):
            s.tap("up", 0.8)
        s.tap("enter")
        s.wait(0.3, 3.0)
    elif r < 0.9:
        s.combo(("ctrl",), "c")
    else:
        s.combo(("ctrl",), "l")


def _mail(s: _Session) -> None:
    rng = s.rng
    r = rng.random()
    if r < 0.5:
        s.click_at(rng.uniform(300, 900), rng.uniform(150, 600))
        s.wait(1.0, 6.0)
        if rng.random() < 0.5:
            s.scroll()
    elif r < 0.8:
        s.shortcut_or_click(("ctrl",), "r", 200, 80)
        for _ in range(rng.randint(1, 3)):
            s.type_text(s.sentence() + " ")
        s.combo(("ctrl",), "enter")
    else:
        s.tap(rng.choice(("down", "up")), 0.8)
        s.wait(0.5, 3.0)


_ACTIVITIES: dict[str, Callable[[_Session], None]] = {
    "editor": _editor, "browser": _browser, "chat": _chat, "office": _office,
    "terminal": _terminal, "mail": _mail,
}


class SimulatedEmployee:
    """A simulated employee with a seed-determined :class:`EmployeeStyle`.

    Parameters
    ----------
    seed : int
        Determines the style and, combined with a day or session seed, every event.
    role : Role or None
        The employee's job (see :class:`Role`); ``None``: any habits.
    """

    def __init__(self, seed: int, role: Role | None = None) -> None:
        self.seed = seed
        self.role = role
        self.style = EmployeeStyle.draw(seed, role)

    def events(self, *, session_seed: int | None = None, start: float = 0.0,
               breaks: bool = True) -> Iterator[RawEvent]:
        """Yield raw events forever, in time order, starting at time ``start``.

        Parameters
        ----------
        session_seed : int or None
            Seed of this run of work (default: the employee seed). Different
            days use different session seeds with the same style.
        start : float
            Time of the first event, seconds.
        breaks : bool
            Include coffee breaks (minutes without input); off for live demos.
        """
        rng = random.Random(self.seed if session_seed is None else session_seed)
        s = _Session(self.style, rng, start, breaks)
        style = self.style
        s.app = rng.choices(style.apps, style.app_weights)[0]
        yield AppFocus(s.t, s.app)
        by_time = attrgetter("t")
        while True:
            activity_start = s.t
            _ACTIVITIES.get(app_category(s.app), _browser)(s)
            # Switch apps at this employee's rate per minute of activity.
            minutes = (s.t - activity_start) / 60.0
            if rng.random() < 1.0 - math.exp(-style.switch_rate * max(minutes, 0.05)):
                s.switch_app()
            # Draw the same random numbers with or without breaks, so a live
            # source replays the same employee as the stored days.
            away, think = rng.random(), rng.random()
            if away < 0.004:
                pause = rng.uniform(90.0, 900.0)  # away from the desk
                if breaks:
                    s.t += pause
            elif think < 0.2:
                s.wait(0.5, 4.0)  # reading, thinking
            buf = s.buf
            buf.sort(key=by_time)
            s.buf = []
            # Keep time moving forward past the last release of this activity.
            if buf and buf[-1].t > s.t:
                s.t = buf[-1].t
            yield from buf

    def day_records(self, day: date, n_records: int,
                    tokenizer: Tokenizer | None = None) -> list[TokenRecord]:
        """Tokenize one working day until ``n_records`` token records exist.

        Times are seconds since 2000-01-01 (a monotonic-like clock continuing
        across days), starting between 8:00 and 10:00 on ``day``.
        """
        tok = tokenizer if tokenizer is not None else Tokenizer()
        session_seed = self.seed * 1_000_003 + day.toordinal()
        rng = random.Random(session_seed)
        start = (day.toordinal() - _EPOCH) * 86400.0 + rng.uniform(8 * 3600, 10 * 3600)
        out: list[TokenRecord] = []
        # Guard against a tokenizer that emits nothing (every app excluded).
        budget = 200 * n_records + 10_000
        for event in self.events(session_seed=session_seed, start=start):
            out.extend(tok.feed(event))
            budget -= 1
            if len(out) >= n_records or budget <= 0:
                break
        out.extend(tok.flush())
        return out[:n_records]


_EPOCH = date(2000, 1, 1).toordinal()


def fill_store(store: BlockSink, *, seed: int, days: int, events_per_day: int, end_day: date,
               tokenizer: Tokenizer | None = None, batch_size: int = 1000,
               role: Role | None = None) -> int:
    """Write ``days`` daily blocks of one simulated employee into ``store``.

    Parameters
    ----------
    store : BlockSink
        Destination (the device's ``EventStore``).
    seed : int
        The employee.
    days : int
        Number of consecutive daily blocks, ending with ``end_day``.
    events_per_day : int
        Token records per block (the store's "events").
    end_day : date
        The last block's date.
    tokenizer : Tokenizer or None
        Shared across days if given (e.g. one with excluded apps); a fresh
        default tokenizer per day otherwise.
    batch_size : int
        Records per encrypted batch.
    role : Role or None
        The employee's job (see :class:`Role`).

    Returns
    -------
    int
        Token records written (``days * events_per_day`` unless a tokenizer
        suppressed most of the stream).
    """
    employee = SimulatedEmployee(seed, role)
    total = 0
    for i in range(days):
        day = end_day - timedelta(days=days - 1 - i)
        records = employee.day_records(day, events_per_day, tokenizer)
        block = day.isoformat()
        for lo in range(0, len(records), batch_size):
            store.append(block, records[lo:lo + batch_size])
        total += len(records)
    return total


class SimulatedSource:
    """A simulated employee emitting events in real time, for a daemon without input devices.

    Event times are rewritten to :func:`time.monotonic` (as a real backend
    would report them); gaps longer than ``max_gap_s`` (simulated time) are
    shortened so a demo never sits idle.

    Parameters
    ----------
    seed : int
        The employee.
    speed : float
        Playback speed (2.0 = twice real time).
    max_gap_s : float
        Longest pause between two events, in simulated seconds.
    """

    name = "simulated"

    def __init__(self, seed: int, *, speed: float = 1.0, max_gap_s: float = 3.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.employee = SimulatedEmployee(seed)
        self.speed = speed
        self.max_gap_s = max_gap_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.emitted = 0

    def run(self, callback: Callable[[RawEvent], None], stop: threading.Event) -> int:
        """Call ``callback`` with each event at its time until ``stop`` is set.

        Returns the number of events emitted.
        """
        clock = time.monotonic
        origin = clock()
        sim_prev: float | None = None
        sim_elapsed = 0.0  # simulated time since the start, gaps shortened
        count = 0
        for event in self.employee.events(breaks=False):
            if sim_prev is not None:
                sim_elapsed += min(event.t - sim_prev, self.max_gap_s)
            sim_prev = event.t
            due = origin + sim_elapsed / self.speed
            delay = due - clock()
            if delay > 0.001 and stop.wait(delay):
                break
            if stop.is_set():
                break
            callback(replace(event, t=due))
            count += 1
            self.emitted = count
        return count

    def start(self, callback: Callable[[RawEvent], None]) -> None:
        """Run in a background thread until :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("this SimulatedSource is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(callback, self._stop),
                                        name="keystay-simulated-source", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the background thread and wait for it (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
