"""The store: Redis through redis-py's asyncio client; `memory://` is an in-process fakeredis server
behind the same client class, so the embedded cache and real Redis share every line of this module.

This is the only module that catches Redis errors. `timeout_s` bounds the store calls made inside
one `request_budget()` (a request's: they share it, however many there are) and each call outside one; a
circuit breaker stops calling a store that keeps failing, and after its cool-down lets one probe
through (half-open), so a dead Redis costs a request nothing but a skipped cache. Every failure
becomes `CacheUnavailableError`, which callers treat as a miss.

`memory://` is bounded as Redis is with `maxmemory` and `volatile-lru`: a `MemoryBudget` counts what
the writes store and names least recently used cache entries to delete past `cache.memory_max_bytes`,
and a sweep frees expired entries every second (fakeredis frees one only when a command meets it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import fakeredis
import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from proxy.memory_budget import MemoryBudget
from proxy.writes import Bump, CappedAdd, Delete, Expire, GuardedWrites, HashIncrement, HashSet, Put, Write

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_MAX_BYTES = 256 * 1024 * 1024
_SWEEP_INTERVAL_S = 1.0
# GuardedWrites: apply hash sets and expiries only while the guard key holds the expected value ("":
# missing). ARGV: expected, then per key: "h" field value | "e" ttl | "n" ttl (expire only if unset).
_GUARDED_LUA = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
local at = 2
for k = 2, #KEYS do
  local op = ARGV[at]
  if op == 'h' then
    redis.call('HSET', KEYS[k], ARGV[at + 1], ARGV[at + 2])
    at = at + 3
  else
    if op == 'n' then redis.call('EXPIRE', KEYS[k], ARGV[at + 1], 'NX')
    else redis.call('EXPIRE', KEYS[k], ARGV[at + 1]) end
    at = at + 2
  end
end
return 1
"""


class CacheUnavailableError(Exception):
    """The store could not be used for this call (down, slow, or the breaker is open)."""


class CircuitBreaker:
    """Opens after `threshold` failures in a row; after `cooldown_s` lets one probe through (half-open):
    its success closes the breaker, its failure opens it for another cool-down. Meanwhile every other
    call is skipped, so a store that is still away costs one call per cool-down, not one per request."""

    def __init__(
        self, threshold: int = 3, cooldown_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ):
        self._threshold = threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._back_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allows_call(self) -> bool:
        """Whether a call may go to the store now; True once per cool-down while open (the probe)."""
        if self._opened_at is None:
            return True
        if self._probing or self._clock() - self._opened_at < self._cooldown_s:
            return False
        self._probing = True
        return True

    def back_for_s(self) -> float:
        """Seconds since the store came back from its last outage: 0 while it is away, infinite if
        it never was."""
        if self._opened_at is not None:
            return 0.0
        return math.inf if self._back_at is None else self._clock() - self._back_at

    def succeeded(self) -> None:
        if self._opened_at is not None:
            logger.warning("cache store is back; caching resumes")
            self._back_at = self._clock()
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        if self._failures >= self._threshold or self._probing:
            if self._opened_at is None:
                logger.warning("cache store unavailable; serving without cache until it returns")
            self._opened_at = self._clock()
        self._probing = False

    def abandoned(self) -> None:
        """A call ended without an answer either way (cancelled): a probe may go again."""
        self._probing = False


class CacheStore(Protocol):
    """What the response cache asks of a store: an entry and its scope's generation in one round
    trip, and one pipeline of writes, all within the budget of the request that makes them. Tests
    script it to make a store fail or stall."""

    def request_budget(self) -> contextlib.AbstractContextManager[None]: ...

    async def read_with_generation(
        self, key: str, fields: Sequence[str] | None, generation_key: str, start: bytes, ttl_s: int
    ) -> tuple[list[bytes | None], bytes]: ...

    async def write(self, writes: Sequence[Write]) -> None: ...

    def back_for_s(self) -> float: ...


class Store(CacheStore, Protocol):
    """The store as the whole proxy uses it (`RedisStore`, for Redis and memory:// alike): the cache's
    operations, plus plain reads and hashes read whole (usage, ownership, sessions), Lua scripts
    (rate limits, ownership) and its life cycle. Every failure is a `CacheUnavailableError`."""

    breaker: CircuitBreaker
    on_call: Callable[[str], None]

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def hmget(self, key: str, fields: Sequence[str]) -> list[bytes | None]: ...

    async def hgetall(self, key: str) -> dict[bytes, bytes]: ...

    def script(self, lua: str) -> Callable[[Sequence[str], Sequence[int | str]], Awaitable[Any]]: ...

    async def ping(self) -> bool: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class _Budget:
    """What is left of one request's store time."""

    __slots__ = ("remaining_s",)

    def __init__(self, remaining_s: float) -> None:
        self.remaining_s = remaining_s


Client = redis.Redis | RedisCluster


class RedisStore:
    def __init__(
        self,
        client: Client,
        *,
        timeout_s: float = 1.0,
        max_connections: int = 50,
        breaker: CircuitBreaker | None = None,
        also_close: Sequence[redis.Redis] = (),
        budget: MemoryBudget | None = None,
    ) -> None:
        self._client = client
        self._also_close = also_close  # e.g. the Sentinel clients that find the master
        self.budget = budget  # memory:// only: the byte cap Redis keeps itself
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._timeout_s = timeout_s
        # The budget of the request (task) in progress, if it opened one.
        self._request_time: ContextVar[_Budget | None] = ContextVar("store_budget", default=None)
        # At most this many calls at once, each waiting within its timeout for a turn: a blocking
        # pool for every kind of store (redis-py's Cluster pool raises at once when exhausted).
        self._slots = asyncio.Semaphore(max_connections)
        self.breaker = breaker or CircuitBreaker()
        # Told "ok", "error" or "skipped" after every call, for metrics.
        self.on_call: Callable[[str], None] = lambda outcome: None

    def back_for_s(self) -> float:
        return self.breaker.back_for_s()

    @contextlib.contextmanager
    def request_budget(self) -> Iterator[None]:
        """Every store call inside shares one `timeout_s` (one request's store time, however many
        calls it makes); inside another budget, the outer one goes on."""
        if self._request_time.get() is not None:
            yield
            return
        token = self._request_time.set(_Budget(self._timeout_s))
        try:
            yield
        finally:
            self._request_time.reset(token)

    async def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        values: list[bytes | None] = await self._call(lambda: self._client.mget(keys))
        if self.budget is not None:
            self.budget.used(keys)
        return values

    async def hmget(self, key: str, fields: Sequence[str]) -> list[bytes | None]:
        values: list[bytes | None] = await self._call(lambda: self._client.hmget(key, list(fields)))
        if self.budget is not None:
            self.budget.used((key,))
        return values

    async def read_with_generation(
        self, key: str, fields: Sequence[str] | None, generation_key: str, start: bytes, ttl_s: int
    ) -> tuple[list[bytes | None], bytes]:
        """The hash `key`'s `fields` (or the value of `key` when `fields` is None), and the generation
        in `generation_key`, which `start` becomes if it has none (SET NX GET): one round trip."""
        pipe = self._client.pipeline(transaction=False)
        pipe.set(generation_key, start, ex=ttl_s, nx=True, get=True)
        if fields is None:
            pipe.get(key)
        else:
            pipe.hmget(key, list(fields))
        previous, values = await self._call(pipe.execute)
        if self.budget is not None:
            self.budget.used((key,))
            if previous is None:
                self.budget.wrote([Put(generation_key, start, ttl_s)])
        return ([values] if fields is None else values), (start if previous is None else previous)

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        values: dict[bytes, bytes] = await self._call(lambda: self._client.hgetall(key))
        return values

    async def write(self, writes: Sequence[Write]) -> None:
        """Apply the writes in order, in one round trip (not atomic: each write is safe alone).

        A second round trip only when there is something to drop: the pages a capped index pushed
        out, or (memory://) the entries evicted to keep the byte cap.
        """
        if not writes:
            return
        pipe, overflow_replies, guard_replies = self._pipeline(writes)
        replies = await self._call(pipe.execute)
        overflow = {
            write.key: [member.decode() for member in replies[at]]
            for at, write in overflow_replies
            if replies[at]
        }
        evicted: list[str] = []
        if self.budget is not None:
            skipped = {id(write) for at, write in guard_replies if not replies[at]}
            applied = [
                inner
                for write in writes
                if id(write) not in skipped
                for inner in (write.writes if isinstance(write, GuardedWrites) else (write,))
            ]
            evicted = self.budget.wrote(applied)
        if overflow or evicted:
            # The writes are done; what this fails to drop still goes when its TTL ends.
            with contextlib.suppress(CacheUnavailableError):
                await self._drop(overflow, evicted)

    async def start(self) -> None:
        """Begin the store's upkeep: for memory://, the sweep of expired entries; for Redis, a warning
        if its eviction policy may take usage counters (they have no TTL, as volatile-* expects)."""
        if self.budget is not None:
            if self._sweeper is None:
                self._sweeper = asyncio.create_task(self._sweep_every(_SWEEP_INTERVAL_S))
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                config = await self._client.config_get("maxmemory-policy")
        except (RedisError, OSError, TimeoutError):
            return  # managed Redis services often refuse CONFIG: nothing to check then
        policy = str(config.get("maxmemory-policy", ""))
        if policy.startswith("allkeys-"):
            logger.warning(
                "Redis maxmemory-policy is %s: usage counters may be evicted; use volatile-lru", policy
            )

    async def sweep(self) -> None:
        """Free the expired entries of memory:// (DBSIZE makes fakeredis drop them) and uncount them."""
        if self.budget is not None:
            self.budget.forget_expired()
            await self._client.dbsize()

    def script(self, lua: str) -> Callable[[Sequence[str], Sequence[int | str]], Awaitable[Any]]:
        """A Lua script to run atomically in the store (EVALSHA, loaded on first use)."""
        registered = self._client.register_script(lua)

        async def run(keys: Sequence[str], args: Sequence[int | str]) -> Any:
            return await self._call(lambda: registered(keys=list(keys), args=list(args)))

        return run

    async def ping(self) -> bool:
        try:
            await self._call(self._client.ping)
        except CacheUnavailableError:
            return False
        return True

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._closing.set()
            await self._sweeper
        if isinstance(self._client, RedisCluster):
            await self._client.aclose()
        else:
            await self._client.aclose(close_connection_pool=True)
        for client in self._also_close:
            await client.aclose(close_connection_pool=True)

    def _pipeline(
        self, writes: Sequence[Write]
    ) -> tuple[
        redis.client.Pipeline | ClusterPipeline, list[tuple[int, CappedAdd]], list[tuple[int, GuardedWrites]]
    ]:
        """The writes as one pipeline, and where in its replies each capped index's overflow and each
        guarded group's outcome (1: applied) are."""
        pipe = self._client.pipeline(transaction=False)
        overflow_replies: list[tuple[int, CappedAdd]] = []
        guard_replies: list[tuple[int, GuardedWrites]] = []
        for write in writes:
            match write:
                case GuardedWrites(guard_key, expected, inner):
                    keys, args = _guarded_arguments(guard_key, expected, inner)
                    # EVAL, not EVALSHA: a restarted Redis has no script loaded, and the text is short.
                    pipe.eval(_GUARDED_LUA, len(keys), *keys, *args)
                    guard_replies.append((len(pipe) - 1, write))
                case HashSet(key, field, value):
                    pipe.hset(key, field, value)
                case Put(key, value, ttl_s, only_if_absent):
                    pipe.set(key, value, ex=ttl_s, nx=only_if_absent)
                case Expire(key, ttl_s, only_if_unset):
                    pipe.expire(key, ttl_s, nx=only_if_unset)
                case Bump(key, amount):
                    pipe.incrby(key, amount)
                case Delete(key):
                    pipe.delete(key)
                case HashIncrement(key, field, amount):
                    pipe.hincrby(key, field, amount)
                case CappedAdd(key, member, score, cap, ttl_s):
                    pipe.zadd(key, {member: score})
                    pipe.expire(key, ttl_s)
                    pipe.zrange(key, 0, -cap - 1)  # the members past the cap, lowest scores first
                    overflow_replies.append((len(pipe) - 1, write))
        return pipe, overflow_replies, guard_replies

    async def _drop(self, overflow: dict[str, list[str]], evicted: list[str]) -> None:
        """Remove the pages capped indexes pushed out (with their index entries) and evicted keys.
        One DEL per key: a Cluster pipeline routes each command by its key."""
        pipe = self._client.pipeline(transaction=False)
        for index, pages in overflow.items():
            pipe.zrem(index, *pages)
            for page in pages:
                pipe.delete(page)
        for key in evicted:
            pipe.delete(key)
        await self._call(pipe.execute)
        if self.budget is not None:
            for index, pages in overflow.items():
                self.budget.removed_members(index, pages)
                self.budget.deleted(pages)

    async def _sweep_every(self, interval_s: float) -> None:
        """Sweep until `aclose`. Stopped by an event, not cancelled: redis-py shields a command from
        cancellation (redis/redis-py#2666), so a cancel arriving during one is lost, and so is the stop."""
        while not self._closing.is_set():
            try:
                await asyncio.wait_for(self._closing.wait(), interval_s)
            except TimeoutError:
                await self.sweep()

    async def _call(self, operation: Callable[[], Any]) -> Any:
        """Run one store call under the breaker and the time left to it, translating every failure."""
        budget = self._request_time.get()
        timeout_s = self._timeout_s if budget is None else min(self._timeout_s, budget.remaining_s)
        if timeout_s <= 0:
            self.on_call("skipped")
            raise CacheUnavailableError("the request's store time is spent")
        if not self.breaker.allows_call():
            self.on_call("skipped")
            raise CacheUnavailableError("circuit open")
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s), self._slots:
                value = await operation()
        except (RedisError, OSError, TimeoutError) as exc:
            logger.debug("store call failed: %r", exc)
            self.breaker.failed()
            self.on_call("error")
            raise CacheUnavailableError(type(exc).__name__) from exc
        except BaseException:
            self.breaker.abandoned()
            raise
        finally:
            if budget is not None:
                budget.remaining_s -= time.monotonic() - started
        self.breaker.succeeded()
        self.on_call("ok")
        return value


def open_store(
    url: str,
    *,
    max_connections: int = 50,
    timeout_s: float = 1.0,
    memory_max_bytes: int = DEFAULT_MEMORY_MAX_BYTES,
) -> RedisStore:
    """A store for `cache.url` (`memory_max_bytes` caps memory:// only):

    memory://                                          embedded, in this process
    redis://[:password@]host:6379/0, rediss://...      one Redis
    redis+sentinel://host:26379,host2:26379/mymaster/0 the master Sentinel names, followed on failover
    redis+cluster://host:7000,host2:7001               a Redis Cluster (nodes to start from)
    """
    if url == "memory://":
        client: Client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        budget = MemoryBudget(memory_max_bytes)
        return RedisStore(client, timeout_s=timeout_s, max_connections=max_connections, budget=budget)
    # Every call is bounded by the request's store budget (`RedisStore._call`), so redis-py is given
    # no socket timeout of its own (it would wrap each send in a task of its own); retries are off
    # because the breaker, not a backoff loop, decides when to try again.
    options: dict[str, Any] = {"socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 0)}
    scheme, _, rest = url.partition("://")
    if scheme == "redis+cluster":
        nodes = [ClusterNode(*_host_port(node, 6379)) for node in rest.strip("/").split(",")]
        client = RedisCluster(startup_nodes=nodes, max_connections=max_connections, **options)
        return RedisStore(client, timeout_s=timeout_s, max_connections=max_connections)
    if scheme == "redis+sentinel":
        hosts, _, path = rest.partition("/")
        service, _, db = path.strip("/").partition("/")
        sentinel = Sentinel([_host_port(node, 26379) for node in hosts.split(",")], **options)  # type: ignore[no-untyped-call]
        client = sentinel.master_for(service, db=int(db or 0), **options)
        return RedisStore(
            client, timeout_s=timeout_s, max_connections=max_connections, also_close=sentinel.sentinels
        )
    # Never asked for more than `max_connections` at once: every call first takes one of the store's
    # slots (`RedisStore._call`), which is where a call waits for its turn, within its timeout.
    pool = redis.ConnectionPool.from_url(url, max_connections=max_connections, **options)
    return RedisStore(redis.Redis(connection_pool=pool), timeout_s=timeout_s, max_connections=max_connections)


def _guarded_arguments(
    guard_key: str, expected: int | None, writes: Sequence[HashSet | Expire]
) -> tuple[list[str], list[str | bytes | int]]:
    keys = [guard_key]
    args: list[str | bytes | int] = ["" if expected is None else str(expected)]
    for write in writes:
        keys.append(write.key)
        if isinstance(write, HashSet):
            args += ["h", write.field, write.value]
        else:
            args += ["n" if write.only_if_unset else "e", write.ttl_s]
    return keys, args


def _host_port(node: str, default_port: int) -> tuple[str, int]:
    host, _, port = node.rpartition(":") if ":" in node else (node, "", str(default_port))
    return host, int(port)
