"""Per-tenant rate limits: GCRA (generic cell rate algorithm) shared across replicas through the store.

A tenant with `RateLimit(per_minute, burst)` gets one request per emission interval T = 60/per_minute s
on average, and `burst` at once: the burst tolerance is (burst - 1) * T. The only state is the
theoretical arrival time (TAT) of the next request, one integer per tenant.

The shared path runs the algorithm in the store as one Lua script (one round trip, atomic, on the
server's clock so that replicas with skewed clocks agree). When the store is unavailable, the same
algorithm runs in process, so limiting still applies; each replica then grants the full budget on its
own until the store returns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from proxy.config import RateLimit, Tenant
from proxy.errors import RateLimitedError
from proxy.store import CacheUnavailableError, Store

# The same step as `_gcra`, on the server's clock. Times are whole milliseconds on both sides, so the
# two compute the same integers (Lua numbers are doubles; epoch ms are exact in them, and a reply
# turns them into integers). ARGV: emission interval, burst tolerance. Returns 0 or the ms to wait.
_GCRA_LUA = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
if now < tat - tolerance then
    return tat - tolerance - now
end
redis.call('SET', KEYS[1], tat + interval, 'PX', tat + interval - now)
return 0
"""


def _gcra(tat_ms: int, now_ms: int, interval_ms: int, tolerance_ms: int) -> tuple[int, int]:
    """One GCRA step, as in `_GCRA_LUA`: (new TAT, 0) if allowed, else (TAT unchanged, ms to wait)."""
    tat_ms = max(tat_ms, now_ms)
    if now_ms < tat_ms - tolerance_ms:
        return tat_ms, tat_ms - tolerance_ms - now_ms
    return tat_ms + interval_ms, 0


def _gcra_params(limit: RateLimit) -> tuple[int, int]:
    """Emission interval and burst tolerance in whole ms, rounded up so the limit is never exceeded."""
    interval_ms = math.ceil(60_000 / limit.per_minute)
    return interval_ms, (limit.burst - 1) * interval_ms


class LocalLimiter:
    """The GCRA in process, for when the store is down; one TAT per tenant (tenants come from config)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat_ms: dict[str, int] = {}

    def take(self, name: str, limit: RateLimit) -> int:
        """Count one request for `name` and return 0, or return the ms to wait and count nothing."""
        now_ms = math.floor(self._clock() * 1000)
        tat_ms, wait_ms = _gcra(self._tat_ms.get(name, now_ms), now_ms, *_gcra_params(limit))
        self._tat_ms[name] = tat_ms
        return wait_ms


class RateLimiter:
    """Enforces each tenant's `rate_limit` across replicas, falling back to this process's own count."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._run = store.script(_GCRA_LUA)
        self._local = LocalLimiter(clock)

    async def check(self, tenant: Tenant) -> None:
        """Allow one request for this tenant, or raise RateLimitedError with a `retry-after` header."""
        limit = tenant.rate_limit
        if limit is None:
            return
        try:
            # The hash tag keeps the key in one Cluster slot, like the cache keys.
            wait_ms = int(await self._run([f"fp:rl:{{{tenant.name}}}"], _gcra_params(limit)))
        except CacheUnavailableError:
            wait_ms = self._local.take(tenant.name, limit)
        if wait_ms > 0:
            retry_after_s = max(1, math.ceil(wait_ms / 1000))
            raise RateLimitedError(
                f"Rate limit exceeded for this team: {limit.per_minute} requests per minute."
                f" Retry after {retry_after_s} s.",
                headers={"retry-after": str(retry_after_s)},
            )
