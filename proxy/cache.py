"""Cache policy: what is cached, under which key, for how long, and which writes keep it true.

No I/O here: this module builds keys, packs entries, judges freshness and lists the store writes
that `caching.py` sends in one pipeline. So every rule below is testable with plain tables.

Keys (the `{scope}` hash tag keeps one scope in one Redis Cluster slot):

    fp:{S}:gen                      generation, bumped by every upload or delete through the proxy
    fp:{S}:list:<variant>:<query>   a list page; its entry records the generation it was fetched at
    fp:{S}:file:<file_id>           hash: variant -> metadata entry (positive or 404), "~deleted"

S is the tenant's cache scope (a hash of its upstream key) plus a hash of `anthropic-workspace-id`.
The variant hashes `anthropic-version` and the normalised `anthropic-beta` set, which change shapes.
A list hit is one MGET of the generation and the page; a metadata hit is one HMGET of the variant
and the tombstone. A page whose generation is not current is unreachable at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from urllib.parse import parse_qsl, urlencode

from proxy.config import CacheConfig
from proxy.routes import Operation

TOMBSTONE = "~deleted"
# A tombstone must outlive any metadata or list fetch that was in flight when the file was deleted,
# so that fetch cannot bring the file back. Upstream reads are bounded well below this.
TOMBSTONE_TTL_S = 600
GENERATION_TTL_S = 7 * 86400
# Response headers worth replaying on a hit; the rest describe one connection.
_REPLAYED = frozenset({"content-type", "request-id", "anthropic-organization-id", "anthropic-workspace-id"})
_UPSTREAM_FAILURES = frozenset({500, 502, 503, 504, 529})


class Freshness(Enum):
    FRESH = "fresh"
    STALE = "stale"  # past freshness, usable only if the upstream fails
    UNUSABLE = "unusable"


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored response. `generation` is meaningful for list pages only."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float
    fresh_until: float
    stale_until: float
    generation: int = 0

    def pack(self) -> bytes:
        meta = [
            self.status,
            self.stored_at,
            self.fresh_until,
            self.stale_until,
            self.generation,
            self.headers,
        ]
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def unpack(cls, data: bytes) -> Entry:
        meta, _, body = data.partition(b"\n")
        status, stored_at, fresh_until, stale_until, generation, headers = json.loads(meta)
        return cls(status, tuple(map(tuple, headers)), body, stored_at, fresh_until, stale_until, generation)

    def freshness(self, now: float) -> Freshness:
        if now < self.fresh_until:
            return Freshness.FRESH
        return Freshness.STALE if now < self.stale_until else Freshness.UNUSABLE

    def age(self, now: float) -> int:
        return max(0, int(now - self.stored_at))

    def ttl(self, now: float) -> int:
        return max(0, int(self.fresh_until - now))


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


@dataclass(frozen=True, slots=True)
class Expire:
    key: str
    ttl_s: int
    only_if_unset: bool = False


@dataclass(frozen=True, slots=True)
class Bump:
    key: str


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


@dataclass(frozen=True, slots=True)
class HashIncrement:
    key: str
    field: str
    amount: int


Write = HashSet | Put | Expire | Bump | Delete | HashIncrement


@dataclass(frozen=True, slots=True)
class CacheTarget:
    """Where one request's answer lives in the cache."""

    operation: Operation
    scope: str
    variant: str
    key: str

    @property
    def generation_key(self) -> str:
        return f"fp:{{{self.scope}}}:gen"


def target_for(
    operation: Operation,
    tenant_scope: str,
    workspace_id: str | None,
    anthropic_version: str | None,
    anthropic_betas: Iterable[str],
    file_id: str | None,
    query: bytes,
) -> CacheTarget:
    """The cache target of a Files request (any operation: uploads and deletes need the scope)."""
    scope = tenant_scope if workspace_id is None else f"{tenant_scope}.{_short_hash(workspace_id)}"
    variant = _variant(anthropic_version, tuple(anthropic_betas))
    if operation is Operation.LIST:
        key = f"fp:{{{scope}}}:list:{variant}:{_query_hash(query)}"
    elif file_id is not None:
        key = f"fp:{{{scope}}}:file:{file_id}"
    else:
        key = ""  # an upload: only its scope and variant matter
    return CacheTarget(operation=operation, scope=scope, variant=variant, key=key)


@functools.lru_cache(maxsize=256)
def _variant(anthropic_version: str | None, anthropic_betas: tuple[str, ...]) -> str:
    """The hash of the headers that change an answer's shape (few distinct values: remembered)."""
    betas = sorted({beta.strip() for value in anthropic_betas for beta in value.split(",") if beta.strip()})
    return _short_hash(f"{anthropic_version or ''}|{','.join(betas)}")


@functools.lru_cache(maxsize=4096)
def _query_hash(query: bytes) -> str:
    """Remembered: clients page with the same few query strings again and again (about a tenth of a
    list-page hit)."""
    return _short_hash(normalise_query(query))


def normalise_query(query: bytes) -> str:
    """The query string with its names in order; a repeated name keeps its values in their order.

    Only the order of different names is free: a server may read the first or the last of repeated
    values, so `limit=1&limit=2` and `limit=2&limit=1` are different requests. Escapes decode as
    latin-1, so that two different bytes never become one character (UTF-8 would make both U+FFFD).
    """
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return urlencode(sorted(pairs, key=lambda pair: pair[0]))


def is_upstream_failure(status: int) -> bool:
    """Answers a stale page may stand in for (besides timeouts and refused connections)."""
    return status in _UPSTREAM_FAILURES


def replayed_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in headers if name in _REPLAYED)


class CachePolicy:
    """Lifetimes from config, and the writes that store or invalidate answers."""

    def __init__(self, config: CacheConfig) -> None:
        self._config = config

    def page_entry(self, reply: Entry, generation: int) -> Entry:
        fresh_until = reply.stored_at + self._config.list_ttl_s
        return _with_lifetime(reply, fresh_until, fresh_until + self._config.stale_if_error_s, generation)

    def writes_for_answer(self, target: CacheTarget, answer: Entry, generation: int) -> list[Write]:
        """What to store for a fetched list or metadata answer; nothing for an uncacheable one."""
        if target.operation is Operation.LIST and answer.status == 200:
            page = self.page_entry(answer, generation)
            ttl = self._config.list_ttl_s + self._config.stale_if_error_s
            files = self.writes_for_files(target, _listed_files(answer.body), answer)
            return [Put(target.key, page.pack(), ttl), *files] if ttl > 0 else files
        if target.operation is Operation.METADATA and answer.status == 200:
            return self._file_writes(target.key, target.variant, answer, self._config.metadata_ttl_s)
        if target.operation is Operation.METADATA and answer.status == 404:
            return self._file_writes(target.key, target.variant, answer, self._config.negative_ttl_s)
        return []

    def writes_for_files(self, target: CacheTarget, files: Sequence[bytes], source: Entry) -> list[Write]:
        """Metadata entries for file objects seen in a list page or an upload answer."""
        writes: list[Write] = []
        for body in files:
            file_id = json.loads(body).get("id")
            if isinstance(file_id, str):
                key = f"fp:{{{target.scope}}}:file:{file_id}"
                item = Entry(200, source.headers, body, source.stored_at, 0.0, 0.0)
                writes += self._file_writes(key, target.variant, item, self._config.metadata_ttl_s)
        return writes

    def writes_after_upload(self, target: CacheTarget, answer: Entry) -> list[Write]:
        writes: list[Write] = [Bump(target.generation_key), Expire(target.generation_key, GENERATION_TTL_S)]
        if answer.status == 200:
            writes += self.writes_for_files(target, [answer.body], answer)
        return writes

    def writes_after_delete(self, target: CacheTarget) -> list[Write]:
        """Drop every variant of the file and leave a tombstone, then make list pages unreachable."""
        return [
            Delete(target.key),
            HashSet(target.key, TOMBSTONE, b"1"),
            Expire(target.key, TOMBSTONE_TTL_S),
            Bump(target.generation_key),
            Expire(target.generation_key, GENERATION_TTL_S),
        ]

    def _file_writes(self, key: str, variant: str, answer: Entry, ttl_s: int) -> list[Write]:
        if ttl_s <= 0:
            return []
        entry = _with_lifetime(answer, answer.stored_at + ttl_s, answer.stored_at + ttl_s, 0)
        # A 404 must not shorten the life of a hash that holds other entries or a tombstone.
        expire = Expire(key, ttl_s, only_if_unset=answer.status != 200)
        return [HashSet(key, variant, entry.pack()), expire]


def _with_lifetime(entry: Entry, fresh_until: float, stale_until: float, generation: int) -> Entry:
    """The entry as stored: its lifetime set, and only the headers worth replaying."""
    return replace(
        entry,
        headers=replayed_headers(entry.headers),
        fresh_until=fresh_until,
        stale_until=stale_until,
        generation=generation,
    )


def _listed_files(body: bytes) -> list[bytes]:
    data = json.loads(body).get("data")
    if not isinstance(data, list):
        return []
    return [json.dumps(item, separators=(",", ":")).encode() for item in data if isinstance(item, dict)]


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hit_status(ttl: int) -> str:
    return f"files-proxy; hit; ttl={ttl}"


def forward_status(reason: str, *, stored: bool = False, collapsed: bool = False) -> str:
    """`Cache-Status` (RFC 9211) for an answer that came from upstream."""
    return (
        "files-proxy; fwd=" + reason + ("; stored" if stored else "") + ("; collapsed" if collapsed else "")
    )


def stale_status(upstream_status: int | None) -> str:
    if upstream_status is None:
        return "files-proxy; fwd=stale"
    return f"files-proxy; fwd=stale; fwd-status={upstream_status}"


METHOD_STATUS = forward_status("method")
BYPASS_STATUS = "files-proxy; fwd=bypass; detail=cache-unavailable"
