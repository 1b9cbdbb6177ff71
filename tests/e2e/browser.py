"""Headless Chromium for the page tests: Debian's browser and driver, nothing downloaded.

``make apt-deps`` installs the ``chromium`` and ``chromium-driver`` packages.
Selenium is given the driver's path, so Selenium Manager never tries to
download a driver or a browser, and Chromium runs with a fresh profile and
its background networking (updates, sync, field trials) off, so a test
fetches nothing but the page it opens.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1800",
)


def missing() -> str | None:
    """Why the browser cannot run here, or ``None``."""
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if not absent:
        return None
    return (f"{' and '.join(absent)} not installed; install the Debian packages chromium "
            "and chromium-driver (`make apt-deps`) to run the page tests")


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[object]:
    """A headless Chromium (selenium ``WebDriver``) with a fresh profile in ``profile``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    problem = missing()
    if problem:
        raise RuntimeError(problem)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile.mkdir(parents=True, exist_ok=True)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
