"""Files have owners (issue 16), end to end: redis-server, the simulator and the official SDK.

Three tenants share one Anthropic key (red and blue `own` by default, green `all`); solo has its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import anthropic
import httpx
import pytest
import redis

from files_api_simulator import Simulator
from proxy.app import create_app
from proxy.cli import main
from proxy.config import Settings, hash_key, load_settings
from tests.constants import ADMIN_KEY, FILES_BETA, SDK_VERSION
from tests.support import RedisServer, Served, free_port, served_proxy, wait_for

SHARED_KEY, SOLO_KEY = "sk-ant-test-shared-5c0ffee", "sk-ant-test-solo-b1eed"
TEAMS = {"red": "fp-test-red-1a2b", "blue": "fp-test-blue-3c4d", "green": "fp-test-green-5e6f"}
SOLO = "fp-test-solo-7a8b"
ENVIRON = {"KEY_SHARED": SHARED_KEY, "KEY_SOLO": SOLO_KEY}


def config_text(upstream: str, store: str, ownership: str = "", tenants: dict[str, str] | None = None) -> str:
    lines = [
        f'[upstream]\nbase_url = "{upstream}"\nread_timeout_s = 5\n',
        f'[cache]\nurl = "{store}"\nlocal_ttl_s = 0\n',
        f'[admin]\nkey_sha256 = "{hash_key(ADMIN_KEY)}"\n',
        f"[ownership]\nstorage_refresh_s = 0.2\n{ownership}",
    ]
    settings = {"red": "", "blue": "", "green": 'files = "all"\n', **(tenants or {})}
    for name, key in TEAMS.items():
        lines.append(
            f'[[tenants]]\nname = "{name}"\nworkspace = "{name}-ws"\napi_key_env = "KEY_SHARED"\n'
            f'client_key_sha256 = ["{hash_key(key)}"]\n{settings[name]}'
        )
    lines.append(
        f'[[tenants]]\nname = "solo"\nworkspace = "solo-ws"\napi_key_env = "KEY_SOLO"\n'
        f'client_key_sha256 = ["{hash_key(SOLO)}"]\n'
    )
    return "\n".join(lines)


@dataclass
class World:
    simulator: Simulator
    upstream: str
    redis: RedisServer
    config: Path
    proxies: list[Served]

    @property
    def url(self) -> str:
        return self.proxies[0].url

    def start_proxy(self) -> str:
        served = served_proxy(self.settings()).__enter__()
        self.proxies.append(served)
        return served.url

    def settings(self) -> Settings:
        return load_settings(self.config, ENVIRON)

    def client(self, team: str, url: str | None = None) -> anthropic.Anthropic:
        key = TEAMS.get(team, SOLO)
        return anthropic.Anthropic(base_url=url or self.url, api_key=key, max_retries=0)

    def upload(self, team: str, name: str, data: bytes = b"x" * 10) -> str:
        with self.client(team) as client:
            return client.files.upload(file=(name, data, "text/plain")).id

    def cli(self, *args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
        for name, value in ENVIRON.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        assert main([*args, "--config", str(self.config)]) == 0
        return capsys.readouterr().out

    def upstream_paths(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.simulator.received]


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., World]]:
    made: list[tuple[World, Served]] = []

    def make(ownership: str = "", store: str | None = None, **tenants: str) -> World:
        simulator = Simulator(keys={SHARED_KEY: "wrkspc_shared", SOLO_KEY: "wrkspc_solo"})
        upstream = Served(simulator.app).__enter__()
        redis = RedisServer(free_port())
        redis.start()
        config = tmp_path / "proxy.toml"
        config.write_text(config_text(upstream.url, store or redis.url, ownership, tenants))
        world = World(simulator, upstream.url, redis, config, [])
        made.append((world, upstream))
        world.start_proxy()
        return world

    yield make
    for world, upstream in made:
        for served in world.proxies:
            served.__exit__(None, None, None)
        upstream.__exit__(None, None, None)
        world.redis.stop()


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    return make_world()


def test_own_listing_is_exactly_own_uploads_across_pages(world: World) -> None:
    """With limit=2, red's pages 2 and 3 upstream hold none of its files: the proxy reads on, and
    auto-pagination (GA and beta) yields exactly red's uploads; green sees everything."""
    red = [world.upload("red", "r1"), world.upload("red", "r2")]
    blue = [world.upload("blue", f"b{i}") for i in range(4)]
    red.append(world.upload("red", "r3"))
    unowned = world.simulator.add_file(SHARED_KEY, filename="made-upstream.bin")
    for team, expected in (("red", red), ("blue", blue)):
        with world.client(team) as client:
            assert [f.id for f in client.files.list(limit=2)] == list(reversed(expected))
            assert [f.id for f in client.beta.files.list(limit=2)] == list(reversed(expected))
        assert beta_walk(world.url, TEAMS[team], limit=2) == list(reversed(expected))
    with world.client("green") as client:
        assert {f.id for f in client.files.list(limit=2)} == {*red, *blue, unowned}
    with world.client("solo") as client:
        assert list(client.files.list()) == []


_SDK_1_1 = Path(__file__).resolve().parent.parent / ".venv-sdk-1.1" / "bin" / "python"


def test_python_sdk_1_1_beta_auto_pagination_yields_exactly_the_teams_files(world: World) -> None:
    """The real SDK 1.1 (its own venv, made by scripts/ensure-python-sdk-1.1), whose beta pagination
    follows `last_id` and stops on an empty page: two upstream pages hold none of red's files."""
    assert _SDK_1_1.exists(), "run scripts/ensure-python-sdk-1.1"
    red = [world.upload("red", "r1"), world.upload("red", "r2")]
    blue = [world.upload("blue", f"b{i}") for i in range(4)]
    red.append(world.upload("red", "r3"))
    for team, expected in (("red", red), ("blue", blue)):
        listed = subprocess.run(
            [str(_SDK_1_1), str(Path(__file__).parent / "sdk11" / "list_files.py"), world.url, "2"],
            env={**os.environ, "FILES_PROXY_KEY": TEAMS[team]},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(listed.stdout) == list(reversed(expected)), team


def beta_walk(url: str, key: str, limit: int) -> list[str]:
    """Auto-pagination of the beta list as SDK 1.1 does it (`SyncPage`): `after_id` = `last_id`, and
    it stops at `has_more: false` or an empty page."""
    headers = {"x-api-key": key, "anthropic-version": SDK_VERSION, "anthropic-beta": FILES_BETA}
    seen: list[str] = []
    params: dict[str, str | int] = {"limit": limit, "beta": "true"}
    while True:
        page = httpx.get(f"{url}/v1/files", params=params, headers=headers).json()
        seen += [f["id"] for f in page["data"]]
        if not page["data"] or page["has_more"] is False or not page["last_id"]:
            return seen
        params["after_id"] = page["last_id"]


def test_one_upstream_page_serves_every_tenant_on_the_key(world: World) -> None:
    world.upload("red", "r1")
    world.upload("blue", "b1")
    world.simulator.received.clear()
    for team in ("red", "blue", "green", "red"):
        with world.client(team) as client:
            client.files.list(limit=5)
    assert world.upstream_paths() == ["GET /v1/files"]


def test_beta_before_id_pages_towards_newer_files(world: World) -> None:
    red = [world.upload("red", "r1")]
    blue = [world.upload("blue", f"b{i}") for i in range(3)]
    red.append(world.upload("red", "r2"))
    headers = {"x-api-key": TEAMS["red"], "anthropic-version": SDK_VERSION, "anthropic-beta": FILES_BETA}
    page = httpx.get(f"{world.url}/v1/files", params={"limit": 1, "before_id": red[0]}, headers=headers)
    body = page.json()
    assert [f["id"] for f in body["data"]] == [red[1]]
    assert body["has_more"] is False and body["first_id"] == red[1]
    assert blue


def test_ga_ids_list_answers_only_owned_ids(world: World) -> None:
    mine, theirs = world.upload("red", "r1"), world.upload("blue", "b1")
    query = f"ids[]={mine}&ids[]={theirs}"
    headers = {"x-api-key": TEAMS["red"], "anthropic-version": SDK_VERSION}
    answer = httpx.get(f"{world.url}/v1/files?{query}", headers=headers)
    assert [f["id"] for f in answer.json()["data"]] == [mine]


def test_cross_team_metadata_download_delete_are_404_and_reach_no_upstream(world: World) -> None:
    theirs = world.upload("blue", "b1")
    unowned = world.simulator.add_file(SHARED_KEY, filename="made-upstream.bin")
    headers = {"x-api-key": SHARED_KEY, "anthropic-version": SDK_VERSION}
    missing = httpx.get(f"{world.upstream}/v1/files/file_missing", headers=headers).json()
    assert missing["error"] == {"type": "not_found_error", "message": "File not found: file_missing"}
    world.simulator.received.clear()
    with world.client("red") as client:
        for file_id in (theirs, unowned):
            calls: list[Callable[[], object]] = [
                partial(client.files.retrieve_metadata, file_id),
                partial(client.files.download, file_id),
                partial(client.files.delete, file_id),
                partial(client.beta.files.retrieve_metadata, file_id, betas=[FILES_BETA]),
            ]
            for call in calls:
                with pytest.raises(anthropic.NotFoundError) as raised:
                    call()
                # The shape of the upstream's own answer for a file that does not exist.
                assert isinstance(raised.value.body, dict)
                assert raised.value.body.keys() == missing.keys()
                assert raised.value.body["error"] == {
                    "type": "not_found_error",
                    "message": f"File not found: {file_id}",
                }
    assert world.upstream_paths() == []
    with world.client("green") as client:
        assert client.files.retrieve_metadata(theirs).id == theirs
        assert client.files.retrieve_metadata(unowned).id == unowned
    with world.client("blue") as client:
        assert client.files.retrieve_metadata(theirs).id == theirs
        client.files.delete(theirs)


def test_storage_in_usage_and_metrics_follows_uploads_and_deletes(world: World) -> None:
    first = world.upload("red", "r1", b"a" * 100)
    world.upload("red", "r2", b"b" * 50)
    world.upload("green", "g1", b"c" * 7)
    with world.client("red") as client:
        client.files.delete(first)
    usage = httpx.get(f"{world.url}/admin/usage", headers={"x-api-key": ADMIN_KEY}).json()
    by_team = {row["tenant"]: row for row in usage["storage"]}
    assert by_team["red"] == {
        "workspace": "red-ws",
        "tenant": "red",
        "files": 1,
        "bytes": _uploaded_size(world, "r2"),
        "quota_bytes": None,
        "max_files": None,
    }
    assert by_team["green"]["files"] == 1 and by_team["blue"]["files"] == 0
    assert by_team["solo"]["files"] == 0

    def gauge_shows() -> bool:
        metrics = httpx.get(f"{world.url}/metrics").text
        return 'files_proxy_storage_files{tenant="red",workspace="red-ws"} 1.0' in metrics

    wait_for(gauge_shows, what="storage gauge")


def _uploaded_size(world: World, filename: str) -> int:
    with world.client("green") as client:
        return next(f.size_bytes for f in client.files.list() if f.filename == filename)


def test_usage_command_prints_storage(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    world.upload("blue", "b1", b"z" * 30)
    report = json.loads(world.cli("usage", "--json", monkeypatch=monkeypatch, capsys=capsys))
    blue = next(row for row in report["storage"] if row["tenant"] == "blue")
    assert blue["files"] == 1 and blue["workspace"] == "blue-ws"
    table = world.cli("usage", monkeypatch=monkeypatch, capsys=capsys)
    assert "Storage now" in table and "blue-ws" in table


def test_adopt_assigns_unowned_files(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one = world.simulator.add_file(SHARED_KEY, filename="one.bin", size_bytes=11)
    two = world.simulator.add_file(SHARED_KEY, filename="two.bin", size_bytes=22)
    theirs = world.upload("blue", "b1")
    out = world.cli("files", "adopt", "--tenant", "red", one, theirs, monkeypatch=monkeypatch, capsys=capsys)
    assert f"{one}: adopted by red" in out and f"{theirs}: owned by blue" in out
    with world.client("red") as client:
        assert [f.id for f in client.files.list()] == [one]
    world.cli("files", "adopt", "--tenant", "red", "--unowned", monkeypatch=monkeypatch, capsys=capsys)
    with world.client("red") as client:
        assert [f.id for f in client.files.list()] == [two, one]
    with world.client("blue") as client:
        assert [f.id for f in client.files.list()] == [theirs]


def test_reconcile_drops_files_deleted_upstream_and_expired(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = world.upload("red", "kept", b"k" * 5)
    gone = world.upload("red", "gone", b"g" * 5)
    soon = world.simulator.add_file(
        SHARED_KEY, filename="soon.bin", size_bytes=9, expires_at=datetime.now(UTC) + timedelta(seconds=1)
    )
    world.cli("files", "adopt", "--tenant", "blue", soon, monkeypatch=monkeypatch, capsys=capsys)
    world.simulator.add_file(SHARED_KEY, filename="stray.bin", size_bytes=13)
    deleted = httpx.delete(
        f"{world.upstream}/v1/files/{gone}",
        headers={"x-api-key": SHARED_KEY, "anthropic-version": SDK_VERSION},
    )
    assert deleted.status_code == 200
    time.sleep(1.2)
    out = world.cli("reconcile", monkeypatch=monkeypatch, capsys=capsys)
    assert "red: 1 files" in out and "unowned: 1 files, 13 bytes" in out
    assert f"dropped {gone} (red" in out
    usage = httpx.get(f"{world.url}/admin/usage", headers={"x-api-key": ADMIN_KEY}).json()
    by_team = {row["tenant"]: row for row in usage["storage"]}
    assert by_team["red"]["files"] == 1 and by_team["blue"]["files"] == 0
    with world.client("red") as client:
        assert [f.id for f in client.files.list()] == [kept]


def test_quota_refuses_before_upstream_and_frees_on_delete(make_world: Callable[..., World]) -> None:
    world = make_world(red="max_files = 2\n", blue="storage_quota_bytes = 600\n")
    first = world.upload("red", "r1")
    world.upload("red", "r2")
    world.simulator.received.clear()
    with world.client("red") as client:
        with pytest.raises(anthropic.PermissionDeniedError) as raised:
            client.files.upload(file=("r3", b"x", "text/plain"))
        assert "team red" in raised.value.message and "at most 2 files" in raised.value.message
        assert world.upstream_paths() == []
        client.files.delete(first)
        client.files.upload(file=("r3", b"x", "text/plain"))
    with world.client("blue") as client:
        with pytest.raises(anthropic.PermissionDeniedError) as raised:
            client.files.upload(file=("big", b"x" * 700, "text/plain"))
        message = raised.value.message
        assert "team blue" in message and "600 bytes" in message and "0 bytes are used" in message
        client.files.upload(file=("small", b"x" * 100, "text/plain"))


def test_upload_without_content_length_is_cut_at_the_quota_left(make_world: Callable[..., World]) -> None:
    world = make_world(blue="storage_quota_bytes = 1000\n")

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"--b\r\n" + b"x" * 100

    headers = {
        "x-api-key": TEAMS["blue"],
        "anthropic-version": SDK_VERSION,
        "content-type": "multipart/form-data; boundary=b",
    }
    answer = httpx.post(f"{world.url}/v1/files", content=chunks(), headers=headers)
    assert answer.status_code == 403
    assert answer.json()["error"]["type"] == "permission_error"
    with world.client("green") as client:
        assert list(client.files.list()) == []


def test_two_replicas_racing_uploads_never_pass_the_quota(make_world: Callable[..., World]) -> None:
    world = make_world(red="max_files = 3\n")
    second = world.start_proxy()
    outcomes: list[str] = []

    def upload(url: str, n: int) -> None:
        with world.client("red", url) as client:
            try:
                client.files.upload(file=(f"r{n}", b"x" * 10, "text/plain"))
                outcomes.append("ok")
            except anthropic.PermissionDeniedError:
                outcomes.append("refused")

    threads = [
        threading.Thread(target=upload, args=(url, n)) for n in range(6) for url in (world.url, second)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("ok") == 3 and outcomes.count("refused") == 9
    with world.client("green") as client:
        assert len(list(client.files.list())) == 3


def test_store_away_refuses_own_tenants_and_holds_all_tenants_records(world: World) -> None:
    mine = world.upload("red", "r1")
    world.redis.stop()
    world.simulator.received.clear()
    with world.client("red") as client:
        for call in (
            lambda: client.files.retrieve_metadata(mine),
            lambda: client.files.upload(file=("r2", b"x", "text/plain")),
            lambda: client.files.list(),  # the shared page may be fetched, never shown unfiltered
        ):
            with pytest.raises(anthropic.InternalServerError) as raised:
                call()
            assert raised.value.status_code == 503
    assert "POST /v1/files" not in world.upstream_paths()
    assert f"GET /v1/files/{mine}" not in world.upstream_paths()
    with world.client("green") as client:
        held = client.files.upload(file=("g1", b"y" * 4, "text/plain")).id
    world.redis.start()

    def counted() -> bool:
        usage = httpx.get(f"{world.url}/admin/usage", headers={"x-api-key": ADMIN_KEY})
        if usage.status_code != 200:
            return False
        return any(r["tenant"] == "green" and r["files"] == 1 for r in usage.json()["storage"])

    wait_for(counted, seconds=15, what="the held owner record written")
    with world.client("red") as client:
        assert [f.id for f in client.files.list()] == []  # the store restarted empty: red's record is gone
    assert held


def test_startup_log_names_tenants_sharing_a_key(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="proxy.ownership")
    create_app(world.settings())
    shared = [r.getMessage() for r in caplog.records if "sharing one Anthropic key" in r.getMessage()]
    assert shared == ["tenants sharing one Anthropic key (files: red=own, blue=own, green=all)"]


def test_the_proxy_reconciles_by_itself_one_replica_per_interval(make_world: Callable[..., World]) -> None:
    world = make_world(ownership="reconcile_interval_s = 1\n")
    world.start_proxy()
    gone = world.upload("red", "gone")
    headers = {"x-api-key": SHARED_KEY, "anthropic-version": SDK_VERSION}
    assert httpx.delete(f"{world.upstream}/v1/files/{gone}", headers=headers).status_code == 200

    def dropped() -> bool:
        usage = httpx.get(f"{world.url}/admin/usage", headers={"x-api-key": ADMIN_KEY}).json()
        return next(r["files"] for r in usage["storage"] if r["tenant"] == "red") == 0

    wait_for(dropped, seconds=15, what="the record of a file deleted upstream dropped")
    lock_ttl_ms = redis.Redis.from_url(world.redis.url).pttl("fp:own:reconcile-lock")
    assert 0 < lock_ttl_ms <= 1000


def test_memory_store_keeps_ownership_per_process(make_world: Callable[..., World]) -> None:
    world = make_world(store="memory://")
    mine, theirs = world.upload("red", "r1"), world.upload("blue", "b1")
    with world.client("red") as client:
        assert [f.id for f in client.files.list()] == [mine]
        with pytest.raises(anthropic.NotFoundError):
            client.files.retrieve_metadata(theirs)
    other = world.start_proxy()  # another process's memory://: no records, so nothing is red's there
    with world.client("red", other) as client:
        assert list(client.files.list()) == []


def test_usage_page_shows_storage_and_only_the_teams_own_files(world: World) -> None:
    world.upload("red", "red-report.txt", b"q" * 20)
    world.upload("blue", "blue-secret.txt")
    with httpx.Client(base_url=world.url, follow_redirects=True) as browser:
        assert browser.post("/ui/login", data={"key": TEAMS["red"]}).status_code == 200
        page = browser.get("/ui/").text
    assert 'data-counter="storage_files" data-value="1"' in page
    assert "red-report.txt" in page and "blue-secret.txt" not in page


_TS = Path(__file__).parent / "ts"


def test_typescript_sdk_auto_pagination_yields_exactly_the_teams_files(world: World) -> None:
    """`@anthropic-ai/sdk` under node, as scripts/ensure-ts-sdk installs them (README's test command)."""
    assert (_TS / "node_modules" / "@anthropic-ai" / "sdk").is_dir(), "run scripts/ensure-ts-sdk"
    red = [world.upload("red", "r1")]
    blue = [world.upload("blue", f"b{i}") for i in range(4)]
    red.append(world.upload("red", "r2"))
    for api in ("ga", "beta"):
        for team, expected in (("red", red), ("blue", blue)):
            listed = subprocess.run(
                ["node", str(_TS / "list_files.mjs"), world.url, api, "2"],
                env={**os.environ, "FILES_PROXY_KEY": TEAMS[team]},
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert json.loads(listed.stdout) == list(reversed(expected)), (api, team)


def test_a_failed_upload_releases_its_reservation(make_world: Callable[..., World]) -> None:
    world = make_world(blue="storage_quota_bytes = 1000\n")
    world.simulator.inject_fault(status=500, method="POST")
    with world.client("blue") as client:
        with pytest.raises(anthropic.InternalServerError):
            client.files.upload(file=("big", b"x" * 600, "text/plain"))
        client.files.upload(file=("big", b"x" * 600, "text/plain"))  # refused if 600 were still held
        with pytest.raises(anthropic.PermissionDeniedError):
            client.files.upload(file=("more", b"x" * 600, "text/plain"))
    reservations = redis.Redis.from_url(world.redis.url).keys("fp:*:resv")
    assert all(not redis.Redis.from_url(world.redis.url).hlen(key) for key in reservations)


def test_check_config_shows_each_teams_files_mode(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = world.cli("check-config", monkeypatch=monkeypatch, capsys=capsys)
    assert "tenant red: workspace red-ws, 1 proxy key(s), files own" in out
    assert "tenant green: workspace green-ws, 1 proxy key(s), files all" in out
    assert "tenant solo: workspace solo-ws, 1 proxy key(s), files all" in out


def test_reconcile_says_why_when_upstream_is_unreachable(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "unreachable.toml"
    config.write_text(config_text(f"http://127.0.0.1:{free_port()}", world.redis.url))
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    assert main(["reconcile", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("files-proxy: reconcile: ") and SHARED_KEY not in error
