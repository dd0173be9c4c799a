"""One team's share of the store is bounded, and cache traffic never takes usage counters: a capped
number of list pages per scope, uncacheable queries forwarded, counters without TTL that a full
`volatile-lru` Redis keeps, and their retention."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis

from files_api_simulator import Simulator
from proxy.cache import CacheOutcome, CachePolicy, Entry, TargetKind, target_for
from proxy.caching import ResponseCache
from proxy.config import CacheConfig, Tenant
from proxy.exchange import Exchange
from proxy.reply import Reply
from proxy.routes import Operation
from proxy.store import RedisStore, open_store
from proxy.usage import UsageCounter, read_usage
from proxy.writes import Delete, HashIncrement
from tests.constants import ALPHA, BRAVO, VERSION
from tests.support import RedisServer, free_port

UNCACHEABLE = "files-proxy; fwd=bypass; detail=uncacheable-query"


def _list(url: str, team: Any, query: str) -> httpx.Response:
    return httpx.get(
        f"{url}/v1/files?{query}", headers={"anthropic-version": VERSION, "x-api-key": team.proxy_key}
    )


def _list_reads(simulator: Simulator, query: str) -> int:
    return sum(
        1 for r in simulator.received if r.method == "GET" and r.path == "/v1/files" and r.query == query
    )


def test_a_scope_keeps_at_most_its_cap_of_list_pages_oldest_out_first(
    serve_proxy: Callable[..., str], cache_url: str, simulator: Simulator
) -> None:
    url = serve_proxy(cache={"url": cache_url, "max_list_pages_per_scope": 3, "local_ttl_s": 0})
    assert _list(url, BRAVO, "limit=1").headers["cache-status"].endswith("stored")
    for limit in range(1, 6):
        assert _list(url, ALPHA, f"limit={limit}").headers["cache-status"].endswith("stored")

    for limit in (3, 4, 5):  # the newest three stayed
        assert "hit" in _list(url, ALPHA, f"limit={limit}").headers["cache-status"]
    assert "hit" in _list(url, BRAVO, "limit=1").headers["cache-status"]  # another scope: untouched
    assert _list(url, ALPHA, "limit=1").headers["cache-status"].endswith("stored")  # pushed out
    assert _list_reads(simulator, "limit=1") == 3  # bravo once, alpha twice
    assert _list_reads(simulator, "limit=4") == 1


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("limit=1&limit=2", id="repeated"),
        pytest.param("limit=2&colour=red", id="unknown"),
    ],
)
def test_a_list_query_the_cache_cannot_normalise_is_forwarded_and_never_stored(
    serve_proxy: Callable[..., str], cache_url: str, simulator: Simulator, query: str
) -> None:
    url = serve_proxy(cache={"url": cache_url})
    answers = [_list(url, ALPHA, query) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["cache-status"] for a in answers] == [UNCACHEABLE, UNCACHEABLE]
    assert _list_reads(simulator, query) == 2


def _record(day: date, workspace: str, tenant: str) -> Exchange:
    """A list-page hit at noon (UTC) of that day."""
    noon = datetime.combine(day, datetime.min.time(), UTC).timestamp() + 12 * 3600
    team = Tenant(name=tenant, workspace=workspace, client_key_hashes=frozenset(), api_key="sk-unused")
    return Exchange(
        "req_1",
        "GET",
        started_at=noon,
        started=0.0,
        tenant=team,
        operation=Operation.LIST,
        cache=CacheOutcome.hit(ttl=1, age=0),
        status=200,
        bytes_out=10,
    )


async def _info(server: RedisServer, field: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"INFO\r\n")
    text = ""
    while f"\r\n{field}:" not in text or not text.endswith("\r\n"):
        text += (await reader.read(65536)).decode()
    writer.close()
    await writer.wait_closed()
    return int(text.split(f"\r\n{field}:")[1].split("\r\n")[0])


def test_usage_counters_survive_a_full_volatile_lru_redis() -> None:
    """As shipped (volatile-lru): one team's list pages fill Redis; yesterday's counts stay. (With
    the TTL the counters had before, this fails: Redis evicts them.)"""
    server = RedisServer(free_port(), ["--maxmemory", "3mb", "--maxmemory-policy", "volatile-lru"])
    server.start()

    async def scenario() -> list[Any]:
        store = open_store(server.url)
        try:
            yesterday = datetime.now(UTC).date() - timedelta(days=1)
            usage = UsageCounter(store)
            for _ in range(3):
                usage.add(_record(yesterday, "alpha-prod", "alpha"))
            assert await usage.flush()

            policy = CachePolicy(CacheConfig(max_list_pages_per_scope=10_000))
            body = json.dumps({"data": [], "next_page": None, "pad": "x" * 20_000}).encode()
            page = 0
            # Redis samples keys to evict: enough evictions that an evictable counter would be met.
            while await _info(server, "evicted_keys") < 300:
                for _ in range(20):
                    page += 1
                    target = target_for(
                        TargetKind.LIST_PAGE, "bravo", None, "v", [], None, b"limit=%d" % page
                    )
                    answer = Entry(200, (), body, time.time(), 0, 0)
                    await store.write(policy.writes_for_answer(target, answer, None))
                assert page < 5000, "Redis did not evict"
            return await read_usage(store, yesterday, yesterday)
        finally:
            await store.aclose()

    try:
        [row] = asyncio.run(scenario())
    finally:
        server.stop()
    assert (row.workspace, row.counts["requests"], row.counts["cache_hits"]) == ("alpha-prod", 3, 3)


def test_usage_keeps_retention_days_and_deletes_older_days() -> None:
    today = date(2026, 11, 30)
    clock_at = {"now": datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp()}

    async def scenario() -> tuple[list[str], list[str]]:
        store = open_store("memory://")
        days = [today - timedelta(days=n) for n in range(8)]
        await store.write([HashIncrement(f"fp:usage:{{{day}}}", "w|t|requests", 1) for day in days])
        usage = UsageCounter(store, retention_days=3, clock=lambda: clock_at["now"])

        async def kept() -> list[str]:
            return [day.isoformat() for day in days if (await read_usage(store, day, day))]

        assert await usage.flush()  # the first flush trims, with nothing counted
        first = await kept()
        clock_at["now"] += 86400  # a new day: the next flush trims one more
        assert await usage.flush()
        second = await kept()
        await store.aclose()
        return first, second

    first, second = asyncio.run(scenario())
    assert first == ["2026-11-30", "2026-11-29", "2026-11-28"]
    assert second == ["2026-11-30", "2026-11-29"]


@pytest.mark.parametrize(("policy", "warned"), [("allkeys-lru", True), ("volatile-lru", False)])
def test_the_store_warns_when_redis_may_evict_usage_counters(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, policy: str, warned: bool
) -> None:
    redis.Redis.from_url(redis_server.url).config_set("maxmemory-policy", policy)

    async def start() -> None:
        store = open_store(redis_server.url)
        await store.start()
        await store.aclose()

    with caplog.at_level(logging.WARNING, logger="proxy.store"):
        asyncio.run(start())
    assert ("usage counters may be evicted" in caplog.text) is warned


def test_no_list_page_is_served_while_the_scope_generation_is_missing() -> None:
    """A generation evicted under memory pressure: older pages are not trusted until it is back."""
    target = target_for(TargetKind.LIST_PAGE, "scope", None, VERSION, [], None, b"limit=5")
    fetched = 0

    async def fetch() -> Reply:
        nonlocal fetched
        fetched += 1
        return Reply(200, (), b'{"data":[],"next_page":null}')

    async def scenario() -> list[str]:
        store: RedisStore = open_store("memory://")
        cache = ResponseCache(CachePolicy(CacheConfig()), store, collapse_timeout_s=1)
        statuses = [
            (await cache.read(target, fetch, no_cache=False)).outcome.cache_status() for _ in range(2)
        ]
        await store.write([Delete(target.generation_key)])
        statuses += [
            (await cache.read(target, fetch, no_cache=False)).outcome.cache_status() for _ in range(2)
        ]
        await store.aclose()
        return statuses

    statuses = asyncio.run(scenario())
    assert [s.split(";")[1].strip() for s in statuses] == ["fwd=uri-miss", "hit", "fwd=uri-miss", "hit"]
    assert fetched == 2
