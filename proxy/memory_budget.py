"""A byte cap for the embedded store (`memory://`), which has no `maxmemory` of its own.

fakeredis keeps a key until it is deleted, and drops an expired one only when a command meets it.
From the writes the store sends, this keeps an index of the keys they made: approximate bytes, expiry,
and how recently each was used. Past `max_bytes` it names the least recently used keys that have a
TTL, for the store to delete through the same client: Redis's `maxmemory` with `volatile-lru`, so
keys without a TTL (usage counters) are never evicted. The index itself is counted in the bytes, and
its expired keys are forgotten by `forget_expired`, which the store's sweep calls.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from proxy.writes import Bump, CappedAdd, Delete, Expire, HashIncrement, HashSet, Put, Write

# What a key, and each of its fields or members, costs beyond its own bytes (fakeredis 2.41 and this
# index together, CPython 3.11, measured with tracemalloc; tests/test_memory_budget.py checks it).
_STRING = (600, 100)
_HASH = (1200, 110)
_SORTED_SET = (1000, 250)
_NUMBER_BYTES = 20  # an INCR/HINCRBY counter or a sorted set's score


@dataclass(slots=True)
class _Key:
    size: int
    fields: dict[str, int] = field(default_factory=dict)  # field, member, or "" for a string
    expires_at: float | None = None


class MemoryBudget:
    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._clock = clock
        self._volatile: OrderedDict[str, _Key] = OrderedDict()  # least recently used first
        self._durable: dict[str, _Key] = {}
        self._expiries: list[tuple[float, str]] = []  # a heap; entries of changed keys are skipped

    def __len__(self) -> int:
        return len(self._volatile) + len(self._durable)

    def wrote(self, writes: Sequence[Write]) -> list[str]:
        """Count writes the store applied; return the keys to evict to get back under the cap."""
        now = self._clock()
        for write in writes:
            match write:
                case Put(key, value, ttl_s, only_if_absent):
                    if only_if_absent and self._live(key, now) is not None:
                        continue
                    self._remove(key)
                    self._set(key, "", len(value), now, _STRING)
                    self._expire(key, ttl_s, now)
                case HashSet(key, name, value):
                    self._set(key, name, len(value), now, _HASH)
                case HashIncrement(key, name, _):
                    self._set(key, name, _NUMBER_BYTES, now, _HASH)
                case Bump(key, _):
                    self._set(key, "", _NUMBER_BYTES, now, _STRING)
                case CappedAdd(key, member, _, _, ttl_s):
                    self._set(key, member, _NUMBER_BYTES, now, _SORTED_SET)
                    self._expire(key, ttl_s, now)
                case Expire(key, ttl_s, only_if_unset):
                    entry = self._live(key, now)
                    if entry is not None and not (only_if_unset and entry.expires_at is not None):
                        self._expire(key, ttl_s, now)
                case Delete(key):
                    self._remove(key)
        return self._evict()

    def used(self, keys: Iterable[str]) -> None:
        """Mark keys just read as the most recently used."""
        for key in keys:
            if key in self._volatile:
                self._volatile.move_to_end(key)

    def deleted(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._remove(key)

    def removed_members(self, key: str, members: Iterable[str]) -> None:
        entry = self._volatile.get(key) or self._durable.get(key)
        if entry is None:
            return
        for member in members:
            size = entry.fields.pop(member, 0)
            entry.size -= size
            self.used_bytes -= size

    def forget_expired(self) -> None:
        """Drop expired keys from the count (the store frees them in fakeredis)."""
        now = self._clock()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            entry = self._volatile.get(key)
            if entry is not None and entry.expires_at == expires_at:
                self._remove(key)

    def _live(self, key: str, now: float) -> _Key | None:
        entry = self._volatile.get(key) or self._durable.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= now:
            self._remove(key)
            return None
        return entry

    def _set(self, key: str, name: str, value_bytes: int, now: float, costs: tuple[int, int]) -> None:
        key_cost, field_cost = costs
        entry = self._live(key, now)
        if entry is None:
            entry = self._durable[key] = _Key(key_cost + len(key))
            self.used_bytes += entry.size
        elif key in self._volatile:
            self._volatile.move_to_end(key)
        size = field_cost + len(name) + value_bytes
        change = size - entry.fields.get(name, 0)
        entry.fields[name] = size
        entry.size += change
        self.used_bytes += change

    def _expire(self, key: str, ttl_s: int, now: float) -> None:
        entry = self._durable.pop(key, None)
        if entry is None:
            entry = self._volatile[key]
            self._volatile.move_to_end(key)
        else:
            self._volatile[key] = entry
        entry.expires_at = now + ttl_s
        heap = self._expiries
        heapq.heappush(heap, (entry.expires_at, key))
        if len(heap) > 2 * len(self._volatile) + 64:  # mostly entries of keys changed since
            heap[:] = [(e.expires_at, k) for k, e in self._volatile.items() if e.expires_at is not None]
            heapq.heapify(heap)

    def _remove(self, key: str) -> None:
        entry = self._volatile.pop(key, None) or self._durable.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry.size

    def _evict(self) -> list[str]:
        evicted: list[str] = []
        while self.used_bytes > self.max_bytes and self._volatile:
            key, entry = self._volatile.popitem(last=False)
            self.used_bytes -= entry.size
            evicted.append(key)
        return evicted
