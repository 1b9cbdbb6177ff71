"""Tokenizer and vocabulary: pairing, shortcuts, coalescing, exclusion, raw text."""

from __future__ import annotations

import itertools
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from keystay.common.events import AppFocus, Click, KeyEvent, MouseMove, RawEvent, Scroll
from keystay.common.tokens import (
    IDLE_GAP_S,
    VOCAB,
    VOCAB_SIZE,
    Tokenizer,
    TokenRecord,
    app_category,
    token_id,
    token_kind,
    token_name,
)

KINDS = {"pad", "key", "shortcut", "timing", "move", "click", "scroll", "app", "marker"}


def names(records: list[TokenRecord]) -> list[str]:
    return [token_name(r.token) for r in records]


def press(t: float, vk: int | None = None, char: str | None = None,
          name: str | None = None) -> KeyEvent:
    return KeyEvent(t, True, vk, char, name)


def release(t: float, vk: int | None = None, char: str | None = None,
            name: str | None = None) -> KeyEvent:
    return KeyEvent(t, False, vk, char, name)


def feed_all(tok: Tokenizer, events: list[RawEvent]) -> list[TokenRecord]:
    out: list[TokenRecord] = []
    for event in events:
        out.extend(tok.feed(event))
    return out


# -- vocabulary --------------------------------------------------------------------


def test_vocabulary_is_small_unique_and_starts_with_pad() -> None:
    assert VOCAB[0] == "<pad>"
    assert VOCAB_SIZE == len(VOCAB) == len(set(VOCAB))
    assert 100 < VOCAB_SIZE <= 400
    assert {token_kind(i) for i in range(VOCAB_SIZE)} == KINDS
    for i in (0, 1, VOCAB_SIZE // 2, VOCAB_SIZE - 1):
        assert token_id(token_name(i)) == i


def test_vocabulary_names_the_classes_the_model_needs() -> None:
    for name in ("key:letter", "key:upper", "key:digit", "key:punct", "key:space",
                 "key:return", "key:backspace", "key:tab", "key:escape", "key:delete",
                 "key:left", "key:page_down", "key:function", "key:shift", "key:ctrl_up",
                 "shortcut:ctrl+letter", "shortcut:ctrl+shift+letter", "shortcut:alt+tab",
                 "shortcut:ctrl+digit", "shortcut:shift+nav", "click:left:press",
                 "click:other:release", "scroll:left", "move:NE:0-40px", "app:browser",
                 "marker:paused", "marker:resumed", "marker:idle"):
        assert token_kind(token_id(name)) == name.split(":")[0]


def test_unknown_names_and_ids_are_refused_with_the_value() -> None:
    try:
        token_id("key:banana")
    except KeyError as exc:
        assert "key:banana" in str(exc)
    else:
        raise AssertionError("unknown token name accepted")
    for bad in (-1, VOCAB_SIZE):
        try:
            token_name(bad)
        except ValueError as exc:
            assert str(bad) in str(exc)
        else:
            raise AssertionError(f"token id {bad} accepted")


def test_tokens_module_stays_light() -> None:
    # The always-on recorder imports this module: no torch, not even numpy.
    code = ("import sys, keystay.common.tokens; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def test_app_categories() -> None:
    assert app_category("Firefox") == "browser"
    assert app_category("code") == "editor"
    assert app_category("libreoffice-calc") == "office"
    assert app_category("Slack") == "chat"
    assert app_category("some-unknown-tool") == "other"


# -- keys ----------------------------------------------------------------------------


def test_shifted_press_pairs_with_unshifted_release_by_vk() -> None:
    tok = Tokenizer()
    out = feed_all(tok, [
        press(0.00, 50, name="shift"),
        press(0.10, 43, "H"),
        release(0.15, 50, name="shift"),
        release(0.22, 43, "h"),  # Shift already up: the release reports "h"
    ])
    assert names(out) == [
        "key:shift", "timing:flight:2000ms+", "key:upper", "key:shift_up",
        "timing:dwell:110-150ms",  # 0.12 s between press H and release h
    ]


def test_pairing_falls_back_to_lowercased_character_without_vk() -> None:
    tok = Tokenizer()
    out = feed_all(tok, [press(1.0, None, "H"), release(1.04, None, "h")])
    assert names(out)[-1] == "timing:dwell:0-50ms"


def test_release_without_press_emits_nothing() -> None:
    assert Tokenizer().feed(release(1.0, 43, "h")) == []


def test_flight_time_buckets_between_presses() -> None:
    tok = Tokenizer()
    out = feed_all(tok, [press(0.0, 38, "a"), release(0.05, 38, "a"),
                         press(0.12, 56, "b"), release(0.2, 56, "b")])
    assert names(out) == ["timing:flight:2000ms+", "key:letter", "timing:dwell:50-80ms",
                          "timing:flight:100-150ms", "key:letter", "timing:dwell:80-110ms"]


def test_key_classes() -> None:
    tok = Tokenizer()
    cases = [(press(0, 10, "1"), "key:digit"), (press(0, 10, "!"), "key:punct"),
             (press(0, 59, ","), "key:punct"), (press(0, 65, " ", "space"), "key:space"),
             (press(0, 36, None, "enter"), "key:return"),
             (press(0, 22, None, "BackSpace"), "key:backspace"),
             (press(0, 9, None, "esc"), "key:escape"), (press(0, 23, None, "tab"), "key:tab"),
             (press(0, 119, None, "delete"), "key:delete"),
             (press(0, 113, None, "left"), "key:left"), (press(0, 112, None, "Prior"),
                                                          "key:page_up"),
             (press(0, 71, None, "f5"), "key:function"), (press(0, 96, None, "F12"),
                                                          "key:function"),
             (press(0, 200, None, "media_volume_up"), "key:media"),
             (press(0, 201, "é"), "key:letter")]
    for event, expected in cases:
        assert names(tok.feed(event))[-1] == expected, event


def test_shortcuts_from_modifier_state() -> None:
    tok = Tokenizer()

    def chord(mods: list[tuple[int, str]], key: KeyEvent) -> str:
        events: list[RawEvent] = [press(0, vk, name=n) for vk, n in mods]
        events.append(key)
        events.append(KeyEvent(0.05, False, key.vk, key.char, key.name))
        events += [release(0.1, vk, name=n) for vk, n in reversed(mods)]
        out = names(feed_all(tok, events))
        return next(n for n in out if n.startswith(("shortcut:", "key:"))
                    and not n.startswith(("key:ctrl", "key:alt", "key:shift", "key:super")))

    ctrl, shift, alt, sup = (37, "ctrl_l"), (50, "shift"), (64, "alt"), (133, "cmd")
    assert chord([ctrl], press(0.01, 54, "c")) == "shortcut:ctrl+letter"
    assert chord([ctrl], press(0.01, 54, "\x03")) == "shortcut:ctrl+letter"
    assert chord([ctrl, shift], press(0.01, 28, "T")) == "shortcut:ctrl+shift+letter"
    assert chord([alt], press(0.01, 23, None, "tab")) == "shortcut:alt+tab"
    assert chord([alt, shift], press(0.01, 23, None, "tab")) == "shortcut:alt+shift+tab"
    assert chord([ctrl], press(0.01, 10, "1")) == "shortcut:ctrl+digit"
    assert chord([sup], press(0.01, 46, "l")) == "shortcut:super+letter"
    assert chord([shift], press(0.01, 113, None, "left")) == "shortcut:shift+nav"
    assert chord([shift], press(0.01, 10, "!")) == "key:punct"
    assert chord([shift], press(0.01, 43, "h")) == "key:upper"
    # After everything is released, plain keys again.
    assert names(tok.feed(press(1.0, 54, "c")))[-1] == "key:letter"


def test_modifier_autorepeat_emits_one_press() -> None:
    tok = Tokenizer()
    out = feed_all(tok, [press(0, 37, name="ctrl"), press(0.5, 37, name="ctrl"),
                         press(0.53, 37, name="ctrl"), release(0.6, 37, name="ctrl")])
    assert names(out) == ["key:ctrl", "key:ctrl_up"]


# -- mouse -----------------------------------------------------------------------------


def test_pointer_moves_are_coalesced_into_one_token_per_stroke() -> None:
    tok = Tokenizer()
    strokes = [MouseMove(i * 0.01, 100 + 4 * i, 500) for i in range(50)]  # 196 px east
    out = feed_all(tok, strokes)
    assert out == []  # still moving: nothing yet
    out = tok.feed(Click(0.6, 296, 500, "left", True))
    assert names(out) == ["move:E:150-400px", "click:left:press"]
    assert out[0].t == strokes[-1].t


def test_pause_splits_strokes_and_long_strokes_are_cut() -> None:
    tok = Tokenizer()
    up = [MouseMove(i * 0.01, 300, 300 - 2 * i) for i in range(1, 11)]  # 20 px north
    left = [MouseMove(1.0 + i * 0.01, 300 - 10 * i, 280) for i in range(1, 11)]  # 100 px west
    out = feed_all(tok, up + left) + tok.flush()
    assert names(out) == ["move:N:0-40px", "move:W:40-150px"]
    tok = Tokenizer()
    long = [MouseMove(i * 0.02, 500 + i, 500 + i) for i in range(150)]  # 3 s of motion
    out = feed_all(tok, long) + tok.flush()
    assert len(out) == 3 and all(n.startswith("move:SE:") for n in names(out))


def test_jitter_is_dropped() -> None:
    tok = Tokenizer()
    out = feed_all(tok, [MouseMove(0, 10, 10), MouseMove(0.01, 12, 11), MouseMove(0.02, 11, 12)])
    assert out + tok.flush() == []


def test_clicks_and_scrolls() -> None:
    tok = Tokenizer()
    out = feed_all(tok, [Click(0, 1, 1, "right", True), Click(0.1, 1, 1, "right", False),
                         Click(0.2, 1, 1, "Button.middle", True),
                         Click(0.3, 1, 1, "button8", True), Scroll(0.4, 1, 1, 0, 1),
                         Scroll(0.5, 1, 1, 0, -2), Scroll(0.6, 1, 1, -1, 0),
                         Scroll(0.7, 1, 1, 0, 0)])
    assert names(out) == ["click:right:press", "click:right:release", "click:middle:press",
                          "click:other:press", "scroll:up", "scroll:down", "scroll:left"]


# -- apps, exclusion, pause, raw text ----------------------------------------------------


def test_app_switch_token_carries_the_name_and_repeats_are_dropped() -> None:
    tok = Tokenizer()
    out = feed_all(tok, [AppFocus(0, "firefox", "Bank - Mozilla Firefox"),
                         AppFocus(1, "firefox", "Other tab"), AppFocus(2, "code")])
    assert names(out) == ["app:browser", "app:editor"]
    assert [r.app for r in out] == ["firefox", "code"]
    assert all(r.text is None for r in out)  # titles dropped without raw text


def test_excluded_app_yields_only_one_paused_marker() -> None:
    tok = Tokenizer(excluded_apps=["KeePassXC"])
    before = feed_all(tok, [AppFocus(0, "firefox"), press(0.5, 37, name="ctrl")])
    inside = feed_all(tok, [
        AppFocus(1.0, "keepassxc", "Passwords.kdbx"),
        press(1.1, 38, "s"), release(1.2, 38, "s"), press(1.3, 10, "3"),
        MouseMove(1.4, 10, 10), MouseMove(1.5, 400, 400), Click(1.6, 400, 400, "left", True),
        Scroll(1.7, 0, 0, 0, 1), AppFocus(1.8, "KEEPASSXC"), release(1.9, 37, name="ctrl"),
    ])
    assert names(before) == ["app:browser", "key:ctrl"]
    assert names(inside) == ["marker:paused"]
    assert inside[0].app is None and inside[0].text is None
    after = feed_all(tok, [AppFocus(2.0, "code"), release(2.1, 10, "3"),
                           press(2.2, 38, "a")])
    # The release of a key pressed inside the excluded app emits nothing; flight
    # timing restarts (no interval across the excluded span).
    assert names(after) == ["marker:resumed", "app:editor", "timing:flight:2000ms+",
                            "key:letter"]
    assert after[1].app == "code"


def test_excluding_the_focused_app_takes_effect_at_once() -> None:
    tok = Tokenizer()
    feed_all(tok, [AppFocus(0, "slack")])
    assert names(tok.set_excluded_apps(["Slack"], t=1.0)) == ["marker:paused"]
    assert tok.feed(press(1.5, 38, "a")) == []
    assert not tok.recording
    out = tok.set_excluded_apps([], t=2.0)
    assert names(out) == ["marker:resumed", "app:chat"]


def test_user_pause_and_resume() -> None:
    tok = Tokenizer()
    feed_all(tok, [AppFocus(0, "code")])
    assert names(tok.pause(1.0)) == ["marker:paused"]
    assert tok.pause(1.1) == []
    assert feed_all(tok, [press(1.2, 38, "a"), AppFocus(1.3, "firefox")]) == []
    out = tok.resume(2.0)
    assert names(out) == ["marker:resumed", "app:browser"]
    assert out[1].app == "firefox"


def test_idle_marker_after_a_long_gap() -> None:
    tok = Tokenizer()
    out = feed_all(tok, [press(0, 38, "a"), release(0.1, 38, "a"),
                         Click(0.1 + IDLE_GAP_S, 0, 0, "left", True)])
    assert names(out)[-2:] == ["marker:idle", "click:left:press"]


def test_raw_text_absent_by_default_present_when_allowed() -> None:
    events: list[RawEvent] = [AppFocus(0, "code", "main.py - Code"), press(0.1, 43, "h"),
                              release(0.2, 43, "h"), press(0.3, 37, name="ctrl"),
                              press(0.4, 54, "c")]
    plain = feed_all(Tokenizer(), events)
    assert all(r.text is None for r in plain)
    raw = feed_all(Tokenizer(raw_text=True), events)
    assert [r.text for r in raw if r.text is not None] == ["main.py - Code", "h", "c"]


def test_feed_refuses_non_events() -> None:
    try:
        Tokenizer().feed("h")  # type: ignore[arg-type]
    except TypeError as exc:
        assert "str" in str(exc)
    else:
        raise AssertionError("a string was accepted as an event")


# -- properties ---------------------------------------------------------------------------

APP_NAMES = ("firefox", "code", "keepassxc", "slack")
KEY_SPECS = [(38, "a", None), (43, "H", None), (10, "1", None), (50, None, "shift"),
             (37, None, "ctrl"), (64, None, "alt"), (23, None, "tab"), (22, None, "backspace"),
             (113, None, "left"), (65, " ", "space")]


@st.composite
def event_streams(draw: st.DrawFn) -> list[RawEvent]:
    steps = draw(st.lists(st.tuples(st.integers(0, 5), st.floats(0.0, 3.0), st.integers(0, 9),
                                    st.booleans(), st.integers(-500, 500),
                                    st.integers(-500, 500)), max_size=80))
    t = 0.0
    events: list[RawEvent] = []
    for kind, dt, i, flag, a, b in steps:
        t += dt
        if kind <= 1:
            vk, char, name = KEY_SPECS[i]
            events.append(KeyEvent(t, flag, vk, char, name))
        elif kind == 2:
            events.append(MouseMove(t, a + 500, b + 500))
        elif kind == 3:
            events.append(Click(t, a, b, ("left", "right", "middle", "x")[i % 4], flag))
        elif kind == 4:
            events.append(Scroll(t, a, b, i % 3 - 1, (i // 3) % 3 - 1))
        else:
            events.append(AppFocus(t, APP_NAMES[i % 4], "secret title"))
    return events


@settings(max_examples=150, deadline=None)
@given(event_streams(), st.booleans())
def test_any_stream_gives_valid_ordered_records(events: list[RawEvent], raw: bool) -> None:
    tok = Tokenizer(raw_text=raw)
    out = feed_all(tok, events) + tok.flush()
    assert all(0 < r.token < VOCAB_SIZE for r in out)
    assert all(a.t <= b.t for a, b in itertools.pairwise(out))
    for r in out:
        is_app = token_kind(r.token) == "app"
        assert (r.app is not None) == is_app
        if not raw:
            assert r.text is None


@settings(max_examples=150, deadline=None)
@given(event_streams())
def test_nothing_is_emitted_while_an_excluded_app_has_focus(events: list[RawEvent]) -> None:
    tok = Tokenizer(excluded_apps=["KeePassXC"])
    excluded = False
    for event in events:
        out = tok.feed(event)
        if isinstance(event, AppFocus):
            entering = event.app == "keepassxc" and not excluded
            leaving = event.app != "keepassxc" and excluded
            excluded = event.app == "keepassxc"
            if entering:
                assert names(out)[-1:] == ["marker:paused"]
                assert out[-1].app is None
                continue
            if leaving:
                assert names(out) == ["marker:resumed", f"app:{app_category(event.app)}"]
                continue
        if excluded:
            assert out == []
        assert all(r.app != "keepassxc" for r in out)
