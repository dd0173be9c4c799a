"""The in-process copy of cache hits: bounded in time, in size, and forgotten on a local change."""

from __future__ import annotations

import pytest

from proxy import local_cache
from proxy.cache import Entry
from proxy.local_cache import LocalCache
from tests.support import FakeClock


def entry(body: bytes = b"{}", fresh_for: float = 100.0) -> Entry:
    now = FakeClock()()
    return Entry(200, (), body, now, now + fresh_for, now + fresh_for)


def test_a_copy_lives_at_most_ttl_then_the_store_is_asked_again() -> None:
    clock = FakeClock()
    copies = LocalCache(1.0, clock)
    copies.put("s", "k", "v", entry(), 7, copies.epoch("s"))
    found = copies.get("s", "k", "v")
    assert found is not None and found[1] == 7
    clock.advance(0.99)
    assert copies.get("s", "k", "v") is not None
    clock.advance(0.02)
    assert copies.get("s", "k", "v") is None


def test_a_copy_never_outlives_the_freshness_of_its_entry() -> None:
    clock = FakeClock()
    copies = LocalCache(10.0, clock)
    copies.put("s", "k", "v", entry(fresh_for=0.5), 0, copies.epoch("s"))
    clock.advance(0.6)
    assert copies.get("s", "k", "v") is None
    copies.put("s", "stale", "v", entry(fresh_for=-1), 0, copies.epoch("s"))
    assert copies.get("s", "stale", "v") is None


def test_drop_scope_forgets_that_scope_only() -> None:
    copies = LocalCache(1.0, FakeClock())
    for scope in ("a", "a.ws", "b"):
        copies.put(scope, f"fp:{{{scope}}}:file:f", "v", entry(), 0, copies.epoch(scope))
    copies.drop_scope("a")
    assert copies.get("a", "fp:{a}:file:f", "v") is None
    assert copies.get("a.ws", "fp:{a.ws}:file:f", "v") is not None
    assert copies.get("b", "fp:{b}:file:f", "v") is not None


def test_a_lookup_that_started_before_a_drop_cannot_put_its_copy_back() -> None:
    copies = LocalCache(1.0, FakeClock())
    started_at = copies.epoch("s")
    copies.drop_scope("s")  # a delete through this replica, while the lookup awaited the store
    copies.put("s", "k", "v", entry(), 0, started_at)
    assert copies.get("s", "k", "v") is None


def test_zero_ttl_keeps_nothing() -> None:
    copies = LocalCache(0.0, FakeClock())
    copies.put("s", "k", "v", entry(), 0, copies.epoch("s"))
    assert copies.get("s", "k", "v") is None


def test_variants_are_separate_copies_and_discard_drops_one() -> None:
    copies = LocalCache(1.0, FakeClock())
    copies.put("s", "k", "beta", entry(b"beta"), 0, 0)
    copies.put("s", "k", "ga", entry(b"ga"), 0, 0)
    copies.discard("s", "k", "beta")
    assert copies.get("s", "k", "beta") is None
    found = copies.get("s", "k", "ga")
    assert found is not None and found[0].body == b"ga"


def test_memory_is_bounded_by_entries_and_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_cache, "MAX_ENTRIES", 3)
    monkeypatch.setattr(local_cache, "MAX_BODY_BYTES", 10)
    clock = FakeClock()
    copies = LocalCache(1.0, clock)
    for i in range(3):
        copies.put("s", f"k{i}", "v", entry(b"12"), 0, 0)
    copies.put("s", "k3", "v", entry(b"12"), 0, 0)  # over the entry bound: all were young, all go
    assert [copies.get("s", f"k{i}", "v") is not None for i in range(4)] == [False, False, False, True]
    copies.put("s", "big", "v", entry(b"123456789"), 0, 0)  # over the byte bound
    assert copies.get("s", "k3", "v") is None
    assert copies.get("s", "big", "v") is not None
    clock.advance(2)
    copies.put("s", "k4", "v", entry(b"12"), 0, 0)  # an expired copy makes room first
    assert copies.get("s", "k4", "v") is not None
