"""Raw input events, as a recorder backend sees them.

These objects live only in memory, between an OS callback and the tokenizer
(:mod:`keystay.common.tokens`). They are never written anywhere: the capture
boundary turns them into tokens before anything touches the disk.

Timestamps ``t`` are :func:`time.monotonic` seconds, so intervals (dwell,
flight) survive wall-clock changes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """A key went down (``pressed``) or up.

    ``vk`` is the X keycode / virtual key when the backend knows it; it is what
    pairs a press with its release, because the character can differ between
    the two (press ``H`` with Shift held, release ``h`` after Shift went up).
    ``char`` is the printable character, if any; ``name`` names a special key
    (``"enter"``, ``"backspace"``, ``"shift"``, ``"ctrl_l"``, ``"f5"``, ...).
    """

    t: float
    pressed: bool
    vk: int | None = None
    char: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class MouseMove:
    t: float
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class Click:
    """A mouse button went down (``pressed``) or up. ``button`` is
    ``"left"``, ``"middle"``, ``"right"`` or ``"button8"``-style names."""

    t: float
    x: int
    y: int
    button: str
    pressed: bool


@dataclass(frozen=True, slots=True)
class Scroll:
    t: float
    x: int
    y: int
    dx: int
    dy: int


@dataclass(frozen=True, slots=True)
class AppFocus:
    """The focused application changed. ``app`` is the WM_CLASS class or the
    process name; ``title`` is the window title, only when policy allows."""

    t: float
    app: str
    title: str | None = None


RawEvent = KeyEvent | MouseMove | Click | Scroll | AppFocus
