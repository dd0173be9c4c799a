"""The embedded store's bounds, on the store itself: expired entries freed without being read, a byte
cap that evicts the least recently used cache entries and never usage counters, and a count of bytes
close to what fakeredis really holds."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest

from proxy.memory_budget import MemoryBudget
from proxy.store import open_store
from proxy.writes import Bump, CappedAdd, Delete, Expire, HashIncrement, HashSet, Put, Write

pytestmark = pytest.mark.anyio

COUNTERS = "fp:usage:{2026-11-01}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _page(index: int, size: int = 2000) -> Put:
    return Put(f"fp:{{s}}:list:v:{index:04d}", b"p" * size, 300)


async def _traced(action: Callable[[], Awaitable[None]]) -> int:
    """Bytes newly held after `action`, as tracemalloc sees them."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    await action()
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


async def test_expired_entries_are_freed_by_the_sweep_without_being_read() -> None:
    store = open_store("memory://", timeout_s=60)  # tracemalloc slows fakeredis down
    assert store.budget is not None
    writes: list[Write] = [Put(f"fp:{{s}}:list:v:{i}", b"x" * 500, 1) for i in range(1000)]
    writes.append(HashIncrement(COUNTERS, "w|t|requests", 1))
    tracemalloc.start()
    try:
        held = await _traced(lambda: store.write(writes))
        counted = store.budget.used_bytes
        expires = time.time() + 1

        async def sweep_runs() -> None:
            await asyncio.sleep(max(0.0, expires - time.time()))
            await store.start()
            while len(store.budget) > 1:  # the sweep runs every second
                await asyncio.sleep(0.05)

        freed = -await _traced(sweep_runs)
    finally:
        tracemalloc.stop()
    await store.aclose()

    assert freed > 0.8 * held  # fakeredis itself let go of them: nothing read the keys
    assert store.budget.used_bytes < 0.01 * counted  # only the usage counter is left


async def test_byte_cap_evicts_least_recently_used_cache_entries_and_never_usage_counters() -> None:
    store = open_store("memory://", memory_max_bytes=100_000)
    assert store.budget is not None
    await store.write([HashIncrement(COUNTERS, "w|t|requests", 5)])  # oldest of all, and no TTL
    for index in range(200):
        await store.write([_page(index)])
        await store.mget(["fp:{s}:list:v:0000"])  # page 0 is read all along

    keys = [_page(index).key for index in range(200)]
    present = [key for key, value in zip(keys, await store.mget(keys), strict=True) if value is not None]
    assert store.budget.used_bytes <= 100_000
    assert present[0] == keys[0]  # recently read
    assert present[1:] == keys[-len(present) + 1 :]  # then the newest: the least recently used went
    assert 20 < len(present) < 50
    assert await store.hgetall(COUNTERS) == {b"w|t|requests": b"5"}
    await store.aclose()


async def test_the_count_is_close_to_what_fakeredis_and_the_index_hold() -> None:
    """The overheads in memory_budget.py, measured: pages, metadata hashes of a few variants and a
    page index, as the cache writes them."""
    store = open_store("memory://", timeout_s=60)  # tracemalloc slows fakeredis down
    assert store.budget is not None
    writes: list[Write] = []
    for index in range(500):
        writes += [
            Put(f"fp:{{s}}:list:0123456789abcdef:{index:016x}", b"p" * 600, 300),
            CappedAdd("fp:{s}:pages", f"fp:{{s}}:list:0123456789abcdef:{index:016x}", index, 10**6, 300),
        ]
        for variant in ("0123456789abcdef", "fedcba9876543210", "~deleted"):
            writes.append(HashSet(f"fp:{{s}}:file:file_{index:024d}", variant, b"m" * 300))
        writes.append(Expire(f"fp:{{s}}:file:file_{index:024d}", 300))
    tracemalloc.start()
    try:
        held = await _traced(lambda: store.write(writes))
    finally:
        tracemalloc.stop()
    await store.aclose()
    assert 0.85 < store.budget.used_bytes / held < 1.25


def test_a_key_without_ttl_is_never_evicted_and_gains_lru_order_with_one() -> None:
    clock = Clock()
    budget = MemoryBudget(8000, clock)
    assert budget.wrote([HashSet("durable", "f", b"x" * 3000)]) == []
    assert budget.wrote([HashSet("file", "v", b"x" * 1000), Expire("file", 60)]) == []
    assert budget.wrote([Put("page", b"x" * 1000, 60)]) == ["file"]  # "durable" is older, never evicted
    assert budget.wrote([Expire("durable", 60), Put("next", b"x" * 2000, 60)]) == ["page"]
    assert budget.used_bytes <= 8000


def test_rewrites_count_once_and_deletes_and_expiry_uncount() -> None:
    clock = Clock()
    budget = MemoryBudget(10**9, clock)
    budget.wrote([HashSet("h", "v", b"x" * 100), Expire("h", 10)])
    once = budget.used_bytes
    budget.wrote([HashSet("h", "v", b"x" * 100), Expire("h", 5, only_if_unset=True)])
    assert budget.used_bytes == once
    budget.wrote([Bump("gen", 7), Expire("gen", 100), Put("gen2", b"1", 100, only_if_absent=True)])
    budget.wrote([Put("gen2", b"22222", 100, only_if_absent=True)])  # kept: it exists
    budget.wrote([Delete("gen")])
    budget.wrote([CappedAdd("idx", "page-a", 1.0, 10, 100), CappedAdd("idx", "page-b", 2.0, 10, 100)])
    budget.removed_members("idx", ["page-a", "page-b"])
    clock.now += 10  # "h" expires: no longer counted once forgotten
    budget.forget_expired()
    budget.deleted(["idx"])
    assert len(budget) == 1
    budget.deleted(["gen2"])
    assert (len(budget), budget.used_bytes) == (0, 0)
