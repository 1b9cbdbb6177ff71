"""The employee's page and the security report, in a real headless Chromium.

The page runs as ``keystay device ui`` against a real daemon (as in
``test_device_controls.py``) whose ledger already holds charges written by
the real accountant. Figures on the page are compared with ``keystay device
status --json`` and ``show --json``; the report's with ``keystay budget report
--json``. The guards (token, Host, Origin) are probed with ``http.client``
directly, since a browser would not send such requests on purpose.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import browser
import demo_ledgers
from running_daemon import simulated_daemon

from keystay.server.deploy.superlink import executable, flower_env

pytestmark = pytest.mark.e2e

YESTERDAY = (date.today() - timedelta(days=1)).isoformat()
DAY_BEFORE = (date.today() - timedelta(days=2)).isoformat()
FORGOTTEN = (date.today() - timedelta(days=20)).isoformat()


def keystay(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([executable("keystay"), *args], capture_output=True, text=True,
                          env=flower_env(), check=check, timeout=120)


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    """A simulated employee's daemon whose ledger has three charged rounds and a forgotten day."""
    data = tmp_path / "device"
    data.mkdir()
    demo_ledgers.charge_device(data, [
        ([DAY_BEFORE, YESTERDAY], 1.1, 0.05, 60),
        ([YESTERDAY], 1.1, 0.05, 60),
        ([FORGOTTEN], 1.0, 0.1, 100),
    ], forget=(FORGOTTEN,))
    with simulated_daemon(data, tmp_path / "daemon.log", seed=3):
        yield data


@pytest.fixture
def page(daemon: Path) -> Iterator[str]:
    """``keystay device ui`` for the daemon; yields the URL it printed."""
    yield from _serve(daemon)


def _serve(daemon: Path) -> Iterator[str]:
    process = subprocess.Popen(
        # --refresh 0: the page's own reloads would race the test's clicks.
        [executable("keystay"), "device", "ui", "--data", str(daemon), "--no-browser",
         "--refresh", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=flower_env(),
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, line + (process.stdout.read() or "")
        yield line[line.index("http://"):].split()[0]
    finally:
        _stop(process)


def status(data: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        keystay("device", "status", "--data", str(data), "--json").stdout)
    return result


def request(url: str, method: str = "GET", path: str = "/", body: str | None = None,
            headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    # skip_host: the test sets Host itself, wrong on purpose in one case.
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    all_headers = {"Host": f"127.0.0.1:{parts.port}", **(headers or {})}
    if body is not None:
        all_headers |= {"Content-Type": "application/x-www-form-urlencoded",
                        "Content-Length": str(len(body))}
    for key, value in all_headers.items():
        conn.putheader(key, value)
    conn.endheaders(body.encode() if body is not None else None)
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    conn.close()
    return response


def click_and_wait(driver: Any, element: Any) -> None:
    """Click a submit button and wait until the next page has replaced this one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 30).until(expected_conditions.staleness_of(old))
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.readyState") == "complete")


def test_page_shows_the_daemons_figures_and_pauses(page: str, daemon: Path,
                                                   tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with browser.chromium(tmp_path / "profile") as driver:
        driver.get(page)
        # The token link was swapped for a cookie and a clean address.
        assert "token=" not in driver.current_url
        truth = status(daemon)
        shown = json.loads(keystay("device", "show", "--data", str(daemon), "--json").stdout)
        rows = {r.get_attribute("data-day"): r
                for r in driver.find_elements(By.CSS_SELECTOR, "tr.day")}
        kept = {b["block"]: b for b in truth["blocks"]}
        assert {YESTERDAY, DAY_BEFORE} <= set(kept)
        for day, block in kept.items():
            row = rows[day]
            assert float(row.get_attribute("data-epsilon")) == block["epsilon"]
            assert float(row.get_attribute("data-budget")) == block["budget"]
            if day != date.today().isoformat():  # today's count grows while we look
                assert int(row.get_attribute("data-events")) == int(block["events"])
        assert kept[YESTERDAY]["epsilon"] > kept[DAY_BEFORE]["epsilon"] > 0
        assert rows[YESTERDAY].get_attribute("data-state") == "trained on"
        assert rows[FORGOTTEN].get_attribute("data-state") == "forgotten"
        by_day = {b["block"]: b for b in shown["blocks"]}
        counts = {li.get_attribute("data-kind"): int(li.get_attribute("data-count"))
                  for li in rows[YESTERDAY].find_elements(By.CSS_SELECTOR, "li[data-kind]")}
        assert counts == by_day[YESTERDAY]["tokens_by_kind"]
        # What left: three rounds, the newest first, with their mechanisms.
        rounds = driver.find_elements(By.CSS_SELECTOR, "li.round")
        assert [r.get_attribute("data-round") for r in rounds] == ["3", "2", "1"]
        assert float(rounds[2].get_attribute("data-sigma")) == 1.1
        assert "signed" in rounds[2].text
        assert "What this device allows" in driver.find_element(By.ID, "policy").text
        driver.save_screenshot(str(tmp_path / "employee-page.png"))

        Select(driver.find_element(By.ID, "pause-for")).select_by_value("30m")
        click_and_wait(driver, driver.find_element(By.ID, "pause"))
        state = driver.find_element(By.ID, "state")
        assert state.get_attribute("data-state") == "paused"
        assert state.get_attribute("data-paused-until")
        assert status(daemon)["recording"] is False
        click_and_wait(driver, driver.find_element(By.ID, "resume"))
        assert driver.find_element(By.ID, "state").get_attribute("data-state") == "recording"
        assert status(daemon)["recording"] is True

        # Forget asks first; only the second button deletes.
        row = driver.find_element(By.CSS_SELECTOR, f'tr.day[data-day="{DAY_BEFORE}"]')
        click_and_wait(driver, row.find_element(By.CSS_SELECTOR, "button.danger"))
        assert DAY_BEFORE in driver.find_element(By.TAG_NAME, "h1").text
        assert DAY_BEFORE in {b["block"] for b in status(daemon)["blocks"]}
        click_and_wait(driver, driver.find_element(By.ID, "confirm-forget"))
        assert DAY_BEFORE not in {b["block"] for b in status(daemon)["blocks"]}
    assert (tmp_path / "employee-page.png").stat().st_size > 0


@pytest.fixture
def day_page(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A daemon whose ledger holds employee-day rounds; YESTERDAY retired by the broken budget."""
    data = tmp_path / "device"
    data.mkdir()
    demo_ledgers.charge_device_days(data, [[DAY_BEFORE, YESTERDAY], [YESTERDAY]], broken=12.0)
    with simulated_daemon(data, tmp_path / "daemon.log", seed=5):
        for url in _serve(data):
            yield data, url


def test_page_shows_both_epsilons_per_employee_day(day_page: tuple[Path, str],
                                                   tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    daemon, url = day_page
    with browser.chromium(tmp_path / "profile") as driver:
        driver.get(url)
        truth = {b["block"]: b for b in status(daemon)["blocks"]}
        rows = {r.get_attribute("data-day"): r
                for r in driver.find_elements(By.CSS_SELECTOR, "tr.day")}
        for day in (DAY_BEFORE, YESTERDAY):
            row, block = rows[day], truth[day]
            assert block["unit"] == row.get_attribute("data-unit") == "employee-day"
            assert float(row.get_attribute("data-epsilon")) == block["epsilon"]
            assert float(row.get_attribute("data-epsilon-broken")) == block["epsilonBroken"]
            assert float(row.get_attribute("data-budget-broken")) == block["budgetBroken"]
            assert "server that breaks secure aggregation" in row.text
        assert rows[YESTERDAY].get_attribute("data-state") == "retired"
        assert rows[YESTERDAY].get_attribute("data-retired-by") == \
            "server that breaks secure aggregation"
        assert "Retired by the budget against a server that breaks secure aggregation" in \
            rows[YESTERDAY].text
        units = driver.find_element(By.ID, "units").text
        assert "per employee-day" in units and "honest-but-curious server" in units
        rounds = driver.find_elements(By.CSS_SELECTOR, "li.round")
        assert [r.get_attribute("data-unit") for r in rounds] == ["employee-day"] * 2
        driver.save_screenshot(str(tmp_path / "employee-day-page.png"))


def test_page_refuses_strangers(page: str, daemon: Path) -> None:
    launch = page.split("token=")[1]
    port = urlsplit(page).port
    assert request(page, path="/").status == 403  # no session
    assert request(page, path="/?token=" + "A" * len(launch)).status == 403  # wrong link
    # DNS rebinding: the right link under a foreign name does not even open a session.
    assert request(page, path=f"/?token={launch}",
                   headers={"Host": f"evil.example:{port}"}).status == 421
    opened = request(page, path=f"/?token={launch}")
    assert opened.status == 303
    session = (opened.getheader("Set-Cookie") or "").split(";")[0]
    name, _, secret = session.partition("=")
    assert name == f"keystay_ui_{port}" and secret and secret != launch
    assert request(page, path=f"/?token={launch}").status == 403  # the link is spent
    cookie = {"Cookie": session}
    assert request(page, path="/", headers={"Cookie": f"{name}=wrong"}).status == 403
    assert request(page, path="/", headers=cookie).status == 200
    # Export gives the same file as `keystay device export`.
    exported = request(page, path=f"/export?day={YESTERDAY}", headers=cookie)
    assert exported.status == 200
    assert f"keystay-{YESTERDAY}.json" in (exported.getheader("Content-Disposition") or "")
    mine = json.loads(exported.body)
    cli_file = daemon.parent / "cli-export.json"
    keystay("device", "export", "--data", str(daemon), "--day", YESTERDAY, "--out",
            str(cli_file))
    assert mine == json.loads(cli_file.read_text()) and mine["format"] == "keystay-export/1"
    assert request(page, path="/", headers={**cookie, "Host": f"evil.example:{port}"}).status \
        == 421
    form = f"token={secret}&for=30m"
    # CSRF: a foreign Origin or site, even with every secret right, changes nothing.
    for foreign in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        response = request(page, "POST", "/pause", form, {**cookie, **foreign})
        assert response.status == 403
    # A cookie alone (what a cross-site form would carry) is not enough either.
    assert request(page, "POST", "/pause", "for=30m", cookie).status == 403
    assert status(daemon)["recording"] is True
    same = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert request(page, "POST", "/pause", form, {**cookie, **same}).status == 303
    assert status(daemon)["recording"] is False


def test_ui_without_daemon_names_the_fix(tmp_path: Path) -> None:
    result = keystay("device", "ui", "--data", str(tmp_path / "none"), "--no-browser",
                     check=False)
    assert result.returncode == 40
    assert "keystay device run" in result.stderr and "Traceback" not in result.stderr


def test_html_report_offline_equals_json(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    demo_ledgers.server_ledger(tmp_path / "server", tmp_path / "keys").close()
    html_file = tmp_path / "report.html"
    result = keystay("budget", "report", "--server-dir", str(tmp_path / "server"), "--json",
                     "--html", str(html_file))
    data = json.loads(result.stdout)
    with browser.chromium(tmp_path / "profile") as driver:
        driver.get(html_file.as_uri())
        assert driver.find_element(By.ID, "status").get_attribute("data-status") == \
            "unverifiable"
        assert not data["clean"]
        cells = {(r.get_attribute("data-device"), r.get_attribute("data-block")): r
                 for r in driver.find_elements(By.CSS_SELECTOR, "tr.block")}
        expected = {(d["device_id"], b["block"]): b for d in data["devices"] for b in d["blocks"]}
        assert set(cells) == set(expected) and len(expected) == 6
        for key, block in expected.items():
            assert float(cells[key].get_attribute("data-epsilon")) == block["epsilon"]
            assert float(cells[key].get_attribute("data-budget")) == block["budget"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.unverifiable")) == \
            len(data["unverifiable_reports"]) == 1
        [central] = driver.find_elements(By.CSS_SELECTOR, "tr.central")
        assert float(central.get_attribute("data-epsilon")) == data["central_dp"][0]["epsilon"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#chart path.series")) == 2
        # The hostile refusal reason is shown as text, not run as markup.
        assert demo_ledgers.HOSTILE in driver.find_element(By.ID, "refusals").text
        assert driver.find_elements(By.CSS_SELECTOR, "main script, main img") == []
        # Nothing was fetched: every resource the page loaded is the file itself.
        loaded = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded == []
        driver.save_screenshot(str(tmp_path / "budget-report.png"))
    assert (tmp_path / "budget-report.png").stat().st_size > 0
