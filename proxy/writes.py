"""The store's write operations, as values: what `store.py` sends (in one pipeline) and what the
cache policy, ownership and usage ask of it. A held invalidation is journalled as these values.

No I/O and no policy here: the store and everything that writes to it import this module, and this
module imports neither.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class HashSet:
    key: str
    field: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    ttl_s: int
    only_if_absent: bool = False


@dataclass(frozen=True, slots=True)
class Expire:
    key: str
    ttl_s: int
    only_if_unset: bool = False


@dataclass(frozen=True, slots=True)
class Bump:
    key: str
    amount: int


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


@dataclass(frozen=True, slots=True)
class HashIncrement:
    key: str
    field: str
    amount: int


@dataclass(frozen=True, slots=True)
class GuardedWrites:
    """`writes` (hash sets and expiries only), applied atomically and only while `guard_key` still
    holds `expected` (None: still missing)."""

    guard_key: str
    expected: int | None
    writes: tuple[HashSet | Expire, ...]


@dataclass(frozen=True, slots=True)
class CappedAdd:
    """Add `member`, itself a key, to the sorted set `key`; members ranked below the `cap` highest
    scores are removed, and so are the keys they name."""

    key: str
    member: str
    score: float
    cap: int
    ttl_s: int


Write = HashSet | Put | Expire | Bump | Delete | HashIncrement | CappedAdd | GuardedWrites
# What an invalidation (upload or delete) is made of, and so what the journal of held ones records.
_JOURNALLED: dict[str, type[HashSet | Put | Expire | Bump | Delete]] = {
    kind.__name__: kind for kind in (HashSet, Put, Expire, Bump, Delete)
}


def pack_invalidation(scope: str, writes: Sequence[Write]) -> bytes:
    """One invalidation as a JSON line for the journal (bytes as latin-1 text, which round-trips)."""
    items = [
        [type(write).__name__]
        + [
            value.decode("latin-1") if isinstance(value, bytes) else value
            for value in (getattr(write, field.name) for field in fields(write))
        ]
        for write in writes
    ]
    return json.dumps([scope, items], separators=(",", ":")).encode() + b"\n"


def unpack_invalidation(line: bytes) -> tuple[str, tuple[Write, ...]]:
    """The scope and writes of a journal line; ValueError if it is not one (a line cut by a crash)."""
    try:
        scope, items = json.loads(line)
        writes: list[Write] = []
        for name, *values in items:
            kind = _JOURNALLED[name]
            args = [
                value.encode("latin-1") if field.type == "bytes" else value
                for field, value in zip(fields(kind), values, strict=True)
            ]
            writes.append(kind(*args))
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError("not a journal line") from exc
    if not isinstance(scope, str):
        raise ValueError("not a journal line")
    return scope, tuple(writes)
