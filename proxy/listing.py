"""A list page for an `own` tenant: the shared upstream page, filtered to the files it owns.

The upstream page (from the cache shared by every tenant on the key) is filtered when answering, so
isolation costs no extra upstream request. The SDKs stop paginating at an empty page (`if not items:
return False`), so when a page holds none of the tenant's files the next upstream page is read, up
to `ownership.max_list_pages` pages per request; past that bound the answer is an empty page with
the upstream cursor, and an SDK stops there. Cursors are the upstream's own, from the last page read:

- beta `{data, has_more, first_id, last_id}`: `after_id` = last_id pages on towards older files,
  `before_id` = first_id towards newer ones, exactly as on the upstream;
- GA `{data, next_page}`: `page` = next_page; an `ids[]` list is one page, filtered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

from proxy.caching import Answer
from proxy.errors import UpstreamUnavailableError

ReadPage = Callable[[bytes], Awaitable[Answer]]
_MAX_REMEMBERED_PAGES = 256
_MAX_REMEMBERED_PAGE_BYTES = 64 * 1024
# The ids among these that the tenant owns.
OwnedAmong = Callable[[Sequence[str]], Awaitable[set[str]]]
# A filtered answer's key: the tenant, the query, and the upstream page it was filtered from.
_Key = tuple[str, bytes, bytes]


class FilteredPages:
    """Answers filtered from one upstream page lately, per tenant, for `ttl_s`: a list hit is then
    one page read and no JSON work. Keyed by the page's bytes, so any change to the page (an upload
    or delete moves it) is a new key; owners do not change, and "unowned" is believed as long
    (`Ownership.owners`). Bounded in entries and in the size of the pages it keeps.

    While one request filters a page, the others asking for that page for the same tenant wait for
    its answer instead of filtering it (and asking the store for its owners) too: when an answer
    lapses under load, every request in flight would otherwise filter the page at once. A waiter
    waits no longer than the first request takes, which it would have taken itself."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._answers: OrderedDict[_Key, tuple[bytes, float]] = OrderedDict()
        self._filtering: dict[_Key, asyncio.Future[bytes | None]] = {}

    async def get(self, key: _Key) -> bytes | None:
        """The answer remembered, or being made by another request (then once made); None: make it."""
        found = self._answers.get(key)
        if found is not None and found[1] > self._clock():
            return found[0]
        made = self._filtering.get(key)
        # Shielded: a waiter that leaves must not cancel the answer the others wait for.
        return None if made is None else await asyncio.shield(made)

    @contextlib.contextmanager
    def making(self, key: _Key) -> Iterator[Callable[[bytes], None]]:
        """While this request filters the page: `get` makes others wait for it, and the callable
        given hands them (and remembers) the answer. Leaving without one tells them to make their own."""
        made: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._filtering.setdefault(key, made)

        def put(body: bytes) -> None:
            self._put(key, body)
            made.set_result(body)

        try:
            yield put
        finally:
            if not made.done():
                made.set_result(None)
            if self._filtering.get(key) is made:
                del self._filtering[key]

    def _put(self, key: _Key, body: bytes) -> None:
        if self._ttl_s <= 0 or len(key[2]) > _MAX_REMEMBERED_PAGE_BYTES:
            return
        if len(self._answers) >= _MAX_REMEMBERED_PAGES:
            self._answers.popitem(last=False)
        self._answers[key] = (body, self._clock() + self._ttl_s)


async def own_page(
    query: bytes,
    read_page: ReadPage,
    owned_among: OwnedAmong,
    max_pages: int,
    remembered: tuple[FilteredPages, str] | None = None,
) -> Answer:
    """The list answer for `query` holding only the tenant's files (an error passes through).
    `remembered`: where answers filtered from a single page are kept, and the tenant's name."""
    first = await read_page(query)
    if remembered is None or first.reply.status != 200:
        answer, _ = await _filtered(query, first, read_page, owned_among, max_pages)
        return answer
    filtered_pages, tenant = remembered
    key = (tenant, query, first.reply.body)
    body = await filtered_pages.get(key)
    if body is None:
        with filtered_pages.making(key) as put:
            answer, one_page = await _filtered(query, first, read_page, owned_among, max_pages)
            if one_page:
                put(answer.reply.body)  # a walk depends on later pages too: never remembered
            return answer
    return replace(first, reply=replace(first.reply, body=body))


async def _filtered(
    query: bytes, first: Answer, read_page: ReadPage, owned_among: OwnedAmong, max_pages: int
) -> tuple[Answer, bool]:
    """`first` (the page `query` read) filtered to the tenant's files, walking on while a page holds
    none of them; and whether the answer came from `first` alone (an error met on the way: as is)."""
    answer, pages = first, 1
    while True:
        if answer.reply.status != 200:
            return answer, False
        page = _page(answer.reply.body)
        data: list[dict[str, Any]] = page["data"]
        mine = await owned_among([item["id"] for item in data])
        kept = [item for item in data if item["id"] in mine]
        following = next_query(query, page)
        if kept or following is None or pages >= max_pages:
            break
        query, pages = following, pages + 1
        answer = await read_page(query)
    body = json.dumps({**page, "data": kept}, separators=(",", ":")).encode()
    return replace(first, reply=replace(first.reply, body=body)), pages == 1


def next_query(query: bytes, page: dict[str, Any]) -> bytes | None:
    """The query of the upstream page after `page`, in the direction `query` pages; None at the end."""
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    names = {name for name, _ in pairs}
    if "has_more" in page:
        if page.get("has_more") is not True:
            return None
        name, cursor = (
            ("before_id", page.get("first_id")) if "before_id" in names else ("after_id", page.get("last_id"))
        )
    else:
        name, cursor = "page", page.get("next_page")
        if "ids[]" in names:
            return None
    if not isinstance(cursor, str) or not cursor:
        return None
    kept = [(key, value) for key, value in pairs if key != name]
    return urlencode([*kept, (name, cursor)], encoding="latin-1").encode("latin-1")


def _page(body: bytes) -> dict[str, Any]:
    """The list page as a dict whose `data` is file objects with string ids; an upstream fault else
    (never shown unfiltered to an `own` tenant)."""
    try:
        page = json.loads(body)
    except ValueError:
        page = None
    data = page.get("data") if isinstance(page, dict) else None
    if not isinstance(data, list) or not all(
        isinstance(f, dict) and isinstance(f.get("id"), str) for f in data
    ):
        raise UpstreamUnavailableError("The Anthropic API sent a file list the proxy could not read.")
    assert isinstance(page, dict)
    return page
