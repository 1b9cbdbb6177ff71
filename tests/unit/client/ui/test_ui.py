"""The employee's page without a daemon: request guards, rendering, the ledger view.

A real daemon and a real browser are in ``tests/e2e/test_pages.py``; here the
server runs on a thread with a fake :class:`DaemonAccess`, and requests are
made with ``http.client`` so every header is under the test's control.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from keystay.client.ledger.accounting import Epsilons, Mechanism
from keystay.client.ledger.ledger import Ledger
from keystay.client.policy import DevicePolicy, TrainingRequest
from keystay.client.ui import render
from keystay.client.ui.access import AccessError, DaemonAccess, DayLedger
from keystay.client.ui.server import HEADER, PageServer, check_request, cookie_name

TOKEN = "t" * 43
LAUNCH = "l" * 43
PORT = 5555
COOKIE = cookie_name(PORT)
HOSTILE_APP = '<img src=x onerror="alert(1)">'


def _check(**overrides: Any) -> Any:
    base: dict[str, Any] = {
        "method": "GET",
        "headers": {"Host": f"127.0.0.1:{PORT}", "Cookie": f"{COOKIE}={TOKEN}"},
        "form_token": None,
        "token": TOKEN,
        "port": PORT,
    }
    return check_request(**(base | overrides))


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({}, None),
        ({"headers": {"Host": f"localhost:{PORT}", "Cookie": f"{COOKIE}={TOKEN}"}}, None),
        ({"headers": {"Host": f"127.0.0.1:{PORT}", HEADER: TOKEN}}, None),
        ({"headers": {"Host": f"127.0.0.1:{PORT}"}}, 403),
        ({"headers": {"Host": f"127.0.0.1:{PORT}", "Cookie": f"{COOKIE}={TOKEN}x"}}, 403),
        # Another page's cookie (another port) is not this page's session.
        ({"headers": {"Host": f"127.0.0.1:{PORT}", "Cookie": f"{cookie_name(1)}={TOKEN}"}},
         403),
        # DNS rebinding: right token, foreign or missing Host, or another port.
        ({"headers": {"Host": f"attacker.example:{PORT}", "Cookie": f"{COOKIE}={TOKEN}"}}, 421),
        ({"headers": {"Cookie": f"{COOKIE}={TOKEN}"}}, 421),
        ({"headers": {"Host": "127.0.0.1:80", "Cookie": f"{COOKIE}={TOKEN}"}}, 421),
        # Changes: the form (or header) token is required, a cookie is not enough.
        ({"method": "POST", "form_token": TOKEN}, None),
        ({"method": "POST"}, 403),
        ({"method": "POST", "form_token": "wrong"}, 403),
        ({"method": "POST", "form_token": TOKEN,
          "headers": {"Host": f"127.0.0.1:{PORT}", "Origin": "http://evil.example"}}, 403),
        ({"method": "POST", "form_token": TOKEN,
          "headers": {"Host": f"127.0.0.1:{PORT}", "Origin": "null"}}, 403),
        ({"method": "POST", "form_token": TOKEN,
          "headers": {"Host": f"127.0.0.1:{PORT}", "Sec-Fetch-Site": "same-site"}}, 403),
        ({"method": "POST", "form_token": TOKEN,
          "headers": {"Host": f"127.0.0.1:{PORT}", "Origin": f"http://localhost:{PORT}",
                      "Sec-Fetch-Site": "same-origin"}}, None),
    ],
)
def test_request_rules(overrides: dict[str, Any], status: int | None) -> None:
    refusal = _check(**overrides)
    assert (None if refusal is None else int(refusal.status)) == status


class FakeAccess(DaemonAccess):
    """Canned daemon answers; records the changes asked for."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.recording = True
        self.calls: list[tuple[str, Any]] = []
        self.fail = False

    def status(self) -> dict[str, Any]:
        if self.fail:
            raise AccessError("the device daemon does not answer; start it with 'keystay "
                              "device run'")
        return {"deviceId": "dev-1", "recording": self.recording, "pausedUntil": "",
                "source": "simulated", "eventsToday": "3", "delta": 1e-5, "version": "t",
                "blocks": [{"block": "2026-12-01", "events": "40", "epsilon": 1.25,
                            "budget": 8.0, "retired": False}]}

    def show(self, day: str | None) -> dict[str, Any]:
        return {"device_id": "dev-1", "blocks": [
            {"block": "2026-12-01", "events": 40, "tokens_by_kind": {"key": 30, "click": 10},
             "apps_seen": [HOSTILE_APP, "code"], "epsilon_spent": 1.25, "budget": 8.0,
             "retired": False}]}

    def export(self, day: str) -> str:
        self.calls.append(("export", day))
        return '{"format": "keystay-export/1"}'

    def pause(self, seconds: float) -> str:
        self.calls.append(("pause", seconds))
        self.recording = False
        return ""

    def resume(self) -> None:
        self.calls.append(("resume", None))
        self.recording = True

    def forget(self, days: list[str], everything: bool) -> tuple[list[str], bool]:
        self.calls.append(("forget", (days, everything)))
        return days, everything

    def policy_text(self) -> str:
        return "policy from built-in defaults"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[PageServer, FakeAccess]]:
    access = FakeAccess(tmp_path)
    server = PageServer(access, token=TOKEN, launch_token=LAUNCH)
    server.start_background()
    try:
        yield server, access
    finally:
        server.shutdown()
        server.server_close()


def call(server: PageServer, method: str, path: str, body: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    sent = {"Cookie": f"{cookie_name(server.port)}={TOKEN}", **(headers or {})}
    if body is not None:
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=sent)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response, text


def _launch(server: PageServer, token: str, cookie: str | None = None,
            host: str | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    headers = {"Host": host or f"127.0.0.1:{server.port}"}
    if cookie:
        headers["Cookie"] = cookie
    conn.request("GET", f"/?token={token}", headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_the_launch_link_works_once_and_sets_a_strict_session_cookie(
    served: tuple[PageServer, FakeAccess],
) -> None:
    server, _ = served
    assert server.url == f"http://127.0.0.1:{server.port}/?token={LAUNCH}"
    assert _launch(server, LAUNCH, host=f"evil.example:{server.port}").status == 421
    assert _launch(server, LAUNCH[:-1] + "x").status == 403
    response = _launch(server, LAUNCH)
    assert response.status == 303 and response.getheader("Location") == "/"
    cookie = response.getheader("Set-Cookie") or ""
    # The session is another secret than the link's: the link is dead now.
    assert cookie.startswith(f"{cookie_name(server.port)}={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert _launch(server, LAUNCH).status == 403
    # ... except in the browser that holds the session, which just lands on the page.
    again = _launch(server, LAUNCH, cookie=f"{cookie_name(server.port)}={TOKEN}")
    assert again.status == 303 and again.getheader("Set-Cookie") is None


def test_secrets_are_fresh_and_long() -> None:
    a = PageServer(DaemonAccess(Path("/nonexistent")))
    b = PageServer(DaemonAccess(Path("/nonexistent")))
    try:
        secrets_drawn = {a.token, a.launch_token, b.token, b.launch_token}
        assert len(secrets_drawn) == 4
        assert all(len(t) >= 43 for t in secrets_drawn)  # 32 bytes, base64url
    finally:
        a.server_close()
        b.server_close()


def test_page_headers_and_escaping(served: tuple[PageServer, FakeAccess]) -> None:
    server, _ = served
    response, html = call(server, "GET", "/")
    assert response.status == 200
    csp = response.getheader("Content-Security-Policy") or ""
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.getheader("Cache-Control") == "no-store"
    assert HOSTILE_APP not in html and "&lt;img src=x onerror=" in html
    assert 'data-day="2026-12-01"' in html and 'data-epsilon="1.25"' in html
    assert "<script>" not in html  # only the shipped script, by src
    for name in ("page.css", "page.js"):
        asset, _ = call(server, "GET", f"/static/{name}")
        assert asset.status == 200


def test_changes_need_the_form_token(served: tuple[PageServer, FakeAccess]) -> None:
    server, access = served
    response, _ = call(server, "POST", "/pause", "for=1h")  # cookie only
    assert response.status == 403 and access.calls == []
    response, _ = call(server, "POST", "/pause", f"token={TOKEN}&for=1h")
    assert response.status == 303 and access.calls == [("pause", 3600.0)]
    response, _ = call(server, "POST", "/pause", f"token={TOKEN}&for=9y")
    assert response.status == 400 and len(access.calls) == 1


def test_forget_asks_before_it_deletes(served: tuple[PageServer, FakeAccess]) -> None:
    server, access = served
    response, html = call(server, "POST", "/forget", f"token={TOKEN}&day=2026-12-01")
    assert response.status == 200 and "Yes, delete" in html and access.calls == []
    response, html = call(server, "POST", "/forget",
                          f"token={TOKEN}&day=2026-12-01&confirm=yes")
    assert access.calls == [("forget", (["2026-12-01"], False))]
    assert "Deleted: 2026-12-01" in html
    call(server, "POST", "/forget", f"token={TOKEN}&all=1&confirm=yes")
    assert access.calls[-1] == ("forget", ([], True))


def test_export_downloads_and_daemon_errors_are_sentences(
    served: tuple[PageServer, FakeAccess],
) -> None:
    server, access = served
    response, body = call(server, "GET", "/export?day=2026-12-01")
    assert response.status == 200 and body.startswith('{"format"')
    assert "attachment" in (response.getheader("Content-Disposition") or "")
    response, _ = call(server, "GET", "/export?day=../../etc")
    assert response.status == 400
    access.fail = True
    response, html = call(server, "GET", "/")
    assert response.status == 503 and "keystay device run" in html
    assert "Traceback" not in html


def test_assets_ship_in_the_package_and_fetch_nothing() -> None:
    static = resources.files("keystay.client.ui") / "static"
    for name in ("page.css", "page.js"):
        text = (static / name).read_text()
        # No URL to anywhere: no CDN, no font service, no remote script.
        assert not re.search(r"https?:|url\(", text), name


def _additive(history: Sequence[Mechanism], delta: float) -> Epsilons:
    total = sum(m.steps * m.sample_rate / m.noise_multiplier for m in history)
    return Epsilons(rdp=total, prv=total, prv_upper=total)


def test_rounds_and_days_come_from_the_ledger(tmp_path: Path) -> None:
    days = ["2026-12-01", "2026-12-02"]
    with Ledger.open(tmp_path) as ledger:
        for rnd, blocks in ((1, days), (2, days[1:])):
            request = TrainingRequest(noise_multiplier=2.0, max_grad_norm=1.0, local_steps=10,
                                      sample_rate=0.1, learning_rate=0.1, dp=True, blocks=(),
                                      run_id="r", server_round=rnd)
            charge = ledger.admit(request=request, policy=DevicePolicy(privacy_unit="record"),
                                  blocks=blocks, mechanism=Mechanism(2.0, 0.1, 10),
                                  epsilon_fn=_additive, now=100.0 * rnd)
            if rnd == 1:
                ledger.mark_answered(charge)
        ledger.forget_block_data(days[0])
    access = DaemonAccess(tmp_path)
    rounds = access.rounds()
    assert [r.server_round for r in rounds] == [2, 1]
    assert [r.answered for r in rounds] == [False, True]
    assert [d.block for d in rounds[1].days] == days
    # Each round costs 10 * 0.1 / 2 = 0.5 per day under the additive accountant.
    assert rounds[0].days[0].cost == pytest.approx(0.5)
    assert rounds[0].days[0].epsilon == pytest.approx(1.0)
    ledger_days = access.day_ledger()
    assert ledger_days[days[0]].forgotten_at is not None
    assert ledger_days[days[1]].charges == 2
    assert ledger_days[days[1]].epsilon == pytest.approx(1.0)
    html = render._rounds_section(rounds)
    assert "Training did not finish, so nothing was sent" in html
    assert "signed with this computer's key" in html


def test_day_states() -> None:
    charged = DayLedger("d", charges=1, retired_at=None, forgotten_at=None)
    assert render.day_state("d", False, None, kept=True) == render.STATE_OPEN
    assert render.day_state("d", False, charged, kept=True) == render.STATE_TRAINED
    assert render.day_state("d", True, charged, kept=True) == render.STATE_RETIRED
    assert render.day_state("d", False, charged, kept=False) == render.STATE_FORGOTTEN


def test_no_ledger_means_nothing_left(tmp_path: Path) -> None:
    access = DaemonAccess(tmp_path)
    assert access.rounds() == [] and access.day_ledger() == {}
    assert "Nothing has left this computer" in render._rounds_section([])


def test_refresh_is_handed_to_the_script(tmp_path: Path) -> None:
    access = FakeAccess(tmp_path)
    for refresh in (0, 45):
        server = PageServer(access, token=TOKEN, refresh=refresh)
        server.start_background()
        try:
            _, html = call(server, "GET", "/")
        finally:
            server.shutdown()
            server.server_close()
        assert f'<main data-refresh="{refresh}">' in html


def test_ui_without_a_daemon_exits_40_with_the_fix(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from keystay.client.device_cli import device
    from keystay.common.exitcodes import ExitCode

    monkeypatch.delenv("KEYSTAY_SOCKET", raising=False)
    result = CliRunner().invoke(device, ["ui", "--data", str(tmp_path), "--no-browser"])
    assert result.exit_code == ExitCode.PAGE_NO_DAEMON == 40
    assert "keystay device run" in result.output
    # A socket file with nobody behind it is no daemon either.
    (tmp_path / "control.sock").touch()
    result = CliRunner().invoke(device, ["ui", "--data", str(tmp_path), "--no-browser"])
    assert result.exit_code == 40 and "does not answer" in result.output


# --- employee-day days: both ε, the unit and the assumptions, which budget retired -----


def _status_of(data_dir: Path, policy: DevicePolicy, days: Sequence[str]) -> dict[str, Any]:
    """What the daemon's Status answers for ``days`` over this ledger, as the page reads it."""
    from types import SimpleNamespace

    from google.protobuf.json_format import MessageToDict

    from keystay.client.daemon.controls import Controls

    with Ledger.open(data_dir) as ledger:
        totals = {t.block: t for t in ledger.totals()}
    controls = Controls(SimpleNamespace(policy=policy), None, "none", "t")  # type: ignore[arg-type]
    blocks = [controls._block_status(day, 10, totals.get(day)) for day in days]
    return {"deviceId": "dev-1", "recording": False, "source": "none", "eventsToday": "0",
            "delta": policy.delta, "version": "t",
            "blocks": [MessageToDict(b, always_print_fields_with_no_presence=True)
                       for b in blocks]}


def test_employee_day_rounds_and_days_carry_both_series(
    tmp_path: Path, employee_days: Any
) -> None:
    days = ["2026-12-01", "2026-12-02"]
    employee_days.charge(tmp_path, [days, days[1:]])
    access = DaemonAccess(tmp_path)
    with Ledger.open(tmp_path) as ledger:
        totals = {t.block: t for t in ledger.totals()}
    newest, oldest = access.rounds()
    assert newest.employee_day and newest.unit == "employee-day"
    assert newest.min_summed_devices == employee_days.policy().min_summed_devices
    [day] = newest.days
    assert day.epsilon == totals[days[1]].epsilon
    assert day.epsilon_broken == totals[days[1]].epsilon_broken
    first = {d.block: d for d in oldest.days}[days[1]]
    assert day.cost_broken == pytest.approx(day.epsilon_broken - (first.epsilon_broken or 0))
    ledger_days = access.day_ledger()
    assert ledger_days[days[0]].epsilon_broken == totals[days[0]].epsilon_broken
    assert ledger_days[days[0]].unit == "employee-day"
    assert ledger_days[days[0]].retired_by == ()  # open days name no budget
    words = render._rounds_section([newest, oldest])
    assert "against a server that breaks secure aggregation" in words
    assert f"{day.epsilon_broken:.3f}" in words


@pytest.mark.parametrize(
    ("budgets", "which"),
    [((10.0, 12.0), "server that breaks secure aggregation"),
     ((5.5, 40.0), "honest-but-curious server")],
)
def test_the_page_says_which_budget_retired_a_day(
    tmp_path: Path, employee_days: Any, budgets: tuple[float, float], which: str
) -> None:
    day = "2026-12-02"
    policy = employee_days.policy(*budgets)
    employee_days.charge(tmp_path, [[day], [day]], policy=policy)
    with Ledger.open(tmp_path) as ledger:
        [total] = ledger.totals()
        assert total.retired  # the ledger retired it: the page only says why
    access = DaemonAccess(tmp_path)
    assert access.day_ledger()[day].retired_by == (which,)
    status = _status_of(tmp_path, policy, [day])
    html = render._days_section(status, {"blocks": []}, access.day_ledger(), TOKEN)
    row = re.search(r'<tr class="day"[^>]*>', html)
    assert row is not None
    assert f'data-retired-by="{which}"' in row.group(0)
    assert f'data-epsilon-broken="{total.epsilon_broken!r}"' in row.group(0)
    assert f'data-budget-broken="{budgets[1]!r}"' in row.group(0)
    assert f"Retired by the budget against {'a' if 'breaks' in which else 'an'} {which}" in html


def test_the_page_explains_the_unit_and_both_assumptions(
    tmp_path: Path, employee_days: Any
) -> None:
    days = ["2026-12-01", "2026-12-02"]
    employee_days.charge(tmp_path, [days])
    status = _status_of(tmp_path, employee_days.policy(), days)
    access = DaemonAccess(tmp_path)
    page = render.main_page(status=status, show={"blocks": []}, rounds=access.rounds(),
                            day_ledger=access.day_ledger(), policy="p", token=TOKEN)
    assert render.UNIT_SENTENCES["employee-day"] in page
    for sentence in render.ASSUMPTION_SENTENCES.values():
        assert sentence.replace("'", "&#x27;") in page
    assert "retires when either is spent" in page
    for block in status["blocks"]:
        assert block["unit"] == "employee-day" and block["hasBroken"]
        assert f'data-epsilon-broken="{block["epsilonBroken"]!r}"' in page
    # A record-level day keeps one figure and names no second series.
    record = render._days_section(
        {"delta": 1e-5, "blocks": [{"block": "2026-11-30", "events": "4", "epsilon": 1.0,
                                    "budget": 8.0, "retired": False, "unit": "record"}]},
        {"blocks": []}, {}, TOKEN)
    assert "data-epsilon-broken" not in record and render.UNIT_SENTENCES["record"] in record
