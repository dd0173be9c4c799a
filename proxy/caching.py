"""Answer list and metadata reads from the store when the policy allows it; fill it on a miss.

Concurrent misses on one key in this process make one upstream request (single-flight); the
others wait up to `collapse_timeout_s`, then fetch for themselves without storing. A list page past
its freshness stands in for an upstream failure while within `stale_if_error_s`. A store that is
down turns every read into a miss. Invalidations it could not take are held, in order, and written
by a background task in chunks as soon as it answers; until a scope's are written, this process
neither reads that scope from the store nor fills it, since the store still holds what they drop.
Reads never wait for the backlog. With `cache.journal_path` set, held invalidations are also
appended to that file and replayed at the next start, so a restart while the store is away loses
none (replaying one already written is harmless: each is idempotent). Hits are copied for
`local_ttl_s` into this process's memory (`local_cache.py`), which bounds how late another replica's
delete is seen once it is in the store.
All store calls of one read or invalidation share one `cache.timeout_s` (`CacheStore.request_budget`).
A list query the policy cannot normalise is forwarded without looking anything up or storing it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from proxy.cache import (
    GENERATION_TTL_S,
    TOMBSTONE,
    CacheOutcome,
    CachePolicy,
    CacheTarget,
    Entry,
    Freshness,
    TargetKind,
    is_upstream_failure,
)
from proxy.errors import ProxyError, UpstreamError
from proxy.local_cache import LocalCache
from proxy.reply import Reply
from proxy.store import CacheStore, CacheUnavailableError
from proxy.writes import Write, pack_invalidation, unpack_invalidation

logger = logging.getLogger(__name__)

# Held invalidations (about five writes each) kept at most; past it the oldest go, logged.
_MAX_HELD = 100_000
# Invalidations per background write: a few thousand commands, one round trip well inside any
# `timeout_s`, so a backlog of any size drains chunk by chunk.
_DRAIN_CHUNK = 200
_DRAIN_RETRY_S = 0.5
# How long after an outage the store is not believed: longer than another replica takes to write
# what it held meanwhile (its breaker's cool-down, then a drain retry and the write itself).
RESYNC_S = 5.0


@dataclass(frozen=True, slots=True)
class _Held:
    """One invalidation the store could not take, numbered in the order it was made."""

    number: int
    scope: str
    writes: tuple[Write, ...]


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer to send, and how the cache came by it."""

    reply: Reply
    outcome: CacheOutcome


Fetch = Callable[[], Awaitable[Reply]]
_UNAVAILABLE = CacheOutcome.bypass("cache-unavailable")
_UNCACHEABLE = CacheOutcome.bypass("uncacheable-query")
# What a single-flight leader hands its waiters: the answer, the error, or None ("fetch yourself").
_Outcome = Answer | ProxyError | None


class ResponseCache:
    def __init__(
        self,
        policy: CachePolicy,
        store: CacheStore,
        *,
        collapse_timeout_s: float,
        local_ttl_s: float = 0.0,
        journal_path: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.store = store
        self.clock = clock
        self._local = LocalCache(local_ttl_s, clock)
        self._collapse_timeout_s = collapse_timeout_s
        self._inflight: dict[str, asyncio.Future[_Outcome]] = {}
        self._held: deque[_Held] = deque()
        self._held_scopes: Counter[str] = Counter()
        self._held_count = 0
        self._drainer: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._journal_path = Path(journal_path) if journal_path else None
        self._journal: BinaryIO | None = None

    async def start(self) -> None:
        """Open the journal and hold again what it kept from before a restart (written soon)."""
        if self._journal_path is None:
            return
        kept = self._journal_path.read_bytes().splitlines() if self._journal_path.exists() else []
        self._journal = self._journal_path.open("ab")
        for line in kept:
            try:
                scope, writes = unpack_invalidation(line)
            except ValueError:
                logger.warning("unreadable line in the cache journal skipped")
                continue
            self._hold(scope, writes, journal=False)
        if self._held:
            logger.info("%d cache invalidations from the journal to write", len(self._held))

    @property
    def held(self) -> int:
        """Invalidations made while the store was away and not yet written."""
        return len(self._held)

    async def aclose(self) -> None:
        """Stop the background writer (by an event: redis-py may swallow a cancel, redis-py#2666)."""
        self._closing.set()
        if self._drainer is not None:
            await self._drainer
        if self._journal is not None:
            self._journal.close()  # what is still held stays in it for the next start
            self._journal = None

    async def read(self, target: CacheTarget, fetch: Fetch, *, no_cache: bool) -> Answer:
        """The answer to a list or metadata request: a hit, a collapsed or own fetch, or stale."""
        if not target.cacheable:
            return Answer(await fetch(), _UNCACHEABLE)
        with self.store.request_budget():
            return await self._read(target, fetch, no_cache)

    async def _read(self, target: CacheTarget, fetch: Fetch, no_cache: bool) -> Answer:
        held = target.scope in self._held_scopes
        copied = None if no_cache or held else self._local.get(target.scope, target.key, target.variant)
        if copied is not None:
            return self._hit(copied[0])
        flight_key = f"{target.key}|{target.variant}"
        leader = None if no_cache else self._inflight.get(flight_key)
        if leader is not None:
            return await self._follow(leader, fetch)
        # The flight covers the store lookup too: a request whose lookup ended after the leader had
        # fetched and stored would otherwise miss both the entry and the leader, and fetch again.
        outcome: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[flight_key] = outcome
        try:
            answer = await self._lookup_or_fetch(target, fetch, no_cache, held)
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

    async def _lookup_or_fetch(self, target: CacheTarget, fetch: Fetch, no_cache: bool, held: bool) -> Answer:
        stored, generation, available = None, None, False
        # Just back from an outage, the store may still hold what another replica's held
        # invalidations drop: it is filled, not believed, until they had time to be written.
        trusted = not no_cache and self.store.back_for_s() >= RESYNC_S
        if not held:
            try:
                stored, generation = await self._lookup(target, trusted)
                available = True
            except CacheUnavailableError:
                pass
        usable = stored if trusted else None
        freshness = usable.freshness(self.clock()) if usable is not None else Freshness.UNUSABLE
        if usable is not None and freshness is Freshness.FRESH:
            return self._hit(usable)
        stale = usable if freshness is Freshness.STALE else None
        return await self._fetch_and_store(target, fetch, stale, generation, available, no_cache)

    def _hit(self, entry: Entry) -> Answer:
        now = self.clock()
        return Answer(entry.reply, CacheOutcome.hit(entry.ttl(now), entry.age(now)))

    async def after_upload(self, target: CacheTarget, reply: Reply) -> None:
        """A new file in the scope: its list pages go, and its metadata is stored from the answer."""
        if reply.status == 200:
            entry = Entry.fetched(reply, self.clock())
            await self.invalidate(target, self.policy.writes_after_upload(target, entry))

    async def after_delete(self, target: CacheTarget, reply: Reply) -> bool:
        """Whether the file is gone upstream (deleted, or already not there); if so, it is gone from
        the cache too, in every variant, and no fill in flight can store it back."""
        if reply.status not in (200, 404):
            return False
        await self.invalidate(target, self.policy.writes_after_delete(target))
        return True

    async def invalidate(self, target: CacheTarget, writes: Sequence[Write]) -> None:
        """Write now, or hold the writes for the background writer: never lose an invalidation.
        Behind held ones, a new one waits its turn (the writes keep the order they were made in).

        The scope's in-process copies go before the write (lookups in flight must not put them back)
        and again after it (a lookup that started meanwhile read the store before the write).
        """
        self._local.drop_scope(target.scope)
        if self._held:
            self._hold(target.scope, writes)
        else:
            try:
                with self.store.request_budget():
                    await self.store.write(writes)
            except CacheUnavailableError:
                self._hold(target.scope, writes)
        self._local.drop_scope(target.scope)

    def _hold(self, scope: str, writes: Sequence[Write], *, journal: bool = True) -> None:
        if journal and self._journal is not None:
            try:
                self._journal.write(pack_invalidation(scope, writes))
                self._journal.flush()
            except OSError as exc:
                logger.error("cannot append to the cache journal: %s", exc)
        if len(self._held) >= _MAX_HELD:
            logger.error("over %d cache invalidations held for the store; the oldest dropped", _MAX_HELD)
            self._release(self._held.popleft())
        self._held_count += 1
        self._held.append(_Held(self._held_count, scope, tuple(writes)))
        self._held_scopes[scope] += 1
        if (self._drainer is None or self._drainer.done()) and not self._closing.is_set():
            # A context of its own: the request's store budget must not follow the task.
            self._drainer = asyncio.create_task(self._drain(), context=contextvars.Context())

    def _release(self, held: _Held) -> None:
        self._held_scopes[held.scope] -= 1
        if not self._held_scopes[held.scope]:
            del self._held_scopes[held.scope]

    async def _drain(self) -> None:
        """Write the held invalidations, oldest first, a chunk at a time, until none is left; while the
        store is away, try again every `_DRAIN_RETRY_S` (the breaker lets one probe through)."""
        written = 0
        while self._held and not self._closing.is_set():
            chunk = [self._held[at] for at in range(min(_DRAIN_CHUNK, len(self._held)))]
            try:
                await self.store.write([write for held in chunk for write in held.writes])
            except CacheUnavailableError:
                try:
                    await asyncio.wait_for(self._closing.wait(), _DRAIN_RETRY_S)
                except TimeoutError:
                    pass
                continue
            last = chunk[-1].number
            while self._held and self._held[0].number <= last:  # the oldest may have been dropped
                self._release(self._held.popleft())
            written += len(chunk)
        if not self._held and self._journal is not None:
            self._journal.truncate(0)  # no await since the check: nothing was added meanwhile
        if written:
            logger.info("wrote %d cache invalidations held while the store was away", written)

    async def _lookup(self, target: CacheTarget, trusted: bool) -> tuple[Entry | None, int]:
        """The stored entry if it is still valid, and the scope's current generation. Only what is
        believed is copied into this process's memory: a copy is answered without asking again."""
        epoch = self._local.epoch(target.scope)
        entry, generation = await self._lookup_store(target)
        if entry is not None and trusted:
            self._local.put(target.scope, target.key, target.variant, entry, generation, epoch)
        return entry, generation

    async def _lookup_store(self, target: CacheTarget) -> tuple[Entry | None, int]:
        """The entry and, in the same round trip, the scope's generation, started when it has none
        (never set, evicted or wiped): a fill is stored only if the generation is still that one, so
        no delete (nor a wipe that took the tombstone with it) happened during the fetch."""
        started = b"%d" % self.policy.new_generation()
        fields = None if target.kind is TargetKind.LIST_PAGE else [target.variant, TOMBSTONE]
        values, raw_generation = await self.store.read_with_generation(
            target.key, fields, target.generation_key, started, GENERATION_TTL_S
        )
        generation = int(raw_generation)
        if target.kind is TargetKind.LIST_PAGE:
            # A page of another generation is unreachable (a generation just started trusts none).
            page = _unpack(values[0])
            return (page if page is not None and page.generation == generation else None), generation
        raw_entry, tombstone = values
        entry = _unpack(raw_entry)
        if entry is not None and entry.status == 200 and tombstone is not None:
            entry = None  # a fill that raced the file's deletion
        return entry, generation

    async def _follow(self, leader: asyncio.Future[_Outcome], fetch: Fetch) -> Answer:
        try:
            outcome = await asyncio.wait_for(asyncio.shield(leader), self._collapse_timeout_s)
        except TimeoutError:
            outcome = None
        if isinstance(outcome, Answer):
            if outcome.outcome.age is not None:  # a stale page stood in for a failure: say so here too
                return outcome
            return Answer(outcome.reply, CacheOutcome.fetched(collapsed=True))
        if isinstance(outcome, ProxyError):
            raise type(outcome)(outcome.message, headers=outcome.headers)
        return Answer(await fetch(), CacheOutcome.fetched())

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
            reply = await fetch()
        except UpstreamError:
            if stale is None:
                raise
            return Answer(stale.reply, CacheOutcome.stale(None, stale.age(self.clock())))
        if stale is not None and is_upstream_failure(reply.status):
            return Answer(stale.reply, CacheOutcome.stale(reply.status, stale.age(self.clock())))
        if not available or target.scope in self._held_scopes:
            return Answer(reply, _UNAVAILABLE)
        writes = self.policy.writes_for_answer(target, Entry.fetched(reply, self.clock()), generation)
        try:
            await self.store.write(writes)
        except CacheUnavailableError:
            return Answer(reply, _UNAVAILABLE)
        self._local.discard(target.scope, target.key, target.variant)  # older, if no-cache asked
        return Answer(reply, CacheOutcome.fetched(stored=bool(writes), no_cache=no_cache))


def _unpack(raw: bytes | None) -> Entry | None:
    if raw is None:
        return None
    try:
        return Entry.unpack(raw)
    except ValueError:
        logger.warning("unreadable cache entry ignored")
        return None
