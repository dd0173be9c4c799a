"""Rate limits: the in-process GCRA on a fake clock, then the shared path on both stores and with Redis away."""

from __future__ import annotations

import dataclasses

import anyio
import pytest

from proxy.config import RateLimit, Tenant
from proxy.errors import RateLimitedError
from proxy.ratelimit import LocalLimiter, RateLimiter
from proxy.store import CircuitBreaker, open_store
from tests.constants import ALPHA, BRAVO, TeamKeys
from tests.support import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class StepClock:
    """Monotonic time that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(team: TeamKeys, per_minute: int, burst: int) -> Tenant:
    return dataclasses.replace(team.tenant(), rate_limit=RateLimit(per_minute=per_minute, burst=burst))


def bucket_key(tenant: Tenant) -> str:
    return f"fp:rl:{{{tenant.name}}}"


# Steps of (seconds to advance, ms to wait that `take` answers: 0 means allowed).
BURST_OF_3 = [(0.0, 0), (0.0, 0), (0.0, 0)]


@pytest.mark.parametrize(
    ("limit", "steps"),
    [
        pytest.param(RateLimit(6, 3), [*BURST_OF_3, (0.0, 10_000)], id="burst-at-once-then-denied-for-T"),
        pytest.param(RateLimit(6, 3), [*BURST_OF_3, (4.0, 6_000), (5.9, 100)], id="wait-counts-down"),
        pytest.param(
            RateLimit(6, 3), [*BURST_OF_3, (0.0, 10_000), (10.0, 0), (0.0, 10_000)], id="one-again-after-T"
        ),
        pytest.param(
            RateLimit(6, 3), [*BURST_OF_3, *[(10.0, 0), (0.0, 10_000)] * 4], id="steady-rate-after-burst"
        ),
        pytest.param(
            RateLimit(6, 1),
            [(0.0, 0), (10.0, 0), (10.0, 0), (9.5, 500), (0.5, 0)],
            id="burst-1-is-a-steady-rate",
        ),
        pytest.param(
            RateLimit(6, 3),
            [*BURST_OF_3, (600.0, 0), *BURST_OF_3[1:], (0.0, 10_000)],
            id="idle-refills-burst-and-no-more",
        ),
        pytest.param(
            RateLimit(6, 3), [(0.0, 0), (5.0, 0), (5.0, 0), (5.0, 0), (0.0, 5_000)], id="partial-refill"
        ),
        pytest.param(RateLimit(7, 1), [(0.0, 0), (0.0, 8_572)], id="interval-rounded-up-to-whole-ms"),
        pytest.param(RateLimit(120_000, 1), [(0.0, 0), (0.0, 1)], id="interval-at-least-1-ms"),
    ],
)
def test_local_gcra(limit: RateLimit, steps: list[tuple[float, int]]) -> None:
    clock = StepClock()
    limiter = LocalLimiter(clock)
    for advance_s, wait_ms in steps:
        clock.now += advance_s
        assert limiter.take("alpha", limit) == wait_ms


def test_local_gcra_tenants_are_independent() -> None:
    limiter = LocalLimiter(StepClock())
    limit = RateLimit(6, 2)
    assert [limiter.take("alpha", limit) for _ in range(3)] == [0, 0, 10_000]
    assert [limiter.take("bravo", limit) for _ in range(3)] == [0, 0, 10_000]


@pytest.mark.parametrize(
    ("per_minute", "retry_after"),
    [
        pytest.param(6, "10", id="whole-seconds"),
        pytest.param(7, "9", id="rounded-up"),
        pytest.param(6000, "1", id="at-least-1"),
    ],
)
async def test_denied_says_when_to_retry(per_minute: int, retry_after: str) -> None:
    store = open_store("memory://")
    # An open breaker makes every store call fail at once, so the fake clock drives the local path.
    store.breaker = CircuitBreaker(threshold=1, cooldown_s=3600, clock=StepClock())
    store.breaker.failed()
    try:
        limiter = RateLimiter(store, clock=StepClock())
        tenant = limited(ALPHA, per_minute, burst=1)
        await limiter.check(tenant)
        with pytest.raises(RateLimitedError) as denied:
            await limiter.check(tenant)
        assert denied.value.status_code == 429
        assert denied.value.headers == {"retry-after": retry_after}
        assert denied.value.message == (
            f"Rate limit exceeded for this team: {per_minute} requests per minute."
            f" Retry after {retry_after} s."
        )
    finally:
        await store.aclose()


async def exhaust(limiter: RateLimiter, tenant: Tenant, allowed: int) -> None:
    """`allowed` checks pass and the next is denied."""
    for _ in range(allowed):
        await limiter.check(tenant)
    with pytest.raises(RateLimitedError):
        await limiter.check(tenant)


async def test_store_burst_then_deny_then_one_after_t(cache_url: str) -> None:
    store = open_store(cache_url)
    try:
        limiter = RateLimiter(store)
        tenant = limited(ALPHA, per_minute=600, burst=3)  # T = 100 ms
        await exhaust(limiter, tenant, allowed=3)
        pttl = store.script("return redis.call('PTTL', KEYS[1])")
        # Three requests hold the bucket 300 ms ahead; it expires once it would be full again.
        assert 200 < await pttl([bucket_key(tenant)], []) <= 300
        await anyio.sleep(0.11)
        await exhaust(limiter, tenant, allowed=1)
        assert not store.breaker.is_open
    finally:
        await store.aclose()


async def test_store_replicas_share_the_budget_whatever_their_clocks(cache_url: str) -> None:
    store = open_store(cache_url)
    try:
        # Replica clocks play no part in the shared path: the store's TIME does.
        first = RateLimiter(store, clock=lambda: 0.0)
        second = RateLimiter(store, clock=lambda: 1e9)
        tenant = limited(ALPHA, per_minute=600, burst=4)
        await first.check(tenant)
        await first.check(tenant)
        await exhaust(second, tenant, allowed=2)
        with pytest.raises(RateLimitedError):
            await first.check(tenant)
        await exhaust(first, limited(BRAVO, per_minute=600, burst=2), allowed=2)
    finally:
        await store.aclose()


async def test_store_untouched_for_tenant_without_limit(cache_url: str) -> None:
    store = open_store(cache_url)
    try:
        limiter = RateLimiter(store)
        tenant = ALPHA.tenant()
        for _ in range(50):
            await limiter.check(tenant)
        assert await store.mget([bucket_key(tenant)]) == [None]
    finally:
        await store.aclose()


async def test_redis_stopped_limits_locally_then_shares_again(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url)
    # No cooldown, so the first call after Redis returns goes to it (the default waits 2 s).
    store.breaker = CircuitBreaker(cooldown_s=0)
    clock = StepClock()
    try:
        limiter = RateLimiter(store, clock=clock)
        tenant = limited(ALPHA, per_minute=600, burst=3)
        await limiter.check(tenant)
        redis_server.stop()
        await exhaust(limiter, tenant, allowed=3)
        assert store.breaker.is_open
        clock.now += 0.1
        await exhaust(limiter, tenant, allowed=1)
        redis_server.start()
        # Redis came back empty: the shared budget is full again although the local one is spent.
        await exhaust(limiter, tenant, allowed=3)
        assert not store.breaker.is_open
    finally:
        await store.aclose()


async def test_redis_frozen_limits_locally(redis_server: RedisServer) -> None:
    store = open_store(redis_server.url, timeout_s=0.05)
    try:
        limiter = RateLimiter(store, clock=StepClock())
        tenant = limited(ALPHA, per_minute=600, burst=2)
        await limiter.check(tenant)
        redis_server.pause()
        try:
            await exhaust(limiter, tenant, allowed=2)
        finally:
            redis_server.resume()
        assert store.breaker.is_open
    finally:
        await store.aclose()
