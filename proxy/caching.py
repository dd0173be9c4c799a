"""Answer list and metadata reads from the store when the policy allows it; fill it on a miss.

Concurrent misses on one key in this process make one upstream request (single-flight); the
others wait up to `collapse_timeout_s`, then fetch for themselves without storing. A list page past
its freshness stands in for an upstream failure while within `stale_if_error_s`. A store that is
down turns every read into a miss; invalidations it could not take are kept and written first
when it returns, so a delete is never forgotten. Hits are copied for `local_ttl_s` into this
process's memory (`local_cache.py`), which bounds how late another replica's delete is seen.
A list query the policy cannot normalise is forwarded without looking anything up or storing it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from proxy.cache import (
    BYPASS_STATUS,
    TOMBSTONE,
    UNCACHEABLE_STATUS,
    CachePolicy,
    CacheTarget,
    Entry,
    Freshness,
    Write,
    forward_status,
    hit_status,
    is_upstream_failure,
    stale_status,
)
from proxy.errors import ProxyError, UpstreamError
from proxy.local_cache import LocalCache
from proxy.routes import Operation
from proxy.store import CacheUnavailableError, RedisStore

logger = logging.getLogger(__name__)

_MAX_PENDING_WRITES = 100_000


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete response to send: the entry and how the cache came by it."""

    entry: Entry
    cache_status: str
    age: int | None = None


Fetch = Callable[[], Awaitable[Entry]]
# What a single-flight leader hands its waiters: the answer, the error, or None ("fetch yourself").
_Outcome = Answer | ProxyError | None


class ResponseCache:
    def __init__(
        self,
        policy: CachePolicy,
        store: RedisStore,
        *,
        collapse_timeout_s: float,
        local_ttl_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.store = store
        self.clock = clock
        self._local = LocalCache(local_ttl_s, clock)
        self._collapse_timeout_s = collapse_timeout_s
        self._inflight: dict[str, asyncio.Future[_Outcome]] = {}
        self._pending: deque[Write] = deque(maxlen=_MAX_PENDING_WRITES)

    async def read(self, target: CacheTarget, fetch: Fetch, *, no_cache: bool) -> Answer:
        """The answer to a list or metadata request: a hit, a collapsed or own fetch, or stale."""
        if not target.cacheable:
            return Answer(await fetch(), UNCACHEABLE_STATUS)
        try:
            await self._flush_pending()
            stored, generation = await self._lookup(target)
            available = True
        except CacheUnavailableError:
            stored, generation, available = None, None, False
        usable = None if no_cache else stored
        now = self.clock()
        freshness = usable.freshness(now) if usable is not None else Freshness.UNUSABLE
        if usable is not None and freshness is Freshness.FRESH:
            return Answer(usable, hit_status(usable.ttl(now)), age=usable.age(now))
        stale = usable if freshness is Freshness.STALE else None

        flight_key = f"{target.key}|{target.variant}"
        leader = None if no_cache else self._inflight.get(flight_key)
        if leader is not None:
            return await self._follow(leader, fetch)
        outcome: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[flight_key] = outcome
        try:
            answer = await self._fetch_and_store(target, fetch, stale, generation, available, no_cache)
            outcome.set_result(answer)
            return answer
        except ProxyError as exc:
            outcome.set_result(exc)
            raise
        finally:
            if not outcome.done():
                outcome.set_result(None)
            # A no-cache fetch may have taken the key over meanwhile; it removes its own entry.
            if self._inflight.get(flight_key) is outcome:
                del self._inflight[flight_key]

    async def invalidate(self, target: CacheTarget, writes: Sequence[Write]) -> None:
        """Write now, or keep the writes for when the store returns: never lose an invalidation.

        The scope's in-process copies go before the write (lookups in flight must not put them back)
        and again after it (a lookup that started meanwhile read the store before the write).
        """
        self._local.drop_scope(target.scope)
        try:
            await self._flush_pending()
            await self.store.write(writes)
        except CacheUnavailableError:
            if len(self._pending) + len(writes) > _MAX_PENDING_WRITES:
                logger.error("over %d cache writes held for the store; oldest dropped", _MAX_PENDING_WRITES)
            self._pending.extend(writes)
        self._local.drop_scope(target.scope)

    async def _flush_pending(self) -> None:
        """Write the invalidations held while the store was away. The batch is taken out first, so
        concurrent requests neither write it twice nor lose what is added meanwhile; if the write
        fails, it goes back in front of anything newer."""
        if not self._pending:
            return
        batch, self._pending = self._pending, deque(maxlen=_MAX_PENDING_WRITES)
        try:
            await self.store.write(list(batch))
        except CacheUnavailableError:
            self._pending.extendleft(reversed(batch))
            raise
        logger.info("wrote %d cache invalidations held while the store was away", len(batch))

    async def _lookup(self, target: CacheTarget) -> tuple[Entry | None, int | None]:
        """The stored entry if it is still valid, and the scope's current list generation (None for
        metadata, or when the scope has none)."""
        copied = self._local.get(target.scope, target.key, target.variant)
        if copied is not None:
            return copied
        epoch = self._local.epoch(target.scope)
        entry, generation = await self._lookup_store(target)
        if entry is not None:
            self._local.put(target.scope, target.key, target.variant, entry, generation, epoch)
        return entry, generation

    async def _lookup_store(self, target: CacheTarget) -> tuple[Entry | None, int | None]:
        if target.operation is Operation.LIST:
            raw_generation, raw_page = await self.store.mget([target.generation_key, target.key])
            if raw_generation is None:
                return None, None  # no page can be trusted until the scope has a generation again
            generation = int(raw_generation)
            page = _unpack(raw_page)
            return (page if page is not None and page.generation == generation else None), generation
        raw_entry, tombstone = await self.store.hmget(target.key, [target.variant, TOMBSTONE])
        entry = _unpack(raw_entry)
        if entry is not None and entry.status == 200 and tombstone is not None:
            return None, None  # a fill that raced the file's deletion
        return entry, None

    async def _follow(self, leader: asyncio.Future[_Outcome], fetch: Fetch) -> Answer:
        try:
            outcome = await asyncio.wait_for(asyncio.shield(leader), self._collapse_timeout_s)
        except TimeoutError:
            outcome = None
        if isinstance(outcome, Answer):
            if outcome.age is not None:  # a stale page stood in for a failure: say so here too
                return outcome
            return Answer(outcome.entry, forward_status("uri-miss", collapsed=True))
        if isinstance(outcome, ProxyError):
            raise type(outcome)(outcome.message, headers=outcome.headers)
        return Answer(await fetch(), forward_status("uri-miss"))

    async def _fetch_and_store(
        self,
        target: CacheTarget,
        fetch: Fetch,
        stale: Entry | None,
        generation: int | None,
        available: bool,
        no_cache: bool,
    ) -> Answer:
        try:
            entry = await fetch()
        except UpstreamError:
            if stale is None:
                raise
            return Answer(stale, stale_status(None), age=stale.age(self.clock()))
        if stale is not None and is_upstream_failure(entry.status):
            return Answer(stale, stale_status(entry.status), age=stale.age(self.clock()))
        if not available:
            return Answer(entry, BYPASS_STATUS)
        writes = self.policy.writes_for_answer(target, entry, generation)
        try:
            await self.store.write(writes)
        except CacheUnavailableError:
            return Answer(entry, BYPASS_STATUS)
        self._local.discard(target.scope, target.key, target.variant)  # older, if no-cache asked
        return Answer(entry, forward_status("request" if no_cache else "uri-miss", stored=bool(writes)))


def _unpack(raw: bytes | None) -> Entry | None:
    if raw is None:
        return None
    try:
        return Entry.unpack(raw)
    except ValueError:
        logger.warning("unreadable cache entry ignored")
        return None
