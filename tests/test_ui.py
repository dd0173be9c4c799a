"""The usage page over a real socket with a plain HTTP client: sign-in, sessions, who sees what, the
files list through the cache, escaping; and the page's HTML for the parts not wired yet (storage).
The browser's view of the same is tests/test_ui_browser.py."""

from __future__ import annotations

import contextlib
import re
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import anthropic
import fakeredis
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from files_api_simulator import Simulator
from proxy.cache import CachePolicy
from proxy.caching import ResponseCache
from proxy.config import (
    AdminConfig,
    ConfigError,
    Settings,
    UiConfig,
    hash_key,
    load_settings,
)
from proxy.handler import FilesHandler
from proxy.ownership import Ownership
from proxy.store import RedisStore
from proxy.ui import UsagePage
from proxy.ui_pages import AdminView, FilesPage, StorageRow, TeamView, admin_page, team_page
from proxy.upstream import UpstreamClient
from proxy.usage import UsageCounter
from tests.constants import ADMIN_KEY, ALPHA, BRAVO, SDK_VERSION
from tests.support import (
    WATCH,
    Served,
    config_toml,
    served_proxy,
    team_environment,
    team_settings,
    team_simulator,
)

ROTATED_KEY = "fp-test-alpha-rotated-0b7e"


class Site:
    """A simulator and a proxy with an admin key, on real sockets; `reload` swaps the settings."""

    def __init__(self, ui: UiConfig | None = None) -> None:
        self.simulator: Simulator = team_simulator()
        self._upstream = Served(self.simulator.app).__enter__()
        self.settings = replace(self.settings_for(self._upstream.url), ui=ui or UiConfig())
        self._proxy = served_proxy(self.settings, load_settings=lambda: self.settings).__enter__()
        self.url = self._proxy.url

    @staticmethod
    def settings_for(upstream_url: str) -> Settings:
        return team_settings(
            upstream_url,
            upstream={"read_timeout_s": 5},
            cache={"local_ttl_s": 0},
            admin=AdminConfig(key_sha256=hash_key(ADMIN_KEY)),
        )

    def reload(self, settings: Settings) -> None:
        self.settings = settings
        answer = httpx.post(f"{self.url}/admin/reload", headers={"x-api-key": ADMIN_KEY})
        assert answer.status_code == 200, answer.text

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False)

    @contextlib.contextmanager
    def sign_in(self, key: str) -> Iterator[httpx.Client]:
        with self.client() as client:
            answer = client.post("/ui/login", data={"key": key})
            assert answer.status_code == 303, answer.text
            yield client

    def close(self) -> None:
        self._proxy.__exit__(None, None, None)
        self._upstream.__exit__(None, None, None)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    served = Site()
    yield served
    served.close()
    assert WATCH.leaks((ADMIN_KEY, ROTATED_KEY)) == []


@pytest.fixture
def own_site() -> Iterator[Site]:
    """A site of its own for a test that changes its config, its sign-in brake or needs an empty cache."""
    served = Site()
    yield served
    served.close()


def cells(html: str, row: str) -> dict[str, str]:
    """`data-counter` -> `data-value` of the table row marked `row` (e.g. `data-row="totals"`)."""
    found = re.search(rf"<tr {re.escape(row)}>(.*?)</tr>", html, re.DOTALL)
    assert found, f"no row {row}"
    return dict(re.findall(r'data-counter="([a-z_]+)" data-value="([^"]*)"', found[1]))


def test_the_page_without_a_session_sends_to_sign_in(site: Site) -> None:
    with site.client() as client:
        assert client.get("/ui/").headers["location"] == "/ui/login"
        assert client.get("/ui").headers["location"] == "/ui/"
        form = client.get("/ui/login")
    assert form.status_code == 200
    assert '<input type="password" name="key"' in form.text
    assert '<meta name="viewport"' in form.text
    assert form.headers["content-security-policy"].startswith("default-src 'none'")
    assert "<script" not in form.text and not re.search(r'(src|href|action)="(https?:)?//', form.text)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"files": {"key": ("key.txt", ALPHA.proxy_key.encode())}}, id="multipart"),
        pytest.param({"data": {"key": ALPHA.proxy_key, "pad": "x" * 5000}}, id="longer-than-a-sign-in"),
        pytest.param({"data": {"key": [ALPHA.proxy_key, ALPHA.proxy_key]}}, id="key-twice"),
        pytest.param(
            {"content": b"key=%ff%fe", "headers": {"content-type": "application/x-www-form-urlencoded"}},
            id="not-text",
        ),
    ],
)
def test_a_sign_in_body_other_than_the_pages_form_is_refused_like_a_wrong_key(body: dict[str, Any]) -> None:
    """The form is read by the proxy itself (it carries no multipart parser), bounded, one `key`.
    A site of its own: these failed sign-ins must not count against the shared one's throttle."""
    own = Site()
    try:
        with own.client() as client:
            answer = client.post("/ui/login", **body)
    finally:
        own.close()
    assert answer.status_code == 401
    assert "That key was not accepted" in answer.text
    assert "set-cookie" not in answer.headers


def test_a_wrong_key_gets_the_form_again_with_a_plain_message(site: Site) -> None:
    with site.client() as client:
        answer = client.post("/ui/login", data={"key": "fp-not-a-key-at-all"})
    assert answer.status_code == 401
    assert "That key was not accepted" in answer.text
    assert 'name="key"' in answer.text
    assert "fp-not-a-key-at-all" not in answer.text
    assert "set-cookie" not in answer.headers


def test_the_session_cookie_is_http_only_strict_and_scoped_to_the_page(site: Site) -> None:
    with site.client() as client:
        answer = client.post("/ui/login", data={"key": ALPHA.proxy_key})
    cookie = answer.headers["set-cookie"]
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Max-Age=28800" in cookie and "Secure" not in cookie
    assert ALPHA.proxy_key not in cookie and hash_key(ALPHA.proxy_key) not in cookie


def test_secure_cookies_and_the_session_length_come_from_config() -> None:
    secure = Site(UiConfig(secure_cookies=True, session_ttl_s=600))
    try:
        with secure.client() as client:
            cookie = client.post("/ui/login", data={"key": ALPHA.proxy_key}).headers["set-cookie"]
    finally:
        secure.close()
    assert "Secure" in cookie and "Max-Age=600" in cookie


def test_a_team_sees_its_usage_per_day_with_totals_equal_to_admin_usage(site: Site) -> None:
    with anthropic.Anthropic(base_url=site.url, api_key=ALPHA.proxy_key, max_retries=0) as alpha:
        alpha.files.upload(file=("notes.txt", b"hello"))
        for _ in range(3):
            alpha.files.list()
    with site.sign_in(ALPHA.proxy_key) as client:
        page = client.get("/ui/")
    assert page.status_code == 200
    today = datetime.now(UTC).date()
    usage = httpx.get(f"{site.url}/admin/usage", headers={"x-api-key": ADMIN_KEY}).json()
    expected = {name: 0 for name in usage["counters"]}
    for row in usage["rows"]:
        if row["tenant"] == "alpha":
            expected = {name: expected[name] + row[name] for name in expected}

    totals = cells(page.text, 'data-row="totals"')
    assert {name: int(totals[name]) for name in expected} == expected
    assert expected["requests"] >= 4 and expected["uploads"] >= 1
    assert float(totals["hit_ratio"]) == pytest.approx(
        expected["cache_hits"] / expected["requests"], abs=1e-4
    )
    assert cells(page.text, f'data-day="{today.isoformat()}"')["requests"] == totals["requests"]
    assert page.text.count("<tr data-day=") == today.day  # this month so far, one row per day
    assert page.text.count("<svg") == 2
    assert "Team alpha" in page.text and "bravo" not in page.text


def test_a_team_cannot_open_another_teams_page_by_editing_the_url(site: Site) -> None:
    site.simulator.add_file(BRAVO.upstream_key, filename="bravo-only-plan.pdf")
    with site.sign_in(ALPHA.proxy_key) as client:
        for query in ("team=bravo", "team=bravo&page=page_x", "team=nobody", "team=admin"):
            answer = client.get(f"/ui/?{query}")
            assert answer.status_code == 404, query
            assert "bravo-only-plan" not in answer.text and "data-counter" not in answer.text
        own = client.get("/ui/?team=alpha")
    assert own.status_code == 200 and "bravo-only-plan" not in own.text


def test_the_admin_sees_every_team_with_links_and_the_requests_saved(site: Site) -> None:
    with anthropic.Anthropic(base_url=site.url, api_key=BRAVO.proxy_key, max_retries=0) as bravo:
        bravo.files.list()
        bravo.files.list()
    with site.sign_in(ADMIN_KEY) as client:
        page = client.get("/ui/")
        team = client.get("/ui/?team=bravo")
        unknown = client.get("/ui/?team=nobody")
    usage = httpx.get(f"{site.url}/admin/usage", headers={"x-api-key": ADMIN_KEY}).json()
    hits = sum(row["cache_hits"] for row in usage["rows"])

    assert page.status_code == 200 and "All teams" in page.text
    for name in ("alpha", "bravo"):
        assert f'<tr data-team="{name}">' in page.text
        assert re.search(rf'href="/ui/\?team={name}&amp;since=[0-9-]+&amp;until=[0-9-]+"', page.text)
    assert int(cells(page.text, 'data-row="totals"')["cache_hits"]) == hits >= 1
    assert f'data-summary="saved" data-value="{hits}"' in page.text
    assert "saved = cache hits" in page.text
    assert team.status_code == 200 and "Team bravo" in team.text and "All teams" in team.text
    assert unknown.status_code == 404


def test_files_are_listed_in_pages_through_the_proxys_cache_and_escaped(own_site: Site) -> None:
    for n in range(22):
        own_site.simulator.add_file(ALPHA.upstream_key, filename=f"report-{n:02}.csv", size_bytes=2048)
    own_site.simulator.add_file(ALPHA.upstream_key, filename='<img src=x onerror="alert(1)">.txt')
    own_site.simulator.received.clear()
    with own_site.sign_in(ALPHA.proxy_key) as client:
        first = client.get("/ui/")
        again = client.get("/ui/")
        later = re.search(r'<a rel="next" href="([^"]+)#files"', first.text)
        assert later, "no next page link"
        second = client.get(later[1].replace("&amp;", "&"))

    lists = [r for r in own_site.simulator.received if r.method == "GET" and r.path == "/v1/files"]
    assert len(lists) == 2  # the first page once (the second view was a hit), then the next page
    assert lists[0].header("anthropic-version") == SDK_VERSION and lists[0].header("anthropic-beta") is None
    assert first.text.count('<td class="name">') == 20 and again.text == first.text
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.txt" in first.text
    assert "<img" not in first.text
    assert "report-21.csv" in first.text and "2.0 KiB" in first.text
    assert "First page" in second.text and "report-00.csv" in second.text


def test_sign_out_ends_the_session_also_for_a_copy_of_the_cookie(site: Site) -> None:
    with site.sign_in(ALPHA.proxy_key) as client:
        copied = dict(client.cookies)
        assert client.get("/ui/").status_code == 200
        answer = client.post("/ui/logout")
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/login"
        assert (
            'fp_ui_session=""' in answer.headers["set-cookie"] or "Max-Age=0" in answer.headers["set-cookie"]
        )
    with httpx.Client(base_url=site.url, cookies=copied) as replay:
        assert replay.get("/ui/").headers["location"] == "/ui/login"


def test_a_session_made_with_a_key_rotated_away_by_a_reload_ends(own_site: Site) -> None:
    with own_site.sign_in(ALPHA.proxy_key) as old, own_site.sign_in(ADMIN_KEY) as admin:
        rotating = replace(
            ALPHA.tenant(), client_key_hashes=frozenset({hash_key(ALPHA.proxy_key), hash_key(ROTATED_KEY)})
        )
        own_site.reload(replace(own_site.settings, tenants=(rotating, BRAVO.tenant())))
        assert old.get("/ui/").status_code == 200  # both keys configured: the session stays
        with own_site.sign_in(ROTATED_KEY) as new:
            rotated = replace(rotating, client_key_hashes=frozenset({hash_key(ROTATED_KEY)}))
            own_site.reload(replace(own_site.settings, tenants=(rotated, BRAVO.tenant())))

            assert old.get("/ui/").headers["location"] == "/ui/login"
            assert new.get("/ui/").status_code == 200
            assert admin.get("/ui/").status_code == 200
            own_site.reload(
                replace(own_site.settings, admin=AdminConfig(key_sha256=hash_key("fp-new-admin")))
            )
            assert admin.get("/ui/").headers["location"] == "/ui/login"


def test_repeated_failed_sign_ins_from_one_address_are_refused_for_a_while(own_site: Site) -> None:
    with own_site.client() as client:
        for _ in range(5):
            assert client.post("/ui/login", data={"key": "fp-guess"}).status_code == 401
        refused = client.post("/ui/login", data={"key": ALPHA.proxy_key})
    assert refused.status_code == 429
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert "Too many failed sign-ins" in refused.text and "set-cookie" not in refused.headers


@pytest.mark.parametrize(
    "origin", [pytest.param("https://evil.example", id="other-site"), pytest.param("null", id="null")]
)
def test_a_post_from_another_site_is_refused(site: Site, origin: str) -> None:
    with site.client() as client:
        answer = client.post("/ui/login", data={"key": ALPHA.proxy_key}, headers={"origin": origin})
    assert answer.status_code == 403 and "set-cookie" not in answer.headers


def test_a_bad_range_falls_back_to_this_month_with_a_message(site: Site) -> None:
    with site.sign_in(ALPHA.proxy_key) as client:
        reversed_range = client.get("/ui/?since=2026-02-10&until=2026-02-01")
        not_a_date = client.get("/ui/?since=yesterday")
        too_long = client.get("/ui/?since=2020-01-01&until=2026-01-01")
        february = client.get("/ui/?since=2026-02-01&until=2026-02-28")
    assert "ends before it starts" in reversed_range.text
    assert "YYYY-MM-DD" in not_a_date.text
    assert "at most 400 days" in too_long.text
    assert february.text.count("<tr data-day=") == 28 and 'value="2026-02-01"' in february.text


def test_the_form_body_is_bounded(site: Site) -> None:
    with site.client() as client:
        answer = client.post("/ui/login", data={"key": "k" * 5000})
        many = client.post(
            "/ui/login",
            content="&".join(f"f{n}=1" for n in range(50)),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert answer.status_code == 401 and many.status_code == 401


def test_the_ui_section_of_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        config_toml("https://api.anthropic.com", "[ui]\nsecure_cookies = true\nsession_ttl_s = 3600\n")
    )
    assert load_settings(path, team_environment()).ui == UiConfig(secure_cookies=True, session_ttl_s=3600)
    path.write_text(config_toml("https://api.anthropic.com"))
    assert load_settings(path, team_environment()).ui == UiConfig(secure_cookies=False, session_ttl_s=28800)
    for section, problem in (
        ("colour = 1", "ui.colour: unknown key"),
        ("session_ttl_s = 5", "ui.session_ttl_s"),
    ):
        path.write_text(config_toml("https://api.anthropic.com", f"[ui]\n{section}\n"))
        with pytest.raises(ConfigError, match=problem):
            load_settings(path, team_environment())


def test_the_example_config_lists_the_ui_keys_with_their_defaults() -> None:
    example = tomllib.loads((Path(__file__).resolve().parent.parent / "config.example.toml").read_text())
    assert UiConfig.model_validate(example["ui"]) == UiConfig()
    assert sorted(example["ui"]) == sorted(UiConfig.model_fields)


DAYS = {
    date(2026, 11, 1): {"requests": 4, "cache_hits": 1},
    date(2026, 11, 2): {"requests": 6, "cache_hits": 5},
}


def test_the_storage_section_appears_only_when_storage_is_known() -> None:
    view = TeamView("alpha", date(2026, 11, 1), date(2026, 11, 2), DAYS, FilesPage(), None, admin=False)
    without = team_page(view, "team alpha")
    held = StorageRow("alpha", files=3, bytes=3 * 1024 * 1024, quota_bytes=10 * 1024 * 1024, max_files=100)
    with_storage = team_page(replace(view, storage=held), "team alpha")

    assert 'data-section="storage"' not in without and "storage_bytes" not in without
    assert 'data-section="storage"' in with_storage
    assert 'data-counter="storage_bytes" data-value="3145728">3.0 MiB of 10.0 MiB' in with_storage
    assert 'data-counter="storage_files" data-value="3">3 of 100' in with_storage
    assert cells(without, 'data-row="totals"') == {
        "requests": "10",
        "cache_hits": "6",
        "hit_ratio": "0.6000",
        "uploads": "0",
        "upload_bytes": "0",
        "downloads": "0",
        "download_bytes": "0",
        "deletes": "0",
        "errors": "0",
    }


def test_the_admin_table_gets_storage_columns_only_when_storage_is_known() -> None:
    teams = {"alpha": {"requests": 10}, "bravo": {"requests": 2}}
    view = AdminView(date(2026, 11, 1), date(2026, 11, 2), DAYS, teams, None)
    without = admin_page(view, "admin")
    with_storage = admin_page(
        replace(view, storage={"alpha": StorageRow("alpha", 2, 2048, None, None)}), "admin"
    )

    assert "storage_" not in without
    assert 'data-counter="storage_bytes" data-value="2048">2.0 KiB</td>' in with_storage
    assert cells(with_storage, 'data-team="bravo"')["requests"] == "2"
    assert cells(with_storage, 'data-row="totals"')["requests"] == "12"


def test_a_storage_source_fills_the_admin_views_storage_columns() -> None:
    """The seam for storage per team (issue 16): rows from the source, shown beside the usage."""
    settings = Site.settings_for("http://127.0.0.1:9")  # upstream never called: no team view here
    store = RedisStore(fakeredis.FakeAsyncRedis())
    cache = ResponseCache(CachePolicy(settings.cache), store, collapse_timeout_s=1)
    ownership = Ownership(store, settings)
    handler = FilesHandler(settings, store, UpstreamClient(settings.upstream), cache, ownership)

    async def storage() -> list[StorageRow]:
        return [StorageRow("alpha", 3, 5000, 10_000, None), StorageRow("bravo", 1, 1000, None, 10)]

    page = UsagePage(lambda: settings, store, UsageCounter(store), handler, storage=storage)
    routes = [
        Route(r.path, endpoint, methods=[m]) for r in page.routes() for m, endpoint in r.methods.items()
    ]
    with TestClient(Starlette(routes=routes), follow_redirects=False) as client:
        assert client.post("/ui/login", data={"key": ADMIN_KEY}).status_code == 303
        html = client.get("/ui/").text

    assert cells(html, 'data-team="alpha"')["storage_bytes"] == "5000"
    assert cells(html, 'data-team="bravo"')["storage_files"] == "1"
    assert cells(html, 'data-row="totals"')["storage_bytes"] == "6000"
    assert "1 of 10" in html and "4.9 KiB of 9.8 KiB" in html
