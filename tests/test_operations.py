"""Running the proxy as a service: graceful shutdown, config reload, replicas, Redis HA forms."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from files_api_simulator import Simulator
from proxy.cache import TargetKind, target_for
from proxy.store import RedisStore, open_store
from proxy.writes import Put
from tests.constants import ADMIN_KEY, ALPHA, BRAVO, FILES_BETA, SDK_VERSION, VERSION
from tests.support import (
    FakeClock,
    ProxyProcess,
    RedisClusterNodes,
    RedisServer,
    free_port,
    served_proxy,
    team_settings,
    wait_for,
)

ROTATED_UPSTREAM_KEY = "sk-ant-test-alpha-rotated-91"
ROTATED_PROXY_KEY = "fp-test-alpha-rotated-5d"


@pytest.fixture
def simulator() -> Simulator:
    """Both of alpha's upstream keys (before and after rotation) belong to alpha's workspace."""
    return Simulator(
        keys={
            ALPHA.upstream_key: ALPHA.upstream_workspace,
            ROTATED_UPSTREAM_KEY: ALPHA.upstream_workspace,
            BRAVO.upstream_key: BRAVO.upstream_workspace,
        }
    )


def _config(upstream_url: str, key_file: Path, proxy_keys: list[str], extra: str = "") -> str:
    hashes = ", ".join(f'"{hashlib.sha256(key.encode()).hexdigest()}"' for key in proxy_keys)
    admin_hash = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    return (
        f'[upstream]\nbase_url = "{upstream_url}"\n\n[server]\nshutdown_grace_s = 20\n\n'
        f'[admin]\nkey_sha256 = "{admin_hash}"\n\n'
        f'[[tenants]]\nname = "alpha"\nworkspace = "alpha-prod"\napi_key_file = "{key_file}"\n'
        f"client_key_sha256 = [{hashes}]\n{extra}"
    )


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """Alpha's Anthropic key, in the file its `api_key_file` names."""
    path = tmp_path / "alpha.key"
    path.write_text(ALPHA.upstream_key)
    return path


@pytest.fixture
def proxy_process(simulator_url: str, tmp_path: Path, key_file: Path) -> Iterator[ProxyProcess]:
    """`files-proxy serve` for alpha alone, whose config file and key file the tests rewrite."""
    config = tmp_path / "proxy.toml"
    config.write_text(_config(simulator_url, key_file, [ALPHA.proxy_key]))
    with ProxyProcess(config, tmp_path / "proxy.out") as proxy:
        yield proxy


def _slow_multipart(size: int, pause_s: float, started: threading.Event) -> Iterator[bytes]:
    yield b'--b\r\ncontent-disposition: form-data; name="file"; filename="slow.bin"\r\n\r\n'
    for _ in range(size // 1000):
        started.set()
        time.sleep(pause_s)
        yield b"z" * 1000
    yield b"\r\n--b--\r\n"


def _upload_in_background(
    url: str, proxy_key: str, started: threading.Event, size: int = 20_000
) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    headers = {
        "x-api-key": proxy_key,
        "anthropic-version": VERSION,
        "content-type": "multipart/form-data; boundary=b",
        "content-length": str(
            len(b'--b\r\ncontent-disposition: form-data; name="file"; filename="slow.bin"\r\n\r\n')
            + size
            + len(b"\r\n--b--\r\n")
        ),
    }

    def upload() -> None:
        body = _slow_multipart(size, 0.05, started)
        answers.append(httpx.post(f"{url}/v1/files", content=body, headers=headers, timeout=30))

    thread = threading.Thread(target=upload)
    thread.start()
    return thread, answers


def test_sigterm_finishes_an_upload_in_flight_then_exits(
    proxy_process: ProxyProcess, simulator: Simulator
) -> None:
    started = threading.Event()
    thread, answers = _upload_in_background(proxy_process.url, ALPHA.proxy_key, started)
    assert started.wait(5)
    port = httpx.URL(proxy_process.url).port
    assert port is not None
    # Opened and never used: closed by the shutdown, not by its header timeout (10 s) much later.
    unused = socket.create_connection(("127.0.0.1", port), timeout=5)
    time.sleep(0.2)

    proxy_process.signal(signal.SIGTERM)
    assert unused.recv(1) == b""
    unused.close()
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(f"{proxy_process.url}/healthz")
    thread.join(timeout=30)

    [answer] = answers
    assert answer.status_code == 200, answer.text
    assert simulator.uploads[answer.json()["id"]][0] == 20_000
    assert proxy_process.stop() == 0


def test_sighup_rotates_keys_and_a_bad_config_keeps_the_running_one(
    proxy_process: ProxyProcess, simulator: Simulator, simulator_url: str, key_file: Path
) -> None:
    def files(proxy_key: str) -> int:
        headers = {"x-api-key": proxy_key, "anthropic-version": VERSION, "cache-control": "no-cache"}
        return httpx.get(f"{proxy_process.url}/v1/files", headers=headers).status_code

    assert (files(ALPHA.proxy_key), files(ROTATED_PROXY_KEY)) == (200, 401)

    # Rotation, step 1: both proxy keys valid, and a new Anthropic key; an upload in flight keeps the old.
    started = threading.Event()
    thread, answers = _upload_in_background(proxy_process.url, ALPHA.proxy_key, started, size=10_000)
    assert started.wait(5)
    key_file.write_text(ROTATED_UPSTREAM_KEY)
    proxy_process.config.write_text(_config(simulator_url, key_file, [ALPHA.proxy_key, ROTATED_PROXY_KEY]))
    proxy_process.signal(signal.SIGHUP)
    wait_for(lambda: files(ROTATED_PROXY_KEY) == 200)
    thread.join(timeout=30)
    assert answers[0].status_code == 200
    [upload] = [r for r in simulator.received if r.method == "POST"]
    assert upload.header("x-api-key") == ALPHA.upstream_key  # the key it started with
    assert any(r.header("x-api-key") == ROTATED_UPSTREAM_KEY for r in simulator.received if r.method == "GET")

    # Step 2: the old proxy key is retired.
    proxy_process.config.write_text(_config(simulator_url, key_file, [ROTATED_PROXY_KEY]))
    proxy_process.signal(signal.SIGHUP)
    wait_for(lambda: files(ALPHA.proxy_key) == 401)

    # A bad config is refused with a log line; the running config stays.
    proxy_process.config.write_text(_config(simulator_url, key_file, [ALPHA.proxy_key], "colour = 1\n"))
    proxy_process.signal(signal.SIGHUP)
    wait_for(lambda: "config reload rejected" in proxy_process.output.read_text())
    assert "tenants[0].colour: unknown key" in proxy_process.output.read_text()
    assert (files(ROTATED_PROXY_KEY), files(ALPHA.proxy_key)) == (200, 401)


def test_admin_reload_applies_a_good_config_and_refuses_a_bad_one(
    proxy_process: ProxyProcess, simulator_url: str, key_file: Path
) -> None:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.post(f"{proxy_process.url}/admin/reload").status_code == 401

    proxy_process.config.write_text(_config(simulator_url, key_file, [ROTATED_PROXY_KEY]))
    good = httpx.post(f"{proxy_process.url}/admin/reload", headers=admin)
    assert good.json() == {"reloaded": True, "tenants": 1}

    proxy_process.config.write_text("not toml [")
    bad = httpx.post(f"{proxy_process.url}/admin/reload", headers=admin)
    assert bad.status_code == 400
    assert "running config stays" in bad.json()["error"]["message"]
    headers = {"x-api-key": ROTATED_PROXY_KEY, "anthropic-version": VERSION}
    assert httpx.get(f"{proxy_process.url}/v1/files", headers=headers).status_code == 200


def test_two_replicas_share_one_redis(simulator_url: str, redis_server: RedisServer) -> None:
    """A page cached by one replica is a hit on the other. A delete through one takes effect on the
    other within `local_ttl_s` (its in-process copy of a hit lives that long), and on the replica
    that made it at once."""
    settings = team_settings(simulator_url, cache={"url": redis_server.url, "local_ttl_s": 2})
    clock = FakeClock()
    with served_proxy(settings, clock=clock) as one, served_proxy(settings, clock=clock) as two:
        with (
            anthropic.Anthropic(base_url=one.url, api_key=ALPHA.proxy_key, max_retries=0) as first,
            anthropic.Anthropic(base_url=two.url, api_key=ALPHA.proxy_key, max_retries=0) as second,
        ):
            uploaded = first.files.upload(file=("shared.txt", b"shared", "text/plain"))
            assert second.files.retrieve_metadata(uploaded.id) == uploaded  # filled by replica one
            assert first.files.retrieve_metadata(uploaded.id) == uploaded  # now copied in replica one
            page = first.files.with_raw_response.list()
            again = second.files.with_raw_response.list()
            assert again.headers["cache-status"].startswith("files-proxy; hit")
            assert again.http_response.content == page.http_response.content
            first.files.list()  # the page is now copied in replica one too

            second.files.delete(uploaded.id)
            with pytest.raises(anthropic.NotFoundError):
                second.files.retrieve_metadata(uploaded.id)
            assert uploaded.id not in {f.id for f in second.files.list()}
            # Replica one still answers from its copy, but only within the bound.
            assert first.files.retrieve_metadata(uploaded.id) == uploaded
            clock.advance(2)
            with pytest.raises(anthropic.NotFoundError):
                first.files.retrieve_metadata(uploaded.id)
            assert uploaded.id not in {f.id for f in first.files.list()}


def test_scope_keys_share_one_cluster_slot(redis_cluster: RedisClusterNodes) -> None:
    """Every key of one scope (generation, list pages, file entries) hashes to one slot."""
    targets = [
        target_for(TargetKind.LIST_PAGE, "scope-a", "wrkspc_1", VERSION, [], None, b"limit=5"),
        target_for(TargetKind.LIST_PAGE, "scope-a", "wrkspc_1", SDK_VERSION, [FILES_BETA], None, b""),
        target_for(TargetKind.FILE, "scope-a", "wrkspc_1", VERSION, [], "file_1", b""),
        target_for(TargetKind.FILE, "scope-a", "wrkspc_1", VERSION, [], "file_2", b""),
    ]
    keys = [t.key for t in targets] + [targets[0].generation_key]
    assert len({redis_cluster.keyslot(key) for key in keys}) == 1


def test_sentinel_url_follows_the_master(tmp_path: Path, redis_server: RedisServer) -> None:
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor files 127.0.0.1 {redis_server.port} 1\n"
        "sentinel down-after-milliseconds files 1000\n"
    )
    with subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL) as sentinel:
        try:

            async def round_trip() -> list[bytes | None]:
                store: RedisStore = open_store(f"redis+sentinel://127.0.0.1:{sentinel_port}/files/0")
                try:
                    for _ in range(50):
                        if await store.ping():
                            break
                        await asyncio.sleep(0.1)
                    await store.write([Put("fp:{s}:k", b"v", 10)])
                    return await store.mget(["fp:{s}:k"])
                finally:
                    await store.aclose()

            assert asyncio.run(round_trip()) == [b"v"]
        finally:
            sentinel.terminate()
