"""Cache policy as tables: keys, variants, entries, freshness and the writes that keep it true."""

from __future__ import annotations

import json

import pytest

from proxy import cache
from proxy.cache import (
    FORWARDED_BY_METHOD,
    TOMBSTONE,
    CacheOutcome,
    CachePolicy,
    CacheResult,
    Entry,
    Freshness,
    TargetKind,
    normalise_query,
    target_for,
)
from proxy.config import CacheConfig
from proxy.writes import Bump, CappedAdd, Delete, Expire, GuardedWrites, HashSet, Put
from tests.constants import FILES_BETA, SDK_VERSION, VERSION

GA = (VERSION, [])  # anthropic-version and betas, as target_for takes them
BETA = (SDK_VERSION, [FILES_BETA])
POLICY = CachePolicy(
    CacheConfig(
        metadata_ttl_s=100, list_ttl_s=10, stale_if_error_s=30, negative_ttl_s=5, max_list_pages_per_scope=3
    ),
    random_step=lambda: 7,
)


def _target(
    operation: TargetKind = TargetKind.LIST_PAGE,
    scope: str = "scope-a",
    workspace: str | None = None,
    version: str = VERSION,
    betas: tuple[str, ...] = (),
    file_id: str | None = None,
    query: bytes = b"limit=20",
) -> str:
    return target_for(operation, scope, workspace, version, betas, file_id, query).key


def _file_json(file_id: str) -> dict[str, object]:
    return {"id": file_id, "type": "file", "filename": "a.txt", "size_bytes": 1}


@pytest.mark.parametrize(
    ("one", "other"),
    [
        pytest.param({"scope": "scope-a"}, {"scope": "scope-b"}, id="tenant-upstream-key"),
        pytest.param({"workspace": None}, {"workspace": "wrkspc_1"}, id="workspace-header"),
        pytest.param({"workspace": "wrkspc_1"}, {"workspace": "wrkspc_2"}, id="two-workspaces"),
        pytest.param({"version": SDK_VERSION}, {"version": VERSION}, id="anthropic-version"),
        pytest.param({"betas": ()}, {"betas": (FILES_BETA,)}, id="beta-vs-ga"),
        pytest.param({"query": b"limit=20"}, {"query": b"limit=21"}, id="query"),
        pytest.param({"query": b"ids%5B%5D=a"}, {"query": b"ids%5B%5D=a&ids%5B%5D=b"}, id="more-ids"),
        pytest.param({"query": b"ids[]=a&ids[]=b"}, {"query": b"ids[]=b&ids[]=a"}, id="ids-order"),
        pytest.param({"query": b"scope_id=%FE"}, {"query": b"scope_id=%FF"}, id="non-utf-8-escapes"),
        pytest.param({"query": b"scope_id=%C3%A9"}, {"query": b"scope_id=%E9"}, id="utf-8-vs-latin-1"),
    ],
)
def test_anything_that_changes_the_answer_changes_the_list_key(
    one: dict[str, object], other: dict[str, object]
) -> None:
    assert _target(**one) != _target(**other)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("one", "other"),
    [
        pytest.param({"query": b"limit=2&beta=true"}, {"query": b"beta=true&limit=2"}, id="query-order"),
        pytest.param({"betas": ("b1,b2",)}, {"betas": ("b2", "b1")}, id="beta-split-and-order"),
        pytest.param({"betas": ("b1, b1",)}, {"betas": ("b1",)}, id="beta-duplicates-and-spaces"),
    ],
)
def test_equivalent_requests_share_a_list_key(one: dict[str, object], other: dict[str, object]) -> None:
    assert _target(**one) == _target(**other)  # type: ignore[arg-type]


def test_keys_carry_the_scope_as_a_hash_tag_and_never_the_raw_workspace() -> None:
    target = target_for(TargetKind.LIST_PAGE, "scope-a", "wrkspc_secretish", "v", [], None, b"")
    assert target.key.startswith("fp:{scope-a}:list:")
    assert target.generation_key == "fp:{scope-a}:gen"
    assert "wrkspc_secretish" not in target.key


@pytest.mark.parametrize(
    ("workspace", "query"),
    [
        pytest.param("wrkspc_1", b"", id="workspace-header"),
        pytest.param(None, b"beta=true", id="beta-query"),
        pytest.param("wrkspc_1", b"beta=true", id="both"),
    ],
)
def test_request_forms_that_reach_one_workspace_are_variants_of_one_scope(
    workspace: str | None, query: bytes
) -> None:
    """Answers stay apart, but one delete (file hash, generation) reaches every form."""
    plain = target_for(TargetKind.FILE, "s", None, *GA, "file_1", b"")
    other = target_for(TargetKind.FILE, "s", workspace, *GA, "file_1", query)
    deleted = target_for(TargetKind.FILE, "s", workspace, *GA, "file_1", query)
    assert other.variant != plain.variant
    assert other.scope == plain.scope == deleted.scope
    assert other.key == plain.key == deleted.key
    assert other.generation_key == plain.generation_key
    listed = target_for(TargetKind.LIST_PAGE, "s", workspace, *GA, None, query)
    assert listed.variant != target_for(TargetKind.LIST_PAGE, "s", None, *GA, None, b"").variant


def test_metadata_variants_share_one_hash_so_a_delete_drops_them_all() -> None:
    ga = target_for(TargetKind.FILE, "s", None, *GA, "file_1", b"")
    beta = target_for(TargetKind.FILE, "s", None, *BETA, "file_1", b"")
    assert ga.key == beta.key
    assert ga.variant != beta.variant


def test_normalise_query_sorts_names_and_keeps_ids_in_order() -> None:
    assert normalise_query(b"ids%5B%5D=b&beta=true&ids%5B%5D=a") == "beta=true&ids%5B%5D=b&ids%5B%5D=a"


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(b"limit=1&limit=2", id="repeated-limit"),
        pytest.param(b"limit=5&page=page_a&page=page_b", id="repeated-cursor"),
        pytest.param(b"beta=true&beta=true", id="repeated-beta"),
        pytest.param(b"limit=5&colour=red", id="unknown-name"),
        pytest.param(b"ids=file_1", id="ids-without-brackets"),
        pytest.param(b"&".join(b"ids[]=file_%d" % i for i in range(101)), id="over-100-ids"),
    ],
)
def test_a_query_the_cache_cannot_normalise_is_not_cached(query: bytes) -> None:
    assert normalise_query(query) is None
    target = target_for(TargetKind.LIST_PAGE, "s", None, *GA, None, query)
    assert not target.cacheable and target.key == ""


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(b"", id="none"),
        pytest.param(b"beta=true&limit=1000&after_id=file_1", id="beta-cursor"),
        pytest.param(b"before_id=file_2&scope_id=s", id="beta-before-and-scope"),
        pytest.param(b"limit=20&page=page_abc", id="ga-page"),
        pytest.param(b"&".join(b"ids%%5B%%5D=file_%d" % i for i in range(100)), id="100-ids"),
    ],
)
def test_every_files_list_query_is_cacheable(query: bytes) -> None:
    assert target_for(TargetKind.LIST_PAGE, "s", None, *GA, None, query).cacheable


def test_memos_keyed_by_client_bytes_keep_only_short_keys() -> None:
    """A long value is normalised each time (the handler refuses the longest), never remembered."""
    queries, variants = cache._remembered_query_hash.cache_info(), cache._remembered_variant.cache_info()
    long_query = b"limit=1&page=page_" + b"x" * 4000
    long_beta = ",".join(f"beta-{i}" for i in range(150))
    for _ in range(2):
        assert target_for(TargetKind.LIST_PAGE, "s", None, VERSION, [long_beta], None, long_query).cacheable
    assert cache._remembered_query_hash.cache_info() == queries
    assert cache._remembered_variant.cache_info() == variants


def test_entry_round_trips_and_ages() -> None:
    entry = Entry(200, (("request-id", "req_1"),), b'{"a":\n1}', 1000.0, 1010.0, 1040.0, 7)
    assert Entry.unpack(entry.pack()) == entry
    assert entry.age(1004.9) == 4
    assert entry.ttl(1004.0) == 6


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        pytest.param(1000.0, Freshness.FRESH, id="just-stored"),
        pytest.param(1009.9, Freshness.FRESH, id="end-of-fresh"),
        pytest.param(1010.0, Freshness.STALE, id="stale"),
        pytest.param(1039.9, Freshness.STALE, id="end-of-stale"),
        pytest.param(1040.0, Freshness.UNUSABLE, id="gone"),
    ],
)
def test_freshness(now: float, expected: Freshness) -> None:
    assert Entry(200, (), b"", 1000.0, 1010.0, 1040.0).freshness(now) is expected


def _answer(status: int, body: object) -> Entry:
    headers = (("content-type", "application/json"), ("request-id", "req_up"), ("x-envoy-upstream", "1"))
    return Entry(status, headers, json.dumps(body).encode(), 1000.0, 1000.0, 1000.0)


def test_a_list_page_is_stored_with_its_generation_and_fills_metadata() -> None:
    target = target_for(TargetKind.LIST_PAGE, "s", None, *GA, None, b"limit=2")
    page = {"data": [_file_json("file_1"), _file_json("file_2")], "next_page": None}

    writes = POLICY.writes_for_answer(target, _answer(200, page), generation=4)

    put = writes[1]
    assert isinstance(put, Put) and put.key == target.key and put.ttl_s == 40
    assert writes[2] == CappedAdd("fp:{s}:pages", target.key, 1000.0, 3, 40)
    stored = Entry.unpack(put.value)
    assert (stored.generation, stored.fresh_until, stored.stale_until) == (4, 1010.0, 1040.0)
    assert dict(stored.headers) == {"content-type": "application/json", "request-id": "req_up"}
    [guarded] = [w for w in writes if isinstance(w, GuardedWrites)]
    assert (guarded.guard_key, guarded.expected) == ("fp:{s}:gen", 4)
    filled = {w.key: w for w in guarded.writes if isinstance(w, HashSet)}
    assert set(filled) == {"fp:{s}:file:file_1", "fp:{s}:file:file_2"}
    assert json.loads(Entry.unpack(filled["fp:{s}:file:file_1"].value).body) == _file_json("file_1")
    assert Expire("fp:{s}:file:file_1", 100) in guarded.writes


def test_a_page_fetched_while_the_scope_has_no_generation_starts_one() -> None:
    """A missing generation (never set, evicted or wiped) starts at a random value, only if still
    missing; the page's file entries are guarded by "still missing", so they go before it starts."""
    target = target_for(TargetKind.LIST_PAGE, "s", None, *GA, None, b"")
    writes = POLICY.writes_for_answer(target, _answer(200, {"data": [_file_json("f")]}), generation=None)
    guarded = writes[0]
    assert isinstance(guarded, GuardedWrites) and guarded.expected is None
    assert writes[1] == Put("fp:{s}:gen", b"7", cache.GENERATION_TTL_S, only_if_absent=True)
    page = writes[2]
    assert isinstance(page, Put) and Entry.unpack(page.value).generation == 7


@pytest.mark.parametrize(
    ("operation", "status", "stored_ttl"),
    [
        pytest.param(TargetKind.FILE, 200, 100, id="metadata-200"),
        pytest.param(TargetKind.FILE, 404, 5, id="metadata-404-negative"),
        pytest.param(TargetKind.FILE, 500, None, id="metadata-500"),
        pytest.param(TargetKind.FILE, 529, None, id="metadata-529"),
        pytest.param(TargetKind.FILE, 401, None, id="metadata-401"),
        pytest.param(TargetKind.LIST_PAGE, 503, None, id="list-503"),
        pytest.param(TargetKind.LIST_PAGE, 400, None, id="list-400"),
        pytest.param(TargetKind.LIST_PAGE, 404, None, id="list-404"),
    ],
)
def test_only_200s_and_metadata_404s_are_stored(
    operation: TargetKind, status: int, stored_ttl: int | None
) -> None:
    target = target_for(operation, "s", None, *GA, "file_1" if operation is TargetKind.FILE else None, b"")
    writes = POLICY.writes_for_answer(target, _answer(status, _file_json("file_1")), generation=3)
    if stored_ttl is None:
        assert writes == []
        return
    [guarded] = writes
    # Stored only if no delete (or wipe) moved the scope's generation since it was read.
    assert isinstance(guarded, GuardedWrites) and guarded.expected == 3
    [hash_set, expire] = guarded.writes
    assert isinstance(hash_set, HashSet) and hash_set.field == target.variant
    assert Entry.unpack(hash_set.value).fresh_until == 1000.0 + stored_ttl
    # A negative answer must not shorten a hash that already holds a tombstone or other variants.
    assert expire == Expire(target.key, stored_ttl, only_if_unset=status == 404)


def test_upload_bumps_the_generation_and_fills_its_metadata() -> None:
    target = target_for(TargetKind.SCOPE, "s", None, *GA, None, b"")
    writes = POLICY.writes_after_upload(target, _answer(200, _file_json("file_9")))
    assert writes[:2] == [Bump("fp:{s}:gen", 7), Expire("fp:{s}:gen", cache.GENERATION_TTL_S)]
    assert any(isinstance(w, HashSet) and w.key == "fp:{s}:file:file_9" for w in writes)


def test_delete_drops_every_variant_leaves_a_tombstone_and_bumps_the_generation() -> None:
    target = target_for(TargetKind.FILE, "s", None, *GA, "file_1", b"")
    writes = POLICY.writes_after_delete(target)
    assert writes[:2] == [Delete("fp:{s}:file:file_1"), HashSet("fp:{s}:file:file_1", TOMBSTONE, b"1")]
    assert Bump("fp:{s}:gen", 7) in writes


def test_zero_lifetimes_store_nothing() -> None:
    policy = CachePolicy(CacheConfig(metadata_ttl_s=0, list_ttl_s=0, stale_if_error_s=0, negative_ttl_s=0))
    page = {"data": [_file_json("file_1")]}
    list_target = target_for(TargetKind.LIST_PAGE, "s", None, *GA, None, b"")
    meta_target = target_for(TargetKind.FILE, "s", None, *GA, "file_1", b"")
    assert policy.writes_for_answer(list_target, _answer(200, page), 0) == []
    assert policy.writes_for_answer(meta_target, _answer(200, _file_json("file_1")), 0) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(CacheOutcome.hit(ttl=60, age=3), "files-proxy; hit; ttl=60", id="hit"),
        pytest.param(CacheOutcome.fetched(stored=True), "files-proxy; fwd=uri-miss; stored", id="stored"),
        pytest.param(
            CacheOutcome.fetched(collapsed=True), "files-proxy; fwd=uri-miss; collapsed", id="collapsed"
        ),
        pytest.param(CacheOutcome.fetched(no_cache=True), "files-proxy; fwd=request", id="no-cache"),
        pytest.param(FORWARDED_BY_METHOD, "files-proxy; fwd=method", id="method"),
        pytest.param(
            CacheOutcome.stale(503, age=40), "files-proxy; fwd=stale; fwd-status=503", id="stale-503"
        ),
        pytest.param(CacheOutcome.stale(None, age=40), "files-proxy; fwd=stale", id="stale-timeout"),
        pytest.param(
            CacheOutcome.bypass("uncacheable-query"),
            "files-proxy; fwd=bypass; detail=uncacheable-query",
            id="uncacheable",
        ),
    ],
)
def test_cache_status_values(value: CacheOutcome, expected: str) -> None:
    """`Cache-Status` is rendered from the typed outcome (RFC 9211), never parsed back."""
    assert value.cache_status() == expected


@pytest.mark.parametrize(
    ("outcome", "result"),
    [
        (CacheOutcome.hit(ttl=1, age=0), CacheResult.HIT),
        (CacheOutcome.fetched(), CacheResult.MISS),
        (CacheOutcome.fetched(no_cache=True), CacheResult.MISS),
        (CacheOutcome.stale(None, age=1), CacheResult.STALE),
        (CacheOutcome.bypass("uncacheable-query"), CacheResult.BYPASS),
        (FORWARDED_BY_METHOD, CacheResult.NONE),
    ],
)
def test_each_outcome_is_logged_as_its_result(outcome: CacheOutcome, result: CacheResult) -> None:
    assert outcome.result is result
