"""Filtering a list page per tenant (proxy/listing.py) and the ownership policy, without servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from proxy.cache import CacheOutcome
from proxy.caching import Answer
from proxy.config import ConfigError, Tenant, load_settings
from proxy.errors import UpstreamUnavailableError
from proxy.listing import FilteredPages, OwnedAmong, next_query, own_page
from proxy.ownership import expires_epoch, file_fields, sees_all, shared_keys
from proxy.reply import Reply


@pytest.mark.parametrize(
    ("query", "page", "expected"),
    [
        pytest.param(
            b"limit=2", {"has_more": True, "last_id": "f9"}, b"limit=2&after_id=f9", id="beta-first"
        ),
        pytest.param(
            b"limit=2&after_id=f3",
            {"has_more": True, "last_id": "f9"},
            b"limit=2&after_id=f9",
            id="beta-after",
        ),
        pytest.param(
            b"before_id=f3&limit=2",
            {"has_more": True, "first_id": "f1", "last_id": "f2"},
            b"limit=2&before_id=f1",
            id="beta-before",
        ),
        pytest.param(b"limit=2", {"has_more": False, "last_id": "f9"}, None, id="beta-end"),
        pytest.param(
            b"limit=2&beta=true", {"next_page": "page_x"}, b"limit=2&beta=true&page=page_x", id="ga"
        ),
        pytest.param(b"page=page_a&limit=2", {"next_page": "page_b"}, b"limit=2&page=page_b", id="ga-next"),
        pytest.param(b"limit=2", {"next_page": None}, None, id="ga-end"),
        pytest.param(b"ids%5B%5D=f1&ids%5B%5D=f2", {"next_page": "page_x"}, None, id="ga-ids-one-page"),
    ],
)
def test_next_query(query: bytes, page: dict[str, Any], expected: bytes | None) -> None:
    assert next_query(query, page) == expected


def _answer(body: dict[str, Any], status: int = 200) -> Answer:
    return Answer(
        Reply(status, (("content-type", "application/json"),), json.dumps(body).encode()),
        CacheOutcome.hit(ttl=60, age=0),
    )


def _ga_pages(ids: list[str], limit: int) -> dict[bytes, Answer]:
    """A GA listing of `ids` in pages of `limit`, by the query that asks for each page."""
    pages: dict[bytes, Answer] = {}
    for start in range(0, len(ids), limit):
        query = b"limit=%d" % limit + (b"&page=p%d" % start if start else b"")
        following = f"p{start + limit}" if start + limit < len(ids) else None
        pages[query] = _answer(
            {"data": [{"id": i} for i in ids[start : start + limit]], "next_page": following}
        )
    return pages


def _walk(
    pages: dict[bytes, Answer], owned: set[str], query: bytes, max_pages: int
) -> tuple[dict[str, Any], int]:
    read: list[bytes] = []

    async def read_page(asked: bytes) -> Answer:
        read.append(asked)
        return pages[asked]

    async def owned_among(ids: Sequence[str]) -> set[str]:
        return owned & set(ids)

    answer = asyncio.run(own_page(query, read_page, owned_among, max_pages))
    return json.loads(answer.reply.body), len(read)


def test_a_page_without_the_tenants_files_is_skipped() -> None:
    pages = _ga_pages(["a", "x1", "x2", "x3", "x4", "b"], limit=2)
    body, read = _walk(pages, {"a", "b"}, b"limit=2", max_pages=10)
    assert body == {"data": [{"id": "a"}], "next_page": "p2"} and read == 1
    body, read = _walk(pages, {"a", "b"}, b"limit=2&page=p2", max_pages=10)
    assert body == {"data": [{"id": "b"}], "next_page": None} and read == 2


def test_the_walk_is_bounded_and_keeps_the_cursor() -> None:
    pages = _ga_pages(["x0", "x1", "x2", "x3", "x4", "b"], limit=1)
    body, read = _walk(pages, {"b"}, b"limit=1", max_pages=3)
    assert body == {"data": [], "next_page": "p3"} and read == 3


def test_an_error_page_passes_through_and_an_unreadable_one_is_refused() -> None:
    error = _answer({"type": "error"}, status=429)
    assert _walk_raw({b"": error}) is error
    with pytest.raises(UpstreamUnavailableError):
        _walk_raw({b"": _answer({"data": "everything"})})


def _walk_raw(pages: dict[bytes, Answer]) -> Answer:
    async def read_page(asked: bytes) -> Answer:
        return pages[asked]

    async def owned_among(ids: Sequence[str]) -> set[str]:
        return set()

    return asyncio.run(own_page(b"", read_page, owned_among, 10))


def _tenant(name: str, key: str, files: str | None = None) -> Tenant:
    return Tenant(name=name, workspace=name, client_key_hashes=frozenset(), api_key=key, files=files)  # type: ignore[arg-type]


def test_default_mode_is_own_only_on_a_shared_key() -> None:
    tenants = [_tenant("a", "k1"), _tenant("b", "k1"), _tenant("c", "k1", "all"), _tenant("d", "k2")]
    assert [sees_all(t, tenants) for t in tenants] == [False, False, True, True]
    assert shared_keys(tenants) == [["a", "b", "c"]]
    assert sees_all(_tenant("e", "k3", "own"), tenants) is False


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b'{"id":"f","size_bytes":3}', ("f", 3, 0), id="beta"),
        pytest.param(b'{"id":"f","size_bytes":3,"expires_at":"1970-01-01T00:01:00Z"}', ("f", 3, 60), id="ga"),
        pytest.param(b'{"id":"f","size_bytes":-1}', None, id="negative"),
        pytest.param(b'{"id":"f","size_bytes":true}', None, id="bool"),
        pytest.param(b"not json", None, id="garbage"),
    ],
)
def test_file_fields(body: bytes, expected: tuple[str, int, int] | None) -> None:
    assert file_fields(body) == expected


def test_expires_epoch_ignores_what_it_cannot_read() -> None:
    assert expires_epoch(None) == 0 and expires_epoch("soon") == 0


def test_config_reads_files_quotas_and_ownership(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    tenant = (
        '[[tenants]]\nname = "a"\nworkspace = "w"\napi_key_env = "K"\nclient_key_sha256 = ["{}"]\n'.format(
            "a" * 64
        )
    )
    path.write_text(
        "[ownership]\nreconcile_interval_s = 0\nmax_list_pages = 3\n"
        + tenant
        + 'files = "own"\nstorage_quota_bytes = 1000\nmax_files = 5\n'
    )
    settings = load_settings(path, {"K": "sk"})
    assert settings.ownership.reconcile_interval_s == 0 and settings.ownership.max_list_pages == 3
    (only,) = settings.tenants
    assert (only.files, only.storage_quota_bytes, only.max_files) == ("own", 1000, 5)
    path.write_text(tenant + 'files = "mine"\n')
    with pytest.raises(ConfigError, match="files"):
        load_settings(path, {"K": "sk"})
    path.write_text("[ownership]\nreconcile_every = 1\n" + tenant)
    with pytest.raises(ConfigError, match="ownership.reconcile_every: unknown key"):
        load_settings(path, {"K": "sk"})


def test_a_single_page_answer_is_remembered_for_its_ttl_and_a_walk_never() -> None:
    pages = _ga_pages(["a", "x1", "x2", "x3"], limit=2)
    now = [0.0]
    remembered = FilteredPages(1.0, clock=lambda: now[0])
    lookups: list[Sequence[str]] = []

    async def read_page(asked: bytes) -> Answer:
        return pages[asked]

    async def owned_among(ids: Sequence[str]) -> set[str]:
        lookups.append(ids)
        return {"a"} & set(ids)

    def ask(query: bytes) -> bytes:
        answer = asyncio.run(own_page(query, read_page, owned_among, 10, (remembered, "red")))
        return answer.reply.body

    first = ask(b"limit=2")
    assert ask(b"limit=2") == first and len(lookups) == 1
    now[0] = 1.5
    assert ask(b"limit=2") == first and len(lookups) == 2
    ask(b"limit=2&page=p2")  # the last page: none of red's, nothing after it; one page read
    pages[b"limit=2&page=p2"] = _answer({"data": [{"id": "x2"}], "next_page": "p4"})
    pages[b"limit=2&page=p4"] = _answer({"data": [{"id": "x3"}], "next_page": None})
    lookups.clear()
    ask(b"limit=2&page=p2")
    ask(b"limit=2&page=p2")
    assert len(lookups) == 4  # a walk of two pages, twice: never remembered


def _concurrent_asks(count: int, owned_among: OwnedAmong, *, first_leaves: bool = False) -> list[object]:
    """`count` requests for one page of red's at once, each reading the page itself; with
    `first_leaves`, the first is cancelled while it filters. Their bodies, or what each raised."""
    pages = _ga_pages(["a", "x1"], limit=2)
    remembered = FilteredPages(1.0)

    async def read_page(asked: bytes) -> Answer:
        return pages[asked]

    async def ask() -> object:
        answer = await own_page(b"limit=2", read_page, owned_among, 10, (remembered, "red"))
        return json.loads(answer.reply.body)

    async def main() -> list[object]:
        tasks = [asyncio.create_task(ask()) for _ in range(count)]
        for _ in range(5):  # every request has read the page: the first filters, the others wait
            await asyncio.sleep(0)
        if first_leaves:
            tasks[0].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main())


def _owned_after_turns(lookups: list[Sequence[str]], *, failures: int = 0) -> OwnedAmong:
    """red owns `a`; each lookup takes some turns of the loop; the first `failures` lookups fail."""

    async def owned_among(ids: Sequence[str]) -> set[str]:
        lookups.append(ids)
        for _ in range(10):
            await asyncio.sleep(0)
        if len(lookups) <= failures:
            raise UpstreamUnavailableError("The store is away.")
        return {"a"} & set(ids)

    return owned_among


_RED_PAGE = {"data": [{"id": "a"}], "next_page": None}


def test_requests_for_a_page_being_filtered_wait_for_that_answer_instead_of_filtering_it_again() -> None:
    lookups: list[Sequence[str]] = []
    answers = _concurrent_asks(20, _owned_after_turns(lookups))
    assert answers == [_RED_PAGE] * 20
    assert len(lookups) == 1


def test_when_the_filtering_request_fails_or_leaves_the_waiting_ones_filter_for_themselves() -> None:
    lookups: list[Sequence[str]] = []
    failed, *others = _concurrent_asks(5, _owned_after_turns(lookups, failures=1))
    assert isinstance(failed, UpstreamUnavailableError)
    assert others == [_RED_PAGE] * 4
    assert len(lookups) == 5
    left, *others = _concurrent_asks(5, _owned_after_turns(lookups), first_leaves=True)
    assert isinstance(left, asyncio.CancelledError)
    assert others == [_RED_PAGE] * 4
