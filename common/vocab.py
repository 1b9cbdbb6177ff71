"""The token vocabulary: what each token id means, on the device and in the model.

Design
------
The vocabulary is the contract between the tokenizer that writes tokens on
the device (:mod:`keystay.common.tokens`) and the model that reads them
(:mod:`keystay.common.model`: it fixes the embedding size). It is pure
Python (no torch, no numpy) and holds no behaviour beyond naming ids.

Vocabulary
----------
Token names are ``"<kind>:<detail>"``; ``token_kind`` is the part before the
first colon. Id 0 is ``"<pad>"`` (kind ``"pad"``). ``VOCAB_VERSION`` changes
whenever ids change, because a model trained on one vocabulary is meaningless
on another.

``key``
    One token per non-modifier key press, by *class*, never by character:
    ``key:letter`` (lowercase), ``key:upper`` (an uppercase letter, i.e.
    Shift+letter or Caps Lock: shift+letter is *not* a shortcut), ``key:digit``,
    ``key:punct`` (any other printable character, including shifted digits such
    as ``!``), ``key:space``, ``key:return``, ``key:backspace``, ``key:tab``,
    ``key:escape``, ``key:delete``, ``key:insert``, the eight navigation keys
    (``key:left``, ``key:right``, ``key:up``, ``key:down``, ``key:home``,
    ``key:end``, ``key:page_up``, ``key:page_down``), ``key:function`` (F1..F24,
    one class), ``key:capslock``, ``key:media``, ``key:menu``, ``key:other``.
    Modifier presses are ``key:shift``, ``key:ctrl``, ``key:alt``, ``key:super``,
    ``key:altgr``; their releases are ``key:shift_up`` ... (modifier releases
    matter for prediction: they end a shortcut or a capital).
``shortcut``
    A non-modifier key pressed while Ctrl, Alt or Super is held:
    ``shortcut:<mods>+<class>``, mods in the order ctrl, alt, shift, super
    (``shortcut:ctrl+letter``, ``shortcut:ctrl+shift+letter``,
    ``shortcut:alt+tab``, ``shortcut:ctrl+digit``). Shortcut classes are coarser:
    letter, digit, punct, space, tab, return, backspace, delete, escape, nav,
    function, other. Shift alone forms a shortcut only with keys that print
    nothing (``shortcut:shift+nav`` is a selection, ``shortcut:shift+tab``);
    with printable keys Shift just changes the character class. AltGr never
    forms a shortcut (it types characters on many layouts).
``timing``
    ``timing:flight:<range>`` precedes every non-modifier key token: the time
    since the previous non-modifier key press, bucketed by ``FLIGHT_EDGES_MS``
    (the first press, or one after a pause, gets the open top bucket).
    ``timing:dwell:<range>`` is emitted when a non-modifier key is released:
    how long it was held, bucketed by ``DWELL_EDGES_MS``. Releases are paired
    with presses by ``vk`` (else the lowercased name or character), so press
    ``H`` (Shift held) pairs with release ``h`` (Shift already up).
``move``
    ``move:<dir>:<range>``: the net displacement of a coalesced pointer
    movement, 8 compass directions (screen y grows downwards, ``N`` is up) x 4
    distance buckets (``MOVE_DIST_EDGES_PX``). Moves are coalesced: a segment
    starts at the last known pointer position and ends (one token) when the
    pointer rests for more than ``MOVE_GAP_S``, when the segment has lasted
    ``MOVE_MAX_SPAN_S``, or when any other event arrives. Net displacements
    under ``MOVE_MIN_PX`` are jitter and emit nothing. So a steady stream of
    pointer samples yields at most one token per ``MOVE_MAX_SPAN_S``.
``click``
    ``click:<button>:press`` / ``click:<button>:release``, button in left,
    middle, right, other.
``scroll``
    ``scroll:up|down|left|right``, one per scroll event (vertical first when an
    event has both). Positive ``dy`` is up, as pynput reports it.
``app``
    ``app:<category>`` when focus moves to another application; the record's
    ``app`` field carries the application name (the title only as ``text``
    and only when raw text is allowed). Categories (browser, editor, ...) let
    the model learn app-specific behaviour without learning names.
``marker``
    ``marker:paused`` (recording paused, or focus entered an excluded app: the
    marker does not say which, and never names the app), ``marker:resumed``,
    ``marker:idle`` (no input for ``IDLE_GAP_S`` or more).

>>> token_name(token_id("key:letter")), token_kind(token_id("key:letter"))
('key:letter', 'key')
>>> token_name(PAD_ID)
'<pad>'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "APP_CATEGORIES",
    "BUTTONS",
    "DIRECTIONS",
    "DWELL_EDGES_MS",
    "FLIGHT_EDGES_MS",
    "IDLE_GAP_S",
    "KEY_CLASSES",
    "MODIFIERS",
    "MOVE_DIST_EDGES_PX",
    "MOVE_GAP_S",
    "MOVE_MAX_SPAN_S",
    "MOVE_MIN_PX",
    "PAD_ID",
    "SHIFT_SHORTCUT_CLASSES",
    "SHORTCUT_CLASSES",
    "VOCAB",
    "VOCAB_SIZE",
    "VOCAB_VERSION",
    "TokenRecord",
    "token_id",
    "token_kind",
    "token_name",
]

VOCAB_VERSION = 1

# Bucket edges. Flight edges follow keystroke-dynamics literature: most
# within-word flights sit between 60 and 320 ms; >= 2 s is "not typing".
FLIGHT_EDGES_MS: tuple[int, ...] = (60, 100, 150, 220, 320, 500, 1000, 2000)
DWELL_EDGES_MS: tuple[int, ...] = (50, 80, 110, 150, 250)
MOVE_DIST_EDGES_PX: tuple[int, ...] = (40, 150, 400)
MOVE_MIN_PX = 5.0
MOVE_GAP_S = 0.25
MOVE_MAX_SPAN_S = 1.0
IDLE_GAP_S = 60.0

DIRECTIONS: tuple[str, ...] = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")
BUTTONS: tuple[str, ...] = ("left", "middle", "right", "other")
APP_CATEGORIES: tuple[str, ...] = (
    "browser", "editor", "terminal", "chat", "office", "mail", "files", "other",
)
KEY_CLASSES: tuple[str, ...] = (
    "letter", "upper", "digit", "punct", "space", "return", "backspace", "tab", "escape",
    "delete", "insert", "left", "right", "up", "down", "home", "end", "page_up", "page_down",
    "function", "capslock", "media", "menu", "other",
)
MODIFIERS: tuple[str, ...] = ("shift", "ctrl", "alt", "super", "altgr")
SHORTCUT_CLASSES: tuple[str, ...] = (
    "letter", "digit", "punct", "space", "tab", "return", "backspace", "delete", "escape",
    "nav", "function", "other",
)
# Shift on its own makes a shortcut only with keys that print nothing.
SHIFT_SHORTCUT_CLASSES: tuple[str, ...] = (
    "tab", "return", "backspace", "delete", "escape", "nav", "function", "other",
)
_CTRL, _ALT, _SHIFT, _SUPER = 1, 2, 4, 8
_MOD_BITS = {"ctrl": _CTRL, "alt": _ALT, "shift": _SHIFT, "super": _SUPER, "altgr": 0}


def _ranges(edges: tuple[int, ...], unit: str) -> list[str]:
    lows = (0, *edges)
    names = [f"{lo}-{hi}{unit}" for lo, hi in zip(lows, edges, strict=False)]
    return [*names, f"{edges[-1]}{unit}+"]


def _combo_name(mask: int) -> str:
    parts = [n for n, b in (("ctrl", _CTRL), ("alt", _ALT), ("shift", _SHIFT), ("super", _SUPER))
             if mask & b]
    return "+".join(parts)


# Masks holding at least one of ctrl/alt/super, in a fixed order.
_SHORTCUT_MASKS: tuple[int, ...] = tuple(m for m in range(1, 16) if m & (_CTRL | _ALT | _SUPER))


def _build_vocab() -> tuple[str, ...]:
    names = ["<pad>"]
    names += ["marker:paused", "marker:resumed", "marker:idle"]
    names += [f"app:{c}" for c in APP_CATEGORIES]
    names += [f"key:{c}" for c in KEY_CLASSES]
    names += [f"key:{m}" for m in MODIFIERS]
    names += [f"key:{m}_up" for m in MODIFIERS]
    names += [f"timing:flight:{r}" for r in _ranges(FLIGHT_EDGES_MS, "ms")]
    names += [f"timing:dwell:{r}" for r in _ranges(DWELL_EDGES_MS, "ms")]
    names += [f"move:{d}:{r}" for d in DIRECTIONS for r in _ranges(MOVE_DIST_EDGES_PX, "px")]
    names += [f"click:{b}:{a}" for b in BUTTONS for a in ("press", "release")]
    names += ["scroll:up", "scroll:down", "scroll:left", "scroll:right"]
    names += [f"shortcut:shift+{c}" for c in SHIFT_SHORTCUT_CLASSES]
    names += [f"shortcut:{_combo_name(m)}+{c}" for m in _SHORTCUT_MASKS for c in SHORTCUT_CLASSES]
    assert len(names) == len(set(names))
    return tuple(names)


VOCAB: tuple[str, ...] = _build_vocab()
"""Every token name; a token's id is its index."""
VOCAB_SIZE: int = len(VOCAB)
PAD_ID = 0
_IDS: dict[str, int] = {name: i for i, name in enumerate(VOCAB)}
_KINDS: tuple[str, ...] = tuple("pad" if n == "<pad>" else n.split(":", 1)[0] for n in VOCAB)


def token_id(name: str) -> int:
    """Return the id of a token name, e.g. ``token_id("shortcut:ctrl+letter")``.

    Raises
    ------
    KeyError
        If the name is not in the vocabulary (the message says which).
    """
    try:
        return _IDS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a keystay token (vocabulary v{VOCAB_VERSION})") from None


def token_name(token: int) -> str:
    """Return the name of a token id.

    Raises
    ------
    ValueError
        If the id is outside ``0 .. VOCAB_SIZE - 1``.
    """
    if not 0 <= token < VOCAB_SIZE:
        raise ValueError(f"token id {token} is outside the vocabulary (0..{VOCAB_SIZE - 1})")
    return VOCAB[token]


def token_kind(token: int) -> str:
    """Return the kind of a token id: ``"pad"``, ``"key"``, ``"shortcut"``,
    ``"timing"``, ``"move"``, ``"click"``, ``"scroll"``, ``"app"`` or ``"marker"``."""
    if not 0 <= token < VOCAB_SIZE:
        raise ValueError(f"token id {token} is outside the vocabulary (0..{VOCAB_SIZE - 1})")
    return _KINDS[token]


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One token with its time.

    Attributes
    ----------
    t : float
        :func:`time.monotonic` seconds of the event that produced the token.
    token : int
        Vocabulary id.
    app : str or None
        Application name, on ``app:*`` tokens only.
    text : str or None
        The typed character (key and shortcut tokens) or the window title (app
        tokens); set only by a ``Tokenizer(raw_text=True)``.
    """

    t: float
    token: int
    app: str | None = None
    text: str | None = None
