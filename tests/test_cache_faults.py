"""The cache keeps its promises through faults (issue 15): odd but valid requests, a partition from
Redis (a TCP relay the test cuts), a slow Redis, a wiped Redis, two replicas and a restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from files_api_simulator import Simulator
from proxy.cache import CachePolicy, TargetKind, target_for
from proxy.caching import ResponseCache
from proxy.config import CacheConfig, Settings
from proxy.reply import Reply
from proxy.store import CacheUnavailableError, CircuitBreaker, open_store
from proxy.writes import Delete, Write
from tests.constants import ALPHA, BETA_HEADERS, GA_HEADERS, SDK_GA_HEADERS, VERSION
from tests.relay import Relay
from tests.support import RedisServer, ScriptedStore, served_proxy, team_settings, wait_for


def _settings(upstream_url: str, cache_url: str, **cache: Any) -> Settings:
    return team_settings(upstream_url, upstream={"read_timeout_s": 5}, cache={"url": cache_url, **cache})


def _is_hit(response: httpx.Response) -> bool:
    return response.headers["cache-status"].startswith("files-proxy; hit")


def _listed(response: httpx.Response) -> set[str]:
    return {item["id"] for item in response.json()["data"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def cached_proxy(serve_proxy: Callable[..., str], cache_url: str) -> str:
    return serve_proxy(cache={"url": cache_url})


def test_a_header_named_in_connection_is_neither_keyed_nor_forwarded(
    cached_proxy: str, simulator: Simulator
) -> None:
    """`Connection: anthropic-beta` makes the beta header hop-by-hop: upstream answers in the GA
    shape, stored under the GA key, and the team's beta clients never get it."""
    file_id = simulator.add_file(ALPHA.upstream_key, filename="hop.bin", downloadable=False)
    nominated = {**BETA_HEADERS, "connection": "anthropic-beta"}
    for path in (f"/v1/files/{file_id}", "/v1/files"):
        first = httpx.get(cached_proxy + path, headers=nominated)
        assert first.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"
        forwarded = [r for r in simulator.received if r.path == path][-1]
        assert forwarded.header("anthropic-beta") is None

        ga = httpx.get(cached_proxy + path, headers=SDK_GA_HEADERS)
        assert _is_hit(ga) and ga.content == first.content
        beta = httpx.get(cached_proxy + path, headers=BETA_HEADERS)
        assert beta.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"
        assert beta.content != first.content


FORMS = [
    pytest.param({}, "", id="plain"),
    pytest.param({"anthropic-workspace-id": ALPHA.upstream_workspace}, "", id="workspace-header"),
    pytest.param({}, "?beta=true", id="beta-query"),
    pytest.param({"anthropic-workspace-id": ALPHA.upstream_workspace}, "?beta=true", id="both"),
]


@pytest.mark.parametrize(("delete_headers", "delete_query"), FORMS)
def test_a_delete_in_any_form_drops_every_form_and_variant(
    cached_proxy: str, simulator: Simulator, delete_headers: dict[str, str], delete_query: str
) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="forms.bin", downloadable=False)
    forms = [
        ({**variant, **extra}, query)
        for variant in (GA_HEADERS, BETA_HEADERS)
        for extra, query in (form.values for form in FORMS)
    ]
    for headers, query in forms:
        for path in (f"/v1/files/{file_id}{query}", f"/v1/files{query}"):
            httpx.get(cached_proxy + path, headers=headers)
            assert _is_hit(httpx.get(cached_proxy + path, headers=headers))

    deleted = httpx.delete(
        f"{cached_proxy}/v1/files/{file_id}{delete_query}", headers={**BETA_HEADERS, **delete_headers}
    )
    assert deleted.status_code == 200

    for headers, query in forms:
        assert httpx.get(f"{cached_proxy}/v1/files/{file_id}{query}", headers=headers).status_code == 404
        assert file_id not in _listed(httpx.get(f"{cached_proxy}/v1/files{query}", headers=headers))


def test_a_delete_held_through_a_partition_is_never_served_by_its_replica_and_reaches_the_others(
    simulator_url: str, redis_server: RedisServer, simulator: Simulator
) -> None:
    """Replica one is cut off from Redis (replica two is not) when it takes a delete. One never serves
    the file again; two cannot know and serves Redis's entry until the partition heals, then within
    the time to write the held delete plus `local_ttl_s`. Then one caches again."""
    with Relay(redis_server.port) as relay:
        one = served_proxy(_settings(simulator_url, relay.url, timeout_s=0.3))
        two = served_proxy(_settings(simulator_url, redis_server.url))
        with one, two:
            file_id = simulator.add_file(ALPHA.upstream_key, filename="held.bin", downloadable=False)
            metadata = f"/v1/files/{file_id}"
            for url in (one.url, two.url, one.url):
                for path in (metadata, "/v1/files"):
                    httpx.get(url + path, headers=GA_HEADERS)
            assert _is_hit(httpx.get(one.url + metadata, headers=GA_HEADERS))

            relay.cut()
            assert httpx.delete(one.url + metadata, headers=GA_HEADERS).status_code == 200
            assert httpx.get(one.url + metadata, headers=GA_HEADERS).status_code == 404
            assert file_id not in _listed(httpx.get(one.url + "/v1/files", headers=GA_HEADERS))
            during = httpx.get(two.url + metadata, headers=GA_HEADERS)
            assert during.status_code == 200 and _is_hit(during)  # the documented bound

            relay.restore()
            # Breaker cool-down (2 s), the writer's retry (0.5 s), then `local_ttl_s` (1 s).
            wait_for(lambda: httpx.get(two.url + metadata, headers=GA_HEADERS).status_code == 404, 10)
            assert file_id not in _listed(httpx.get(two.url + "/v1/files", headers=GA_HEADERS))
            wait_for(lambda: _is_hit(httpx.get(one.url + "/v1/files", headers=GA_HEADERS)), 5)


def test_a_restart_while_the_store_is_away_keeps_held_deletes_in_the_journal(
    simulator_url: str, redis_server: RedisServer, simulator: Simulator, tmp_path: Path
) -> None:
    journal = tmp_path / "held.jsonl"
    with Relay(redis_server.port) as relay:
        partitioned = _settings(simulator_url, relay.url, timeout_s=0.3, journal_path=str(journal))
        with served_proxy(_settings(simulator_url, redis_server.url)) as two:
            file_id = simulator.add_file(ALPHA.upstream_key, filename="journal.bin", downloadable=False)
            metadata = f"/v1/files/{file_id}"
            with served_proxy(partitioned) as one:
                httpx.get(one.url + metadata, headers=GA_HEADERS)
                relay.cut()
                assert httpx.delete(one.url + metadata, headers=GA_HEADERS).status_code == 200
            assert journal.read_bytes()  # stopped gracefully with the delete still held

            with served_proxy(partitioned):
                assert _is_hit(httpx.get(two.url + metadata, headers=GA_HEADERS))
                relay.restore()
                wait_for(lambda: httpx.get(two.url + metadata, headers=GA_HEADERS).status_code == 404, 10)
                wait_for(lambda: journal.read_bytes() == b"", 5, "journal emptied")


async def _file(file_id: str) -> Reply:
    return Reply(200, (), b'{"id":"%s","type":"file"}' % file_id.encode())


def _metadata(scope: str, file_id: str) -> Any:
    return target_for(TargetKind.FILE, scope, None, VERSION, [], file_id, b"")


@pytest.mark.anyio
async def test_while_a_scope_has_held_invalidations_this_replica_neither_reads_nor_fills_it() -> None:
    """The store answers again but the backlog is not written yet: the scope it touches is served as
    a miss (the store still holds what it drops), other scopes read the store as usual."""
    store = ScriptedStore()
    policy = CachePolicy(CacheConfig())
    cache = ResponseCache(policy, store, collapse_timeout_s=1)
    deleted = target_for(TargetKind.FILE, "held", None, VERSION, [], "file_1", b"")
    store.down = True
    await cache.invalidate(deleted, policy.writes_after_delete(deleted))
    release = asyncio.Event()
    store.down, store.hold = False, release
    while store.hold is not None:  # the background writer has the backlog in flight
        await asyncio.sleep(0.01)

    answer = await cache.read(_metadata("held", "file_1"), lambda: _file("file_1"), no_cache=False)
    assert answer.outcome.cache_status() == "files-proxy; fwd=bypass; detail=cache-unavailable"
    assert store.reads[_metadata("held", "file_1").key] == 0
    other = await cache.read(_metadata("free", "file_2"), lambda: _file("file_2"), no_cache=False)
    assert other.outcome.cache_status() == "files-proxy; fwd=uri-miss; stored"

    release.set()
    while cache.held:
        await asyncio.sleep(0.01)
    after = await cache.read(_metadata("held", "file_1"), lambda: _file("file_1"), no_cache=False)
    assert after.outcome.cache_status() == "files-proxy; fwd=uri-miss; stored"
    assert store.reads[_metadata("held", "file_1").key] == 1
    await cache.aclose()


@pytest.mark.anyio
async def test_a_backlog_of_12000_deletes_drains_in_chunks_while_reads_go_on(
    redis_server: RedisServer,
) -> None:
    with Relay(redis_server.port) as relay:
        store = open_store(relay.url, timeout_s=0.2)
        store.breaker = CircuitBreaker(cooldown_s=0.5)
        policy = CachePolicy(CacheConfig())
        cache = ResponseCache(policy, store, collapse_timeout_s=1)
        try:
            assert await store.ping()
            relay.cut()
            targets = [
                target_for(TargetKind.FILE, "backlog", None, VERSION, [], f"file_{n}", b"")
                for n in range(12_000)
            ]
            for target in targets:
                await cache.invalidate(target, policy.writes_after_delete(target))
            assert cache.held == 12_000

            await asyncio.to_thread(relay.restore)
            reads = Counter[str]()
            for _ in range(2_000):  # a guard against a backlog that never drains, not a measure
                if not cache.held:
                    break
                answer = await cache.read(
                    _metadata("other", "file_x"), lambda: _file("file_x"), no_cache=True
                )
                reads[answer.outcome.cache_status()] += 1
                await asyncio.sleep(0.01)
            assert not cache.held, f"{cache.held} still held"

            # Reads went on, and were stored, while the backlog drained: none waited behind it.
            assert reads["files-proxy; fwd=request; stored"] > 0
            client = redis.Redis(port=redis_server.port)
            for target in (targets[0], targets[5_000], targets[-1]):
                assert client.hget(target.key, "~deleted") == b"1"
            client.close()
            resumed = await cache.read(
                _metadata("backlog", "file_new"), lambda: _file("file_new"), no_cache=False
            )
            assert resumed.outcome.cache_status() == "files-proxy; fwd=uri-miss; stored"
        finally:
            await cache.aclose()
            await store.aclose()


def test_one_request_spends_at_most_timeout_s_in_a_slow_store(
    serve_proxy: Callable[..., str], redis_server: RedisServer, simulator: Simulator
) -> None:
    """Redis answering in 0.8 s with `timeout_s = 1`: a hit takes one call (about 0.8 s), and a miss,
    which would make three calls (lookup, generation, fill), stops at the 1 s budget."""
    with Relay(redis_server.port) as relay:
        url = serve_proxy(cache={"url": relay.url, "timeout_s": 1.0, "local_ttl_s": 0})
        cached = simulator.add_file(ALPHA.upstream_key, filename="slow.bin", downloadable=False)
        missed = simulator.add_file(ALPHA.upstream_key, filename="slower.bin", downloadable=False)
        httpx.get(f"{url}/v1/files/{cached}", headers=GA_HEADERS)
        assert _is_hit(httpx.get(f"{url}/v1/files/{cached}", headers=GA_HEADERS))

        relay.delay_s = 0.8
        hit = httpx.get(f"{url}/v1/files/{cached}", headers=GA_HEADERS, timeout=10)
        miss = httpx.get(f"{url}/v1/files/{missed}", headers=GA_HEADERS, timeout=10)

        assert _is_hit(hit)  # one call, within the budget
        # The lookup took 0.8 s of the miss's 1 s; its next call had 0.2 s and gave up, so the miss
        # was answered uncached. With a timeout per call, all three calls would have succeeded.
        assert miss.status_code == 200
        assert miss.headers["cache-status"] == "files-proxy; fwd=bypass; detail=cache-unavailable"


def test_the_breaker_lets_one_probe_through_after_its_cool_down() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, cooldown_s=2, clock=lambda: now[0])
    breaker.failed()
    assert not breaker.allows_call()
    now[0] = 2.0
    assert breaker.allows_call()  # the probe
    assert not breaker.allows_call() and not breaker.allows_call()  # everyone else, meanwhile
    breaker.failed()
    assert not breaker.allows_call()  # another cool-down
    now[0] = 4.0
    assert breaker.allows_call()
    breaker.abandoned()  # the probe was cancelled: another may go
    assert breaker.allows_call()
    breaker.succeeded()
    assert breaker.allows_call() and breaker.allows_call() and not breaker.is_open


@pytest.mark.anyio
async def test_after_a_cool_down_one_request_probes_the_store_not_all(redis_server: RedisServer) -> None:
    with Relay(redis_server.port) as relay:
        store = open_store(relay.url, timeout_s=0.2)
        store.breaker = CircuitBreaker(threshold=1, cooldown_s=0.3)
        outcomes: Counter[str] = Counter()
        store.on_call = lambda outcome: outcomes.update([outcome])
        try:
            assert await store.ping()
            relay.cut()
            assert not await store.ping()  # the breaker opens
            await asyncio.sleep(0.35)
            outcomes.clear()
            results = await asyncio.gather(
                *(store.mget(["fp:{s}:k"]) for _ in range(20)), return_exceptions=True
            )
            assert all(isinstance(result, CacheUnavailableError) for result in results)
            assert outcomes == {"error": 1, "skipped": 19}
        finally:
            await store.aclose()


def test_list_generations_are_never_reused_after_a_wipe(
    serve_proxy: Callable[..., str], redis_server: RedisServer, simulator: Simulator
) -> None:
    """Redis restarts empty (or fails over to a replica that lags): the scope's new generation is
    random, so a page stored under an old one, brought back, is never current again."""
    url = serve_proxy(cache={"url": redis_server.url, "local_ttl_s": 0})
    client = redis.Redis(port=redis_server.port)
    httpx.get(f"{url}/v1/files", headers=GA_HEADERS)
    [generation_key] = client.keys("fp:*:gen")
    [page_key] = client.keys("fp:*:list:*")
    old_generation, old_page = client.get(generation_key), client.get(page_key)
    assert old_page is not None

    client.flushall()
    added = simulator.add_file(ALPHA.upstream_key, filename="after-wipe.bin", downloadable=False)
    assert added in _listed(httpx.get(f"{url}/v1/files", headers=GA_HEADERS))
    assert client.get(generation_key) not in (None, old_generation)

    client.set(page_key, old_page)  # the lagging replica's copy of the old page
    again = httpx.get(f"{url}/v1/files", headers=GA_HEADERS)
    assert not _is_hit(again) and added in _listed(again)
    client.close()


@pytest.mark.anyio
@pytest.mark.parametrize("lost", ["tombstone-evicted", "store-wiped"])
async def test_a_fill_that_raced_a_delete_stores_nothing_once_the_tombstone_is_gone(
    cache_url: str, lost: str
) -> None:
    store = open_store(cache_url)
    policy = CachePolicy(CacheConfig())
    cache = ResponseCache(policy, store, collapse_timeout_s=5)
    metadata = _metadata("raced", "file_r")
    deleted = target_for(TargetKind.FILE, "raced", None, VERSION, [], "file_r", b"")
    fetching, answer_now = asyncio.Event(), asyncio.Event()

    async def slow_fetch() -> Reply:
        fetching.set()
        await answer_now.wait()
        return await _file("file_r")  # read upstream before the delete

    try:
        reading = asyncio.create_task(cache.read(metadata, slow_fetch, no_cache=False))
        await fetching.wait()
        await cache.invalidate(deleted, policy.writes_after_delete(deleted))
        gone: list[Write] = [Delete(metadata.key)]
        if lost == "store-wiped":
            gone.append(Delete(metadata.generation_key))
        await store.write(gone)
        answer_now.set()
        answer = await reading

        assert answer.reply.status == 200  # its own client still gets the answer it asked for
        assert await store.hmget(metadata.key, [metadata.variant]) == [None]
    finally:
        await cache.aclose()
        await store.aclose()
