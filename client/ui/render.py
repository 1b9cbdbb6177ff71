"""HTML for the employee's page: plain server-rendered markup, every value escaped.

Design note
-----------
Pure functions from what the daemon answered to HTML text, so they are
tested without a server. Every figure is written twice: as words and
rounded numbers for the employee, and exactly (``repr``) in ``data-``
attributes so tests can compare the page with ``keystay device status
--json`` without parsing prose. Every value that came from the daemon or
the ledger goes through :func:`html.escape` (app names are window classes
any program can choose). Bars are ``<meter>`` elements: the page's
Content-Security-Policy forbids inline styles, and meters need none.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any

from keystay.client.ledger.ledger import UNIT_DAY, UNIT_RECORD
from keystay.client.ui.access import (
    BUDGET_BROKEN,
    BUDGET_HONEST,
    BUDGET_RECORD,
    DayLedger,
    RoundCharge,
)

STATE_OPEN = "open"
STATE_TRAINED = "trained on"
STATE_RETIRED = "retired"
STATE_FORGOTTEN = "forgotten"

_STATE_HELP = {
    STATE_OPEN: "kept; not used for training yet",
    STATE_TRAINED: "kept; used in training, budget left",
    STATE_RETIRED: "budget spent: never trained on again",
    STATE_FORGOTTEN: "deleted from this computer; only its ε figures remain in the ledger",
}

_NOTES = {
    "paused": "Recording is paused until you resume it.",
    "paused-until": "Recording is paused for the time you chose.",
    "resumed": "Recording again.",
}

PAUSE_LABELS = (("15m", "15 minutes"), ("30m", "30 minutes"), ("1h", "1 hour"),
                ("2h", "2 hours"), ("1d", "1 day"), ("resume", "until I resume"))


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M")


def _layout(title: str, body: str, refresh: int = 0) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title>"
        "<link rel=\"stylesheet\" href=\"/static/page.css\">"
        "<script src=\"/static/page.js\" defer></script></head>"
        f'<body><main data-refresh="{int(refresh)}">{body}</main></body></html>\n'
    )


def _token_field(token: str) -> str:
    return f'<input type="hidden" name="token" value="{_e(token)}">'


def day_state(block: str, retired: bool, ledger: DayLedger | None, kept: bool) -> str:
    """A day's state in the employee's words (one of the ``STATE_*`` constants)."""
    if not kept:
        return STATE_FORGOTTEN
    if retired or (ledger is not None and ledger.retired_at is not None):
        return STATE_RETIRED
    if ledger is not None and ledger.charges > 0:
        return STATE_TRAINED
    return STATE_OPEN


def _state_section(status: Mapping[str, Any], token: str) -> str:
    recording = bool(status.get("recording"))
    source = str(status.get("source", ""))
    until = str(status.get("pausedUntil", ""))
    if recording:
        state = "recording"
        words = "Recording: keystrokes and clicks become tokens on this computer."
    elif source == "none":
        state, words = "idle", "Not recording (the daemon was started without a recorder)."
    else:
        state = "paused"
        words = (f"Paused until {_e(until)}." if until
                 else "Paused until you press Resume.")
    options = "".join(f'<option value="{v}">{_e(label)}</option>' for v, label in PAUSE_LABELS)
    pause = (
        f'<form method="post" action="/pause" class="inline">{_token_field(token)}'
        f'<label>Pause for <select name="for" id="pause-for">{options}</select></label> '
        '<button type="submit" id="pause">Pause</button></form>'
    )
    resume = (
        f'<form method="post" action="/resume" class="inline">{_token_field(token)}'
        '<button type="submit" id="resume">Resume</button></form>'
    )
    return (
        f'<section id="state" data-state="{state}" data-paused-until="{_e(until)}">'
        f'<h2>Recording</h2><p class="state {state}">{words}</p>'
        f'<p>Events today: <span id="events-today">{_e(status.get("eventsToday", 0))}</span>. '
        f'Source: {_e(source)}.</p>'
        f"{resume if state == 'paused' else pause if state == 'recording' else ''}</section>"
    )


def _kinds(kinds: Mapping[str, int]) -> str:
    if not kinds:
        return "-"
    return "<ul class=\"kinds\">" + "".join(
        f'<li data-kind="{_e(k)}" data-count="{int(v)}">{_e(k)} <b>{int(v)}</b></li>'
        for k, v in kinds.items()
    ) + "</ul>"


#: The unit and the two assumptions, one sentence each, as the page explains them.
UNIT_SENTENCES = {
    UNIT_DAY: (
        "ε is per employee-day: it bounds what anyone can learn about everything you did on "
        "one day, however many keystrokes that was."
    ),
    UNIT_RECORD: (
        "ε is per record: it bounds what anyone can learn about one window of 33 "
        "consecutive input events."
    ),
}
ASSUMPTION_SENTENCES = {
    BUDGET_HONEST: (
        "Against an honest-but-curious server: the server follows the protocol and sees only "
        "the sum of at least t devices' updates, whose noise adds up."
    ),
    BUDGET_BROKEN: (
        "Against a server that breaks secure aggregation: it sees this computer's update "
        "alone, with only this computer's share of the noise, so the figure is larger."
    ),
}
_RETIRED_BY = {
    BUDGET_HONEST: "the budget against an honest-but-curious server",
    BUDGET_BROKEN: "the budget against a server that breaks secure aggregation",
    BUDGET_RECORD: "the record-level budget",
}


def retired_words(retired_by: Sequence[str]) -> str:
    """Which budget retired a day, in a sentence (empty when nobody knows)."""
    names = [_RETIRED_BY[b] for b in retired_by if b in _RETIRED_BY]
    if not names:
        return ""
    which = " and ".join(names)
    return (f"Retired by {which}: the same round again would have spent more than "
            f"{'they allow' if len(names) > 1 else 'it allows'}.")


def _meter(epsilon: float, budget: float, cls: str) -> str:
    return (
        f'<meter class="{cls}" min="0" max="{budget!r}" value="{epsilon!r}" '
        f'title="ε {epsilon:.3f} of {budget:g}"></meter> '
        f'<span class="{cls}">{epsilon:.3f}</span> of {budget:g}'
    )


def _day_figures(
    block: Mapping[str, Any] | None, ledger: DayLedger | None
) -> tuple[str, float, float, float | None, float | None]:
    """(unit, ε, budget, ε broken, budget broken): from Status, or the ledger if forgotten."""
    if block is None:
        if ledger is None:
            return UNIT_RECORD, 0.0, 0.0, None, None
        return (ledger.unit, ledger.epsilon, ledger.budget, ledger.epsilon_broken,
                ledger.budget_broken)
    unit = str(block.get("unit") or UNIT_RECORD)
    has_broken = bool(block.get("hasBroken"))
    return (
        unit,
        float(block.get("epsilon", 0.0)),
        float(block.get("budget", 0.0)),
        float(block.get("epsilonBroken", 0.0)) if has_broken else None,
        float(block.get("budgetBroken", 0.0)) if has_broken else None,
    )


def _days_section(
    status: Mapping[str, Any],
    show: Mapping[str, Any],
    day_ledger: Mapping[str, DayLedger],
    token: str,
) -> str:
    delta = status.get("delta", 0)
    shown = {b["block"]: b for b in show.get("blocks", [])}
    rows = []
    kept = {b["block"] for b in status.get("blocks", [])}
    entries: list[tuple[str, Mapping[str, Any] | None]] = [
        (b["block"], b) for b in status.get("blocks", [])
    ]
    entries += [(day, None) for day in day_ledger if day not in kept]
    units = set()
    for day, block in sorted(entries, key=lambda e: e[0], reverse=True):
        ledger = day_ledger.get(day)
        unit, epsilon, budget, broken, broken_budget = _day_figures(block, ledger)
        units.add(unit)
        if block is None:
            # Forgotten: Status no longer lists the day; the ledger keeps its ε.
            events = "0"
            retired = ledger is not None and ledger.retired_at is not None
        else:
            events = str(block.get("events", 0))
            retired = bool(block.get("retired"))
        state = day_state(day, retired, ledger, block is not None)
        left = f', <span class="left">{max(0.0, budget - epsilon):.3f}</span> left'
        if broken is None or broken_budget is None:
            meters = _meter(epsilon, budget, "eps")
        else:
            left_broken = max(0.0, broken_budget - broken)
            meters = (
                f'<span class="series honest">honest-but-curious server: '
                f'{_meter(epsilon, budget, "eps")}'
                + ("" if block is None else left) + "</span><br>"
                '<span class="series broken">server that breaks secure aggregation: '
                f'{_meter(broken, broken_budget, "eps-broken")}'
                + ("" if block is None else
                   f', <span class="left-broken">{left_broken:.3f}</span> left')
                + "</span>"
            )
            left = ""
        if block is None:
            spent_cell = f"{meters}; the data is gone, the ledger keeps these figures"
            actions = ""
        else:
            spent_cell = f"{meters}{left}"
            actions = (
                f'<a class="button" href="/export?day={_e(day)}" download>Export</a> '
                f'<form method="post" action="/forget" class="inline">{_token_field(token)}'
                f'<input type="hidden" name="day" value="{_e(day)}">'
                '<button type="submit" class="danger">Forget this day</button></form>'
            )
        retired_by = ledger.retired_by if ledger is not None and state == STATE_RETIRED else ()
        why = retired_words(retired_by)
        detail = shown.get(day, {})
        apps = ", ".join(_e(a) for a in detail.get("apps_seen", [])) or "-"
        broken_attrs = "" if broken is None else (
            f' data-epsilon-broken="{broken!r}" data-budget-broken="{broken_budget!r}"')
        rows.append(
            f'<tr class="day" data-day="{_e(day)}" data-events="{_e(events)}" '
            f'data-unit="{_e(unit)}" data-epsilon="{epsilon!r}" data-budget="{budget!r}"'
            f'{broken_attrs} data-state="{_e(state)}" '
            f'data-retired-by="{_e(",".join(retired_by))}">'
            f"<th scope=\"row\">{_e(day)}</th><td class=\"num\">{_e(events)}</td>"
            f"<td>{_kinds(detail.get('tokens_by_kind', {}))}</td><td>{apps}</td>"
            f"<td>{spent_cell}</td>"
            f'<td><span class="badge {_e(state.replace(" ", "-"))}" '
            f'title="{_e(_STATE_HELP[state])}">{_e(state)}</span>'
            + (f'<p class="retired-by">{_e(why)}</p>' if why else "")
            + f"</td><td>{actions}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>Day</th><th>Events</th><th>Tokens by kind</th><th>Apps seen</th>"
        "<th>Privacy budget (ε spent)</th><th>State</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>" if rows else "<p>Nothing is kept yet.</p>"
    )
    if not units:
        units = {UNIT_DAY}  # nothing kept yet: explain the default policy's unit
    explained = "".join(
        f'<li data-unit="{_e(u)}">{_e(UNIT_SENTENCES[u])}</li>'
        for u in (UNIT_DAY, UNIT_RECORD) if u in units
    )
    if UNIT_DAY in units:
        explained += "".join(
            f'<li data-assumption="{_e(name)}">{_e(sentence)}</li>'
            for name, sentence in ASSUMPTION_SENTENCES.items()
        )
    return (
        '<section id="days"><h2>What is kept, day by day</h2>'
        "<p>Each day is one <em>block</em>. Training on a day spends its privacy budget ε "
        f"(at δ = {_e(f'{float(delta):g}')}); a smaller ε means less could be learnt about that "
        "day. When a day's budget is spent it retires and is never trained on again"
        + ("; an employee-day has two budgets, and it retires when either is spent"
           if UNIT_DAY in units else "")
        + ". Only token <em>kinds</em> are shown here, never what you typed.</p>"
        f'<ul id="units">{explained}</ul>'
        f"{table}</section>"
    )


def _round_words(r: RoundCharge) -> str:
    days = ", ".join(_e(d.block) for d in r.days)
    cost = max((d.cost for d in r.days), default=0.0)
    if r.employee_day:
        return _day_round_words(r, days, cost)
    sent = (
        "What left this computer: the model update, clipped and with that noise added, and a "
        "report of exactly these figures, signed with this computer's key so nobody can alter "
        "them on the way."
        if r.answered else
        "Training did not finish, so nothing was sent; the budget stays spent (it is charged "
        "before training and never refunded)."
    )
    return (
        f"Training round {r.server_round} of run “{_e(r.run_id)}” used "
        f"{len(r.days)} day{'s' if len(r.days) != 1 else ''} ({days}). Each step looked at a "
        f"random {r.sample_rate * 100:.2g}% of those days' token windows, limited how much any "
        f"one window could change the model, and added random noise {r.noise_multiplier:g} "
        f"times that limit; it took {r.steps} steps. That cost at most ε {cost:.3f} per day. "
        f"{sent}"
    )


def _day_round_words(r: RoundCharge, days: str, cost: float) -> str:
    """An employee-day round in words: what could be read, what was added, what it cost."""
    cost_broken = max((d.cost_broken or 0.0 for d in r.days), default=0.0)
    sent = (
        "What left this computer: one update, with that noise added here and masked so the "
        f"server can only open the sum of at least {r.min_summed_devices} computers' updates, "
        "and a report of exactly these figures, signed with this computer's key."
        if r.answered else
        "The round did not finish, so nothing was sent; the budgets stay spent (they are "
        "charged before training and never refunded)."
    )
    return (
        f"Training round {r.server_round} of run “{_e(r.run_id)}” could read "
        f"{len(r.days)} day{'s' if len(r.days) != 1 else ''} ({days}). Each of them had a "
        f"{r.day_sample_rate * 100:.3g}% chance of being used, decided on this computer and "
        "never told to anyone; each day used changed the update by at most a fixed limit, and "
        "random noise was added on this computer before anything left. That cost at most "
        f"ε {cost:.3f} per day against an honest-but-curious server and ε {cost_broken:.3f} "
        f"against a server that breaks secure aggregation. {sent}"
    )


def _round_day_item(r: RoundCharge, d: Any) -> str:
    base = (f'<li data-day="{_e(d.block)}" data-cost="{d.cost!r}" '
            f'data-epsilon="{d.epsilon!r}"')
    if not r.employee_day or d.epsilon_broken is None:
        return (f"{base}>{_e(d.block)}: +{d.cost:.3f}, now ε {d.epsilon:.3f} (RDP bound "
                f"{d.epsilon_rdp:.3f}, PRV estimate {d.epsilon_prv:.3f})</li>")
    return (
        f'{base} data-cost-broken="{d.cost_broken!r}" data-epsilon-broken="{d.epsilon_broken!r}">'
        f"{_e(d.block)}: honest-but-curious server +{d.cost:.3f}, now ε {d.epsilon:.3f} "
        f"(RDP bound {d.epsilon_rdp:.3f}); server that breaks secure aggregation "
        f"+{(d.cost_broken or 0.0):.3f}, now ε {d.epsilon_broken:.3f}</li>"
    )


def _rounds_section(rounds: Sequence[RoundCharge]) -> str:
    if not rounds:
        body = "<p>Nothing has left this computer: no training round has used your data.</p>"
    else:
        items = []
        for r in rounds:
            days = "".join(_round_day_item(r, d) for d in r.days)
            extra = "" if not r.employee_day else (
                f"<dt>unit</dt><dd>{_e(r.unit)}</dd>"
                f"<dt>noise multiplier of this computer's own share σ/√t</dt>"
                f"<dd>{r.noise_multiplier_broken!r}</dd>"
                f"<dt>t (fewest computers summed)</dt><dd>{r.min_summed_devices}</dd>"
                f"<dt>clip per day C</dt><dd>{r.update_clip!r}</dd>"
                f"<dt>day sample rate q</dt><dd>{r.day_sample_rate!r}</dd>"
            )
            items.append(
                f'<li class="round" data-run="{_e(r.run_id)}" data-round="{r.server_round}" '
                f'data-unit="{_e(r.unit)}" '
                f'data-sigma="{r.noise_multiplier!r}" data-q="{r.sample_rate!r}" '
                f'data-steps="{r.steps}" data-sent="{str(r.answered).lower()}">'
                f"<h3>{_e(_when(r.created))}: run {_e(r.run_id)}, round {r.server_round}</h3>"
                f"<p>{_round_words(r)}</p>"
                f"<details><summary>Exact figures</summary><dl>"
                f"<dt>noise multiplier σ</dt><dd>{r.noise_multiplier!r}</dd>"
                f"<dt>sample rate q</dt><dd>{r.sample_rate!r}</dd>"
                f"<dt>steps</dt><dd>{r.steps}</dd><dt>δ</dt><dd>{r.delta!r}</dd>"
                f"<dt>bound enforced</dt><dd>{_e(r.accountant)}</dd>{extra}</dl>"
                f"<ul>{days}</ul></details></li>"
            )
        body = f"<ol class=\"rounds\">{''.join(items)}</ol>"
    return f'<section id="rounds"><h2>What left this computer</h2>{body}</section>'


def main_page(
    *,
    status: Mapping[str, Any],
    show: Mapping[str, Any],
    rounds: Sequence[RoundCharge],
    day_ledger: Mapping[str, DayLedger],
    policy: str,
    token: str,
    note: str = "",
    refresh: int = 0,
) -> str:
    """The whole page; ``refresh`` seconds between the script's reloads (0: never)."""
    message = _NOTES.get(note, "")
    forget_all = (
        f'<form method="post" action="/forget">{_token_field(token)}'
        '<input type="hidden" name="all" value="1">'
        '<button type="submit" class="danger" id="forget-all">Forget everything</button></form>'
    )
    body = (
        f"<header><h1>keystay on this computer</h1><p>Device "
        f'<code id="device-id">{_e(status.get("deviceId", ""))}</code>, keystay '
        f'{_e(status.get("version", ""))}. Updated {_e(time.strftime("%H:%M:%S"))}.</p></header>'
        + (f'<p class="note" role="status">{_e(message)}</p>' if message else "")
        + _state_section(status, token)
        + _days_section(status, show, day_ledger, token)
        + _rounds_section(rounds)
        + f'<section id="policy"><h2>Your policy, explained</h2><pre>{_e(policy)}</pre></section>'
        + '<section id="danger"><h2>Delete everything</h2><p>Deletes every kept day and destroys '
          "the store's key. The privacy ledger keeps its ε figures (never events): they prove "
          f"budgets were respected.</p>{forget_all}</section>"
    )
    return _layout("keystay: this computer", body, refresh)


def confirm_forget_page(days: Sequence[str], everything: bool, token: str) -> str:
    """The second step of Forget: nothing is deleted until this form is sent."""
    what = ("every day kept and the store's key" if everything
            else ", ".join(_e(d) for d in days))
    hidden = "".join(f'<input type="hidden" name="day" value="{_e(d)}">' for d in days)
    body = (
        f'<section id="confirm"><h1>Delete {what}?</h1>'
        "<p>This cannot be undone. The privacy ledger keeps the ε figures of these days.</p>"
        f'<form method="post" action="/forget">{_token_field(token)}{hidden}'
        + ('<input type="hidden" name="all" value="1">' if everything else "")
        + '<input type="hidden" name="confirm" value="yes">'
        '<button type="submit" class="danger" id="confirm-forget">Yes, delete</button> '
        '<a class="button" href="/">No, keep it</a></form></section>'
    )
    return _layout("keystay: confirm", body)


def forgotten_page(forgotten: Sequence[str], key_destroyed: bool) -> str:
    text = ("Deleted: " + ", ".join(_e(d) for d in forgotten) + "." if forgotten
            else "Nothing was deleted (those days were not kept).")
    if key_destroyed:
        text += " The store's key was destroyed."
    return message_page("Forgotten", text, escaped=True)


def message_page(title: str, text: str, *, escaped: bool = False) -> str:
    """A short page with a sentence and a way back (errors, results)."""
    body = (f'<section id="message"><h1>{_e(title)}</h1>'
            f"<p>{text if escaped else _e(text)}</p><p><a href=\"/\">Back</a></p></section>")
    return _layout(f"keystay: {title}", body)
