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

import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
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


class FilteredPages:
    """Answers filtered from one upstream page lately, per tenant, for `ttl_s`: a list hit is then
    one page read and no JSON work. Keyed by the page's bytes, so any change to the page (an upload
    or delete moves it) is a new key; owners do not change, and "unowned" is believed as long
    (`Ownership.owners`). Bounded in entries and in the size of the pages it keeps."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._answers: OrderedDict[tuple[str, bytes, bytes], tuple[bytes, float]] = OrderedDict()

    def get(self, key: tuple[str, bytes, bytes]) -> bytes | None:
        found = self._answers.get(key)
        return found[0] if found is not None and found[1] > self._clock() else None

    def put(self, key: tuple[str, bytes, bytes], body: bytes) -> None:
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
    first = answer = await read_page(query)
    key = None if remembered is None else (remembered[1], query, first.reply.body)
    if remembered is not None and key is not None and first.reply.status == 200:
        body = remembered[0].get(key)
        if body is not None:
            return replace(first, reply=replace(first.reply, body=body))
    pages = 1
    while True:
        if answer.reply.status != 200:
            return answer
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
    if remembered is not None and key is not None and pages == 1:
        remembered[0].put(key, body)  # a walk depends on later pages too: never remembered
    return replace(first, reply=replace(first.reply, body=body))


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
