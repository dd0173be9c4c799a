"""Cache policy as tables: keys, variants, entries, freshness and the writes that keep it true."""

from __future__ import annotations

import json

import pytest

from proxy import cache
from proxy.access import cache_result
from proxy.cache import (
    TOMBSTONE,
    UNCACHEABLE_STATUS,
    Bump,
    CachePolicy,
    CappedAdd,
    Delete,
    Entry,
    Expire,
    Freshness,
    GuardedWrites,
    HashSet,
    Put,
    forward_status,
    normalise_query,
    stale_status,
    target_for,
)
from proxy.config import CacheConfig
from proxy.routes import Operation

GA = ("2026-10-21", [])
BETA = ("2023-06-01", ["files-api-2025-04-14"])
POLICY = CachePolicy(
    CacheConfig(
        metadata_ttl_s=100, list_ttl_s=10, stale_if_error_s=30, negative_ttl_s=5, max_list_pages_per_scope=3
    ),
    random_step=lambda: 7,
)


def _target(
    operation: Operation = Operation.LIST,
    scope: str = "scope-a",
    workspace: str | None = None,
    version: str = "2026-10-21",
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
        pytest.param({"version": "2023-06-01"}, {"version": "2026-10-21"}, id="anthropic-version"),
        pytest.param({"betas": ()}, {"betas": ("files-api-2025-04-14",)}, id="beta-vs-ga"),
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
    target = target_for(Operation.LIST, "scope-a", "wrkspc_secretish", "v", [], None, b"")
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
    plain = target_for(Operation.METADATA, "s", None, *GA, "file_1", b"")
    other = target_for(Operation.METADATA, "s", workspace, *GA, "file_1", query)
    deleted = target_for(Operation.DELETE, "s", workspace, *GA, "file_1", query)
    assert other.variant != plain.variant
    assert other.scope == plain.scope == deleted.scope
    assert other.key == plain.key == deleted.key
    assert other.generation_key == plain.generation_key
    listed = target_for(Operation.LIST, "s", workspace, *GA, None, query)
    assert listed.variant != target_for(Operation.LIST, "s", None, *GA, None, b"").variant


def test_metadata_variants_share_one_hash_so_a_delete_drops_them_all() -> None:
    ga = target_for(Operation.METADATA, "s", None, *GA, "file_1", b"")
    beta = target_for(Operation.METADATA, "s", None, *BETA, "file_1", b"")
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
    target = target_for(Operation.LIST, "s", None, *GA, None, query)
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
    assert target_for(Operation.LIST, "s", None, *GA, None, query).cacheable


def test_memos_keyed_by_client_bytes_keep_only_short_keys() -> None:
    """A long value is normalised each time (the handler refuses the longest), never remembered."""
    queries, variants = cache._remembered_query_hash.cache_info(), cache._remembered_variant.cache_info()
    long_query = b"limit=1&page=page_" + b"x" * 4000
    long_beta = ",".join(f"beta-{i}" for i in range(150))
    for _ in range(2):
        assert target_for(Operation.LIST, "s", None, "2026-10-21", [long_beta], None, long_query).cacheable
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
    target = target_for(Operation.LIST, "s", None, *GA, None, b"limit=2")
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
    target = target_for(Operation.LIST, "s", None, *GA, None, b"")
    writes = POLICY.writes_for_answer(target, _answer(200, {"data": [_file_json("f")]}), generation=None)
    guarded = writes[0]
    assert isinstance(guarded, GuardedWrites) and guarded.expected is None
    assert writes[1] == Put("fp:{s}:gen", b"7", cache.GENERATION_TTL_S, only_if_absent=True)
    page = writes[2]
    assert isinstance(page, Put) and Entry.unpack(page.value).generation == 7


@pytest.mark.parametrize(
    ("operation", "status", "stored_ttl"),
    [
        pytest.param(Operation.METADATA, 200, 100, id="metadata-200"),
        pytest.param(Operation.METADATA, 404, 5, id="metadata-404-negative"),
        pytest.param(Operation.METADATA, 500, None, id="metadata-500"),
        pytest.param(Operation.METADATA, 529, None, id="metadata-529"),
        pytest.param(Operation.METADATA, 401, None, id="metadata-401"),
        pytest.param(Operation.LIST, 503, None, id="list-503"),
        pytest.param(Operation.LIST, 400, None, id="list-400"),
        pytest.param(Operation.LIST, 404, None, id="list-404"),
    ],
)
def test_only_200s_and_metadata_404s_are_stored(
    operation: Operation, status: int, stored_ttl: int | None
) -> None:
    target = target_for(operation, "s", None, *GA, "file_1" if operation is Operation.METADATA else None, b"")
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
    target = target_for(Operation.UPLOAD, "s", None, *GA, None, b"")
    writes = POLICY.writes_after_upload(target, _answer(200, _file_json("file_9")))
    assert writes[:2] == [Bump("fp:{s}:gen", 7), Expire("fp:{s}:gen", cache.GENERATION_TTL_S)]
    assert any(isinstance(w, HashSet) and w.key == "fp:{s}:file:file_9" for w in writes)


def test_delete_drops_every_variant_leaves_a_tombstone_and_bumps_the_generation() -> None:
    target = target_for(Operation.DELETE, "s", None, *GA, "file_1", b"")
    writes = POLICY.writes_after_delete(target)
    assert writes[:2] == [Delete("fp:{s}:file:file_1"), HashSet("fp:{s}:file:file_1", TOMBSTONE, b"1")]
    assert Bump("fp:{s}:gen", 7) in writes


def test_zero_lifetimes_store_nothing() -> None:
    policy = CachePolicy(CacheConfig(metadata_ttl_s=0, list_ttl_s=0, stale_if_error_s=0, negative_ttl_s=0))
    page = {"data": [_file_json("file_1")]}
    list_target = target_for(Operation.LIST, "s", None, *GA, None, b"")
    meta_target = target_for(Operation.METADATA, "s", None, *GA, "file_1", b"")
    assert policy.writes_for_answer(list_target, _answer(200, page), 0) == []
    assert policy.writes_for_answer(meta_target, _answer(200, _file_json("file_1")), 0) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            forward_status("uri-miss", stored=True), "files-proxy; fwd=uri-miss; stored", id="stored"
        ),
        pytest.param(
            forward_status("uri-miss", collapsed=True), "files-proxy; fwd=uri-miss; collapsed", id="collapsed"
        ),
        pytest.param(forward_status("method"), "files-proxy; fwd=method", id="method"),
        pytest.param(stale_status(503), "files-proxy; fwd=stale; fwd-status=503", id="stale-503"),
        pytest.param(stale_status(None), "files-proxy; fwd=stale", id="stale-timeout"),
    ],
)
def test_cache_status_values(value: str, expected: str) -> None:
    assert value == expected


def test_an_uncacheable_query_is_logged_as_a_bypass() -> None:
    assert cache_result(UNCACHEABLE_STATUS) == "bypass"
