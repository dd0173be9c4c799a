"""ResponseCache against a scripted store: what happens to held invalidations when calls race."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest

from proxy.cache import CachePolicy, TargetKind, target_for
from proxy.caching import RESYNC_S, ResponseCache
from proxy.config import CacheConfig
from proxy.errors import UpstreamError, UpstreamUnavailableError
from proxy.reply import Reply
from proxy.store import CircuitBreaker, RedisStore
from proxy.writes import Delete
from tests.constants import VERSION
from tests.support import FakeClock, ScriptedStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def delete_target(file_id: str) -> Any:
    return target_for(TargetKind.FILE, "scope", None, VERSION, [], file_id, b"")


async def test_an_invalidation_held_during_the_flush_of_older_ones_is_not_lost() -> None:
    store = ScriptedStore()
    cache = ResponseCache(CachePolicy(CacheConfig()), store, collapse_timeout_s=1)
    store.down = True
    await cache.invalidate(delete_target("a"), [Delete("a")])  # held: the store is away

    release = asyncio.Event()
    store.down, store.hold = False, release
    while store.hold is not None:  # the background writer retries, and its write of "a" waits
        await asyncio.sleep(0.01)
    await cache.invalidate(delete_target("b"), [Delete("b")])  # behind "a": held, in order
    store.down = True  # the breaker opens again before that write returns
    await cache.invalidate(delete_target("c"), [Delete("c")])
    store.down = False
    release.set()
    while cache.held:
        await asyncio.sleep(0.01)
    await cache.invalidate(delete_target("d"), [Delete("d")])  # nothing held: written at once
    await cache.aclose()

    assert store.written == [Delete("a"), Delete("b"), Delete("c"), Delete("d")]


async def test_concurrent_no_cache_reads_of_one_key_each_fetch_and_all_answer() -> None:
    """A no-cache read takes the single-flight slot over; the earlier one must not fail on leaving."""
    store = ScriptedStore()
    cache = ResponseCache(CachePolicy(CacheConfig()), store, collapse_timeout_s=1)
    target = target_for(TargetKind.FILE, "scope", None, VERSION, [], "file_1", b"")
    upstream_answers = asyncio.Event()
    fetches = 0

    async def fetch() -> Reply:
        nonlocal fetches
        fetches += 1
        await upstream_answers.wait()
        return Reply(200, (), b'{"id":"file_1"}')

    reads = [asyncio.create_task(cache.read(target, fetch, no_cache=True)) for _ in range(2)]
    await asyncio.sleep(0.01)
    upstream_answers.set()
    answers = await asyncio.gather(*reads)

    assert fetches == 2
    assert [answer.reply.status for answer in answers] == [200, 200]
    assert [answer.outcome.cache_status() for answer in answers] == ["files-proxy; fwd=request; stored"] * 2


async def test_a_store_just_back_from_an_outage_is_refilled_not_believed_until_resync_s() -> None:
    """Another replica may still hold deletes it made during the outage: for `RESYNC_S` after the
    store answers again, what it holds is fetched again and stored, never served; then hits resume."""
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown_s=1, clock=clock)
    store = RedisStore(fakeredis.FakeAsyncRedis(), breaker=breaker)
    cache = ResponseCache(CachePolicy(CacheConfig()), store, collapse_timeout_s=1)
    target = target_for(TargetKind.FILE, "scope", None, VERSION, [], "file_1", b"")
    fetches = 0

    async def fetch() -> Reply:
        nonlocal fetches
        fetches += 1
        return Reply(200, (), b'{"id":"file_1","type":"file"}')

    async def status() -> str:
        return (await cache.read(target, fetch, no_cache=False)).outcome.cache_status()

    assert await status() == "files-proxy; fwd=uri-miss; stored"
    assert (await status()).startswith("files-proxy; hit")
    breaker.failed()  # the store went away ...
    clock.advance(1)
    breaker.allows_call()  # ... and its probe answers: it is back
    breaker.succeeded()
    clock.advance(RESYNC_S - 0.5)
    assert await status() == "files-proxy; fwd=uri-miss; stored"
    clock.advance(0.5)
    assert (await status()).startswith("files-proxy; hit")
    assert fetches == 2
    await store.aclose()


async def test_what_the_store_holds_just_after_an_outage_is_never_copied_into_memory() -> None:
    """A read while the store is not yet believed (within `RESYNC_S` of its return) must leave no
    in-process copy behind, even when the fetch that was to replace the entry fails: the next read
    would answer that copy, which may be a file another replica deleted during the outage."""
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown_s=1, clock=clock)
    store = RedisStore(fakeredis.FakeAsyncRedis(), breaker=breaker)
    cache = ResponseCache(CachePolicy(CacheConfig()), store, collapse_timeout_s=1, local_ttl_s=2, clock=clock)
    target = target_for(TargetKind.FILE, "scope", None, VERSION, [], "file_1", b"")
    upstream: list[Reply | UpstreamError] = [
        Reply(200, (), b'{"id":"file_1","type":"file"}'),
        UpstreamUnavailableError("upstream hiccup"),
        Reply(404, (), b'{"type":"error","error":{"type":"not_found_error","message":"gone"}}'),
    ]

    async def fetch() -> Reply:
        answer = upstream.pop(0)
        if isinstance(answer, UpstreamError):
            raise answer
        return answer

    await cache.read(target, fetch, no_cache=False)  # stored (the file is deleted elsewhere later)
    breaker.failed()  # the store goes away for longer than a copy in memory lives ...
    clock.advance(3)
    breaker.allows_call()  # ... and its probe answers: it is back, not yet believed
    breaker.succeeded()
    with pytest.raises(UpstreamUnavailableError):
        await cache.read(target, fetch, no_cache=False)
    answer = await cache.read(target, fetch, no_cache=False)

    assert (answer.reply.status, answer.outcome.cache_status()) == (404, "files-proxy; fwd=uri-miss; stored")
    assert upstream == []
    await store.aclose()
