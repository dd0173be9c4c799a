"""A small in-process copy of recent cache hits, in front of the shared store.

A hit from this process's memory costs no store round trip, which is most of the price of a hit
(DESIGN: one Redis GET is about 0.2 ms). Each copy lives at most `ttl_s`, so an upload or delete
made through another replica reaches this one's answers within that bound; through this replica it
is at once, because `drop_scope` forgets the scope's copies and any lookup still in flight for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.cache import Entry

# A bound on memory, not a tuning knob: copies live about a second, so only a burst of distinct
# keys reaches it; then expired copies go, and if that is not enough, every copy.
MAX_ENTRIES = 10_000
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Copy:
    entry: Entry
    generation: int | None
    expires_at: float


class LocalCache:
    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._scopes: dict[str, dict[tuple[str, str], _Copy]] = {}
        self._entries = 0
        self._body_bytes = 0
        # Bumped when a scope's copies are dropped, so a lookup that started before cannot put back
        # what it read from the store.
        self._epochs: dict[str, int] = {}

    def epoch(self, scope: str) -> int:
        return self._epochs.get(scope, 0)

    def get(self, scope: str, key: str, variant: str) -> tuple[Entry, int | None] | None:
        """The entry and list generation copied for this key, if the copy is still young enough."""
        copies = self._scopes.get(scope)
        copy = None if copies is None else copies.get((key, variant))
        if copy is None:
            return None
        if self._clock() >= copy.expires_at:
            return None
        return copy.entry, copy.generation

    def put(
        self, scope: str, key: str, variant: str, entry: Entry, generation: int | None, epoch: int
    ) -> None:
        """Copy an entry read from the store at `epoch`, unless the scope was dropped since."""
        now = self._clock()
        expires_at = min(now + self._ttl_s, entry.fresh_until)
        if expires_at <= now or self._epochs.get(scope, 0) != epoch:
            return
        if self._full(entry):
            self._drop_expired()
        if self._full(entry):
            self._scopes.clear()
            self._entries = self._body_bytes = 0
        self.discard(scope, key, variant)
        self._scopes.setdefault(scope, {})[(key, variant)] = _Copy(entry, generation, expires_at)
        self._entries += 1
        self._body_bytes += len(entry.body)

    def discard(self, scope: str, key: str, variant: str) -> None:
        copy = self._scopes.get(scope, {}).pop((key, variant), None)
        if copy is not None:
            self._entries -= 1
            self._body_bytes -= len(copy.entry.body)

    def _full(self, entry: Entry) -> bool:
        return self._entries >= MAX_ENTRIES or self._body_bytes + len(entry.body) > MAX_BODY_BYTES

    def _drop_expired(self) -> None:
        now = self._clock()
        for copies in self._scopes.values():
            for key in [key for key, copy in copies.items() if now >= copy.expires_at]:
                self._entries -= 1
                self._body_bytes -= len(copies.pop(key).entry.body)

    def drop_scope(self, scope: str) -> None:
        """Forget every copy of this scope: an upload or delete through this replica changed it."""
        self._epochs[scope] = self._epochs.get(scope, 0) + 1
        for copy in self._scopes.pop(scope, {}).values():
            self._entries -= 1
            self._body_bytes -= len(copy.entry.body)
