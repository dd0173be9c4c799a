"""Cache policy: what is cached, under which key, for how long, and which writes keep it true.

No I/O here: this module builds keys, packs entries, judges freshness and lists the store writes
that `caching.py` sends in one pipeline. So every rule below is testable with plain tables.

Keys (the `{scope}` hash tag keeps one scope in one Redis Cluster slot):

    fp:{S}:gen                      generation, moved on by every upload or delete through the proxy
    fp:{S}:list:<variant>:<query>   a list page; its entry records the generation it was fetched at
    fp:{S}:pages                    sorted set: the scope's list page keys by the time they were stored
    fp:{S}:file:<file_id>           hash: variant -> metadata entry (positive or 404), "~deleted"

S is the tenant's cache scope: a hash of its upstream key, which alone decides the upstream workspace.
The variant hashes what may change an answer's shape or which the client chose to send:
`anthropic-version`, the normalised `anthropic-beta` set, `anthropic-workspace-id` and the `beta`
query parameter. Variants keep answers apart; invalidation is per scope, so a delete in any form of
request drops every variant (the file hash holds them all; the generation moves for every page).
A list hit is one MGET of the generation and the page; a metadata hit is one HMGET of the variant
and the tombstone. A page whose generation is not current is unreachable at once. A fill's metadata
entries are written only if the scope's generation is still the one read before the fetch
(`GuardedWrites`, one Lua script), so a fill that raced a delete or a wiped store stores nothing.

Every key has a TTL, so a Redis under `volatile-lru` (and the embedded store's byte cap) may evict
any of them, and only them. Generations therefore move by random steps and start at a random value:
a generation key evicted and recreated never meets a page stored under its old values, and while it
is missing no page is served. A scope keeps at most `max_list_pages_per_scope` pages (the oldest
stored go first), so one team's distinct queries cannot push the others' entries out; a query with
a parameter the list does not have, or a parameter given twice, is not cached at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl, urlencode

from proxy.config import CacheConfig
from proxy.headers import replayed
from proxy.reply import Reply
from proxy.writes import Bump, CappedAdd, Delete, Expire, GuardedWrites, HashSet, Put, Write

TOMBSTONE = "~deleted"
# A tombstone must outlive any metadata or list fetch that was in flight when the file was deleted,
# so that fetch cannot bring the file back. Upstream reads are bounded well below this.
TOMBSTONE_TTL_S = 600
GENERATION_TTL_S = 7 * 86400
_UPSTREAM_FAILURES = frozenset({500, 502, 503, 504, 529})
# The list's parameters in both API generations (FILES_API.md); only `ids[]` may repeat, in order.
_LIST_PARAMETERS = frozenset({"limit", "after_id", "before_id", "page", "scope_id", "beta"})
_IDS = "ids[]"
_MAX_IDS = 100
# Memos keyed by client bytes remember only keys this short, so they hold a fixed total size.
_MEMO_MAX_KEY_BYTES = 256


class TargetKind(Enum):
    """What a request reads or changes in the cache: a list page, one file, or its scope (an upload)."""

    LIST_PAGE = "list"
    FILE = "file"
    SCOPE = "scope"


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
        return self.packed_head() + self.body

    def packed_head(self) -> bytes:
        """The stored form of all but the body: the file entries of one list page share it."""
        meta = [
            self.status,
            self.stored_at,
            self.fresh_until,
            self.stale_until,
            self.generation,
            self.headers,
        ]
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def unpack(cls, data: bytes) -> Entry:
        meta, _, body = data.partition(b"\n")
        status, stored_at, fresh_until, stale_until, generation, headers = json.loads(meta)
        return cls(status, tuple(map(tuple, headers)), body, stored_at, fresh_until, stale_until, generation)

    @classmethod
    def fetched(cls, reply: Reply, now: float) -> Entry:
        """An answer just read from upstream, not yet given a lifetime."""
        return cls(reply.status, reply.headers, reply.body, now, now, now)

    @property
    def reply(self) -> Reply:
        return Reply(self.status, self.headers, self.body)

    def freshness(self, now: float) -> Freshness:
        if now < self.fresh_until:
            return Freshness.FRESH
        return Freshness.STALE if now < self.stale_until else Freshness.UNUSABLE

    def age(self, now: float) -> int:
        return max(0, int(now - self.stored_at))

    def ttl(self, now: float) -> int:
        return max(0, int(self.fresh_until - now))


@dataclass(frozen=True, slots=True)
class CacheTarget:
    """Where one request's answer lives in the cache."""

    kind: TargetKind
    scope: str
    variant: str
    key: str
    # False for a list query the cache cannot normalise: forwarded, never looked up nor stored.
    cacheable: bool = True

    @property
    def generation_key(self) -> str:
        return f"fp:{{{self.scope}}}:gen"

    @property
    def page_index_key(self) -> str:
        return f"fp:{{{self.scope}}}:pages"


def target_for(
    kind: TargetKind,
    tenant_scope: str,
    workspace_id: str | None,
    anthropic_version: str | None,
    anthropic_betas: Iterable[str],
    file_id: str | None,
    query: bytes,
) -> CacheTarget:
    """The cache target of a Files request (any operation: uploads and deletes need the scope).

    The scope is the tenant's alone: with or without `anthropic-workspace-id` (or `?beta=true`) a
    request reaches the same upstream workspace, so those only choose the variant.
    """
    scope = tenant_scope
    variant = _variant(anthropic_version, tuple(anthropic_betas), workspace_id or "", _beta_query(query))
    if kind is TargetKind.LIST_PAGE:
        query_hash = _query_hash(query)
        if query_hash is None:
            return CacheTarget(kind=kind, scope=scope, variant=variant, key="", cacheable=False)
        key = f"fp:{{{scope}}}:list:{variant}:{query_hash}"
    elif file_id is not None:
        key = f"fp:{{{scope}}}:file:{file_id}"
    else:
        key = ""  # an upload: only its scope and variant matter
    return CacheTarget(kind=kind, scope=scope, variant=variant, key=key)


def _variant(
    anthropic_version: str | None, anthropic_betas: tuple[str, ...], workspace_id: str, beta_query: str
) -> str:
    """The hash of the request parts that may change an answer's shape. Their few usual values are
    remembered; longer ones, which only a careless or hostile client sends, are hashed each time."""
    size = len(anthropic_version or "") + sum(map(len, anthropic_betas)) + len(workspace_id) + len(beta_query)
    if size <= _MEMO_MAX_KEY_BYTES:
        return _remembered_variant(anthropic_version, anthropic_betas, workspace_id, beta_query)
    return _variant_hash(anthropic_version, anthropic_betas, workspace_id, beta_query)


def _variant_hash(
    anthropic_version: str | None, anthropic_betas: tuple[str, ...], workspace_id: str, beta_query: str
) -> str:
    betas = sorted({beta.strip() for value in anthropic_betas for beta in value.split(",") if beta.strip()})
    return _short_hash(f"{anthropic_version or ''}|{','.join(betas)}|{workspace_id}|{beta_query}")


_remembered_variant = functools.lru_cache(maxsize=256)(_variant_hash)


def _beta_query(query: bytes) -> str:
    """The `beta` query parameter's values (the published spec names the beta routes by it), or ""."""
    if b"beta" not in query:
        return ""
    if len(query) <= _MEMO_MAX_KEY_BYTES:
        return _remembered_beta_query(query)
    return _beta_values(query)


def _beta_values(query: bytes) -> str:
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    return "&".join(value for name, value in pairs if name == "beta")


_remembered_beta_query = functools.lru_cache(maxsize=1024)(_beta_values)


def _query_hash(query: bytes) -> str | None:
    """The hash of the normalised query, or None. Short queries are remembered: clients page with the
    same few query strings again and again."""
    if len(query) <= _MEMO_MAX_KEY_BYTES:
        return _remembered_query_hash(query)
    return _normalised_query_hash(query)


def _normalised_query_hash(query: bytes) -> str | None:
    normalised = normalise_query(query)
    return None if normalised is None else _short_hash(normalised)


_remembered_query_hash = functools.lru_cache(maxsize=4096)(_normalised_query_hash)


def normalise_query(query: bytes) -> str | None:
    """The query string with its names in order, or None when the cache cannot tell which answer it
    asks for: a name the Files list does not have, or a name given twice.

    A server may read the first or the last of repeated values, so only `ids[]`, a list by nature,
    may repeat (up to 100 values, kept in their order). Escapes decode as latin-1, so that two
    different bytes never become one character (UTF-8 would make both U+FFFD).
    """
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    names = [name for name, _ in pairs if name != _IDS]
    if len(set(names)) != len(names) or not _LIST_PARAMETERS.issuperset(names):
        return None
    if len(pairs) - len(names) > _MAX_IDS:
        return None
    return urlencode(sorted(pairs, key=lambda pair: pair[0]))


def is_upstream_failure(status: int) -> bool:
    """Answers a stale page may stand in for (besides timeouts and refused connections)."""
    return status in _UPSTREAM_FAILURES


class CachePolicy:
    """Lifetimes and caps from config, and the writes that store or invalidate answers."""

    def __init__(self, config: CacheConfig, random_step: Callable[[], int] | None = None) -> None:
        self._config = config
        self._random_step = random_step or _random_step

    def new_generation(self) -> int:
        """A generation for a scope that has none: random, so it never meets pages or fills of a
        generation that came before (evicted, wiped, or lost in a failover)."""
        return self._random_step()

    def page_entry(self, reply: Entry, generation: int) -> Entry:
        fresh_until = reply.stored_at + self._config.list_ttl_s
        return _with_lifetime(reply, fresh_until, fresh_until + self._config.stale_if_error_s, generation)

    def writes_for_answer(self, target: CacheTarget, answer: Entry, generation: int | None) -> list[Write]:
        """What to store for a fetched list or metadata answer; nothing for an uncacheable one.

        `generation` is the scope's generation read before the fetch; None when it had none (never
        set, evicted or wiped): a page then starts a new one, unless another request did first.
        Metadata entries are written only while the generation is still that one: a delete (or a
        wipe) meanwhile makes the fill store nothing. A 200 whose body is not the JSON it should be
        is an upstream fault: passed through, not stored.
        """
        if _forbids_storing(answer.headers):
            return []
        if target.kind is TargetKind.LIST_PAGE and answer.status == 200:
            ttl = self._config.list_ttl_s + self._config.stale_if_error_s
            listed = _listed_files(answer.body)
            if listed is None:
                return []
            files = _guarded(target, generation, self.writes_for_files(target, listed, answer))
            if ttl <= 0:
                return files
            writes: list[Write] = files  # first: a generation this fill starts must not pass the guard
            if generation is None:
                generation = self._random_step()
                start = Put(target.generation_key, b"%d" % generation, GENERATION_TTL_S, only_if_absent=True)
                writes.append(start)
            page = self.page_entry(answer, generation)
            cap = self._config.max_list_pages_per_scope
            writes += [
                Put(target.key, page.pack(), ttl),
                CappedAdd(target.page_index_key, target.key, answer.stored_at, cap, ttl),
            ]
            return writes
        if target.kind is TargetKind.FILE and answer.status == 200:
            if _file_id(answer.body) is None:
                return []
            fill = self._file_writes(target.key, target.variant, answer, self._config.metadata_ttl_s)
            return _guarded(target, generation, fill)
        if target.kind is TargetKind.FILE and answer.status == 404:
            fill = self._file_writes(target.key, target.variant, answer, self._config.negative_ttl_s)
            return _guarded(target, generation, fill)
        return []

    def writes_for_files(
        self, target: CacheTarget, files: Sequence[tuple[str, bytes]], source: Entry
    ) -> list[HashSet | Expire]:
        """Metadata entries for file objects (id, body) seen in a list page or an upload answer; the
        stored head (status, lifetime, headers) is the same for all of them, so it is packed once."""
        ttl_s = self._config.metadata_ttl_s
        if ttl_s <= 0 or _forbids_storing(source.headers):
            return []
        expires = source.stored_at + ttl_s
        head = _with_lifetime(replace(source, status=200, body=b""), expires, expires, 0).packed_head()
        writes: list[HashSet | Expire] = []
        for file_id, body in files:
            key = f"fp:{{{target.scope}}}:file:{file_id}"
            writes += [HashSet(key, target.variant, head + body), Expire(key, ttl_s)]
        return writes

    def writes_after_upload(self, target: CacheTarget, answer: Entry) -> list[Write]:
        writes: list[Write] = [
            Bump(target.generation_key, self._random_step()),
            Expire(target.generation_key, GENERATION_TTL_S),
        ]
        file_id = _file_id(answer.body) if answer.status == 200 else None
        if file_id is not None:  # the new file: no read raced it, nothing to guard
            writes += self.writes_for_files(target, [(file_id, answer.body)], answer)
        return writes

    def writes_after_delete(self, target: CacheTarget) -> list[Write]:
        """Drop every variant of the file and leave a tombstone, then make list pages unreachable."""
        return [
            Delete(target.key),
            HashSet(target.key, TOMBSTONE, b"1"),
            Expire(target.key, TOMBSTONE_TTL_S),
            Bump(target.generation_key, self._random_step()),
            Expire(target.generation_key, GENERATION_TTL_S),
        ]

    def _file_writes(self, key: str, variant: str, answer: Entry, ttl_s: int) -> list[HashSet | Expire]:
        if ttl_s <= 0:
            return []
        entry = _with_lifetime(answer, answer.stored_at + ttl_s, answer.stored_at + ttl_s, 0)
        # A 404 must not shorten the life of a hash that holds other entries or a tombstone.
        expire = Expire(key, ttl_s, only_if_unset=answer.status != 200)
        return [HashSet(key, variant, entry.pack()), expire]


def _guarded(target: CacheTarget, generation: int | None, fill: list[HashSet | Expire]) -> list[Write]:
    return [GuardedWrites(target.generation_key, generation, tuple(fill))] if fill else []


def _with_lifetime(entry: Entry, fresh_until: float, stale_until: float, generation: int) -> Entry:
    """The entry as stored: its lifetime set, and only the headers worth replaying."""
    return replace(
        entry,
        headers=replayed(entry.headers),
        fresh_until=fresh_until,
        stale_until=stale_until,
        generation=generation,
    )


def _listed_files(body: bytes) -> list[tuple[str, bytes]] | None:
    """A list page's file objects with a string id, as (id, object); None when the body is no list
    page of file objects with ids."""
    data = _json_object(body).get("data")
    if not isinstance(data, list) or not all(isinstance(item, dict) and "id" in item for item in data):
        return None
    return [
        (item["id"], json.dumps(item, separators=(",", ":")).encode())
        for item in data
        if isinstance(item["id"], str)
    ]


def _file_id(body: bytes) -> str | None:
    file_id = _json_object(body).get("id")
    return file_id if isinstance(file_id, str) else None


def _json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; empty when it is not one (an upstream fault, never a proxy 500)."""
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _forbids_storing(headers: Iterable[tuple[str, str]]) -> bool:
    """`Cache-Control: no-store` or `private`: a shared cache never stores the answer (RFC 9111
    sections 5.2.2.5 and 5.2.2.7)."""
    return any(
        directive.split("=", 1)[0].strip().lower() in ("no-store", "private")
        for name, value in headers
        if name == "cache-control"
        for directive in value.split(",")
    )


def _random_step() -> int:
    """A generation's start or step: random, so a recreated generation key never meets its old
    values; below 2**32, so a 64-bit counter takes billions of steps to overflow."""
    return random.randrange(1, 2**32)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CacheResult(Enum):
    """The `cache` field of the access line and the metrics label."""

    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    BYPASS = "bypass"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class CacheOutcome:
    """How the cache came by an answer, with what `Cache-Status` and `Age` say of it."""

    result: CacheResult
    # RFC 9211 `fwd`: why the answer came from upstream (None for a hit).
    forward: str | None = None
    stored: bool = False
    collapsed: bool = False
    detail: str | None = None
    # A stale answer standing in for this upstream status (None: upstream unreachable).
    upstream_status: int | None = None
    ttl: int | None = None
    # Seconds since the answer was stored: sent as `Age` for answers from the store.
    age: int | None = None

    @classmethod
    def hit(cls, ttl: int, age: int) -> CacheOutcome:
        return cls(CacheResult.HIT, ttl=ttl, age=age)

    @classmethod
    def fetched(
        cls, *, stored: bool = False, collapsed: bool = False, no_cache: bool = False
    ) -> CacheOutcome:
        """From upstream on a miss (`uri-miss`), or because the client asked (`request`)."""
        return cls(
            CacheResult.MISS, "request" if no_cache else "uri-miss", stored=stored, collapsed=collapsed
        )

    @classmethod
    def stale(cls, upstream_status: int | None, age: int) -> CacheOutcome:
        return cls(CacheResult.STALE, "stale", upstream_status=upstream_status, age=age)

    @classmethod
    def bypass(cls, detail: str) -> CacheOutcome:
        return cls(CacheResult.BYPASS, "bypass", detail=detail)

    def cache_status(self) -> str:
        parts = ["files-proxy"]
        if self.result is CacheResult.HIT:
            parts.append("hit")
            if self.ttl is not None:
                parts.append(f"ttl={self.ttl}")
            return "; ".join(parts)
        parts.append(f"fwd={self.forward}")
        if self.upstream_status is not None:
            parts.append(f"fwd-status={self.upstream_status}")
        if self.stored:
            parts.append("stored")
        if self.collapsed:
            parts.append("collapsed")
        if self.detail is not None:
            parts.append(f"detail={self.detail}")
        return "; ".join(parts)


# Uploads, deletes and downloads: by their method, never from the cache.
FORWARDED_BY_METHOD = CacheOutcome(CacheResult.NONE, "method")
