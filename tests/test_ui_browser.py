"""The usage page in a real browser: headless Chromium with JavaScript disabled, driven by selenium
through Debian's chromedriver (scripts/ensure-chromium installs both), against the proxy on a real
socket with a real redis-server and the simulator.

Each view's screenshot is checked; with `UI_SCREENSHOT_DIR=docs` the run also writes README's
docs/ui-team.png and docs/ui-admin.png (palette PNGs, to stay small).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anthropic
import httpx
import pytest
import redis
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from files_api_simulator import Simulator
from proxy.config import AdminConfig, hash_key
from tests.constants import ADMIN_KEY, ALPHA, BRAVO
from tests.support import WATCH, RedisServer, Served, free_port, served_proxy, team_settings, team_simulator

CHROMEDRIVER = "/usr/bin/chromedriver"
LAPTOP = (1280, 1000)
# Tall enough for the team view to show its files below the usage table.
LAPTOP_TALL = (1280, 1560)
PHONE = (390, 844)
TODAY = datetime.now(UTC).date()
SINCE = TODAY - timedelta(days=13)
RANGE = f"since={SINCE.isoformat()}&until={TODAY.isoformat()}"
HOSTILE_NAME = "<img src=x onerror=alert(1)>.txt"


class Site:
    """The simulator, a redis-server and the proxy (with an admin key), each on its own socket."""

    def __init__(self) -> None:
        self.simulator: Simulator = team_simulator()
        self.redis = RedisServer(free_port())
        self.redis.start()
        self._upstream = Served(self.simulator.app).__enter__()
        settings = team_settings(
            self._upstream.url,
            upstream={"read_timeout_s": 5},
            cache={"url": self.redis.url},
            admin=AdminConfig(key_sha256=hash_key(ADMIN_KEY)),
        )
        self._proxy = served_proxy(settings).__enter__()
        self.url = self._proxy.url

    def close(self) -> None:
        self._proxy.__exit__(None, None, None)
        self._upstream.__exit__(None, None, None)
        self.redis.stop()

    def admin_usage(self) -> dict[str, dict[str, int]]:
        """`GET /admin/usage` over RANGE, summed per tenant (over its workspaces)."""
        answer = httpx.get(f"{self.url}/admin/usage?{RANGE}", headers={"x-api-key": ADMIN_KEY}).json()
        totals: dict[str, dict[str, int]] = {}
        for row in answer["rows"]:
            team = totals.setdefault(row["tenant"], dict.fromkeys(answer["counters"], 0))
            for counter in answer["counters"]:
                team[counter] += row[counter]
        return totals


def make_traffic(site: Site) -> None:
    """Requests through the proxy today, and earlier days' counters written as the proxy writes them
    (`fp:usage:{day}`, `workspace|tenant|counter`), so the charts have a fortnight to show."""
    downloadable = site.simulator.add_file(ALPHA.upstream_key, filename="results.csv", size_bytes=300_000)
    with anthropic.Anthropic(base_url=site.url, api_key=ALPHA.proxy_key, max_retries=0) as alpha:
        for name in ("quarterly-report.pdf", "notes.txt", HOSTILE_NAME):
            alpha.files.upload(file=(name, b"x" * 50_000))
        for _ in range(4):
            alpha.files.list()
        alpha.files.download(downloadable).read()
    with anthropic.Anthropic(base_url=site.url, api_key=BRAVO.proxy_key, max_retries=0) as bravo:
        bravo.files.upload(file=("bravo-only-plan.pdf", b"y" * 20_000))
        bravo.files.list()
    store = redis.Redis.from_url(site.redis.url)
    with store.pipeline() as pipe:
        for back in range(1, 14):
            day = (TODAY - timedelta(days=back)).isoformat()
            for team, scale in ((ALPHA, 3), (BRAVO, 1)):
                requests = scale * (20 + (back * 7) % 15)
                counts = {
                    "requests": requests,
                    "cache_hits": requests * (2 + back % 3) // 5,
                    "uploads": back % 4,
                    "upload_bytes": (back % 4) * 180_000 * scale,
                    "downloads": back % 3,
                    "download_bytes": (back % 3) * 250_000,
                    "errors": back % 5 == 0,
                }
                for counter, amount in counts.items():
                    pipe.hincrby(
                        f"fp:usage:{{{day}}}", f"{team.workspace}|{team.name}|{counter}", int(amount)
                    )
        pipe.execute()
    store.close()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    served = Site()
    try:
        make_traffic(served)
        yield served
    finally:
        served.close()
    assert WATCH.leaks((ADMIN_KEY,)) == []


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium = shutil.which("chromium")
    if chromium is None or not Path(CHROMEDRIVER).is_file():
        pytest.fail("chromium or chromedriver is not installed: run scripts/ensure-chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    # The driver's debug log would carry the keys typed into the form.
    quiet = [logging.getLogger(name) for name in ("selenium", "urllib3")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    # A Service with a path: selenium-manager is never asked to find or download anything.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        show_as(driver, LAPTOP)
        yield driver
    finally:
        driver.quit()
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def show_as(driver: webdriver.Chrome, size: tuple[int, int], mobile: bool = False) -> None:
    """An exact viewport (the window's size would include the browser's own frame)."""
    width, height = size
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def sign_in(driver: webdriver.Chrome, site: Site, key: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{site.url}/ui/login")
    driver.find_element(By.NAME, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    # A click may return before the navigation it starts has begun.
    WebDriverWait(driver, 10).until(lambda d: d.current_url != f"{site.url}/ui/login")
    assert driver.current_url == f"{site.url}/ui/"


def totals_row(driver: webdriver.Chrome) -> dict[str, int]:
    cells = driver.find_elements(By.CSS_SELECTOR, 'tr[data-row="totals"] td[data-counter]')
    return {
        cell.get_attribute("data-counter") or "": int(cell.get_attribute("data-value") or 0)
        for cell in cells
        if cell.get_attribute("data-counter") != "hit_ratio"
    }


def check_screenshot(driver: webdriver.Chrome, name: str, size: tuple[int, int], folder: Path) -> None:
    """The viewport as a PNG of exactly `size` with more than one colour; kept for README if asked."""
    png = driver.get_screenshot_as_png()
    (folder / name).write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == size
    assert zlib.crc32(png[12:29]) == struct.unpack(">I", png[29:33])[0]  # the header chunk is intact
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert image.size == size
        colours = image.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 8, "the screenshot is blank"
        kept = os.environ.get("UI_SCREENSHOT_DIR")
        if kept:
            image.convert("RGB").quantize(colors=128).save(Path(kept) / name, optimize=True)


def test_javascript_is_off_in_this_browser(browser: webdriver.Chrome) -> None:
    browser.get("data:text/html,<noscript><p id=off>off</p></noscript><script>document.title='on'</script>")
    assert browser.find_element(By.ID, "off").is_displayed()
    assert browser.title == ""


def test_a_team_signs_in_and_its_totals_row_matches_admin_usage(
    browser: webdriver.Chrome, site: Site, tmp_path: Path
) -> None:
    sign_in(browser, site, ALPHA.proxy_key)
    browser.get(f"{site.url}/ui/?{RANGE}")

    assert browser.find_element(By.TAG_NAME, "h1").text == "Team alpha"
    assert totals_row(browser) == site.admin_usage()["alpha"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "tbody tr[data-day]")) == 14
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.chart")) == 2
    names = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "table.files td.name")]
    assert HOSTILE_NAME in names and "results.csv" in names  # shown as text, never as markup
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    assert "bravo-only-plan.pdf" not in browser.page_source
    show_as(browser, LAPTOP_TALL)
    try:
        check_screenshot(browser, "ui-team.png", LAPTOP_TALL, tmp_path)
    finally:
        show_as(browser, LAPTOP)


def test_a_team_cannot_see_another_teams_page_or_files_by_editing_the_url(
    browser: webdriver.Chrome, site: Site
) -> None:
    sign_in(browser, site, ALPHA.proxy_key)
    for query in ("team=bravo", f"team=bravo&{RANGE}", "team=bravo&page=page_YWZ0ZXI6MQ"):
        browser.get(f"{site.url}/ui/?{query}")
        assert "No such team" in browser.page_source
        assert "bravo-only-plan.pdf" not in browser.page_source
        assert browser.find_elements(By.CSS_SELECTOR, "[data-counter]") == []

    sign_in(browser, site, BRAVO.proxy_key)
    browser.get(f"{site.url}/ui/?team=alpha")
    assert "No such team" in browser.page_source and "quarterly-report.pdf" not in browser.page_source
    browser.get(f"{site.url}/ui/")
    assert "bravo-only-plan.pdf" in browser.page_source and "quarterly-report.pdf" not in browser.page_source


def test_the_admin_sees_every_team_and_follows_a_link_to_one(
    browser: webdriver.Chrome, site: Site, tmp_path: Path
) -> None:
    sign_in(browser, site, ADMIN_KEY)
    browser.get(f"{site.url}/ui/?{RANGE}")
    usage = site.admin_usage()

    assert browser.find_element(By.TAG_NAME, "h1").text == "All teams"
    for team in ("alpha", "bravo"):
        row = browser.find_elements(By.CSS_SELECTOR, f'tr[data-team="{team}"] td[data-counter="requests"]')
        assert int(row[0].get_attribute("data-value") or 0) == usage[team]["requests"]
    everyone = {counter: sum(team[counter] for team in usage.values()) for counter in usage["alpha"]}
    storage = httpx.get(f"{site.url}/admin/usage", headers={"x-api-key": ADMIN_KEY}).json()["storage"]
    everyone["storage_files"] = sum(row["files"] for row in storage)  # what the teams hold now
    everyone["storage_bytes"] = sum(row["bytes"] for row in storage)
    assert totals_row(browser) == everyone
    saved = browser.find_element(By.CSS_SELECTOR, '[data-summary="saved"]')
    assert int(saved.get_attribute("data-value") or 0) == everyone["cache_hits"] > 0
    check_screenshot(browser, "ui-admin.png", LAPTOP, tmp_path)

    browser.find_element(By.LINK_TEXT, "bravo").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "h1").text == "Team bravo")
    assert totals_row(browser) == usage["bravo"]
    assert "bravo-only-plan.pdf" in browser.page_source


def test_sign_out_ends_the_session_and_the_old_cookie_no_longer_works(
    browser: webdriver.Chrome, site: Site
) -> None:
    sign_in(browser, site, ALPHA.proxy_key)
    cookie = browser.get_cookie("fp_ui_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    browser.find_element(By.CSS_SELECTOR, "header form button").click()
    WebDriverWait(browser, 10).until(lambda d: d.current_url == f"{site.url}/ui/login")
    assert browser.get_cookie("fp_ui_session") is None
    browser.add_cookie({k: cookie[k] for k in ("name", "value", "path", "httpOnly", "sameSite")})
    browser.get(f"{site.url}/ui/")
    assert browser.current_url == f"{site.url}/ui/login"
    replay = httpx.get(f"{site.url}/ui/", cookies={"fp_ui_session": cookie["value"]})
    assert replay.status_code == 303 and replay.headers["location"] == "/ui/login"


def test_the_page_fits_a_phone_screen(browser: webdriver.Chrome, site: Site, tmp_path: Path) -> None:
    sign_in(browser, site, ALPHA.proxy_key)
    show_as(browser, PHONE, mobile=True)
    try:
        browser.get(f"{site.url}/ui/?{RANGE}")
        # Only wide tables scroll, inside their own box; the page itself never does sideways.
        assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
        check_screenshot(browser, "ui-phone.png", PHONE, tmp_path)
    finally:
        show_as(browser, LAPTOP)
