"""The Files endpoint: authenticate, route, then one answer per operation.

    list, metadata   a cached read (`caching.py` decides hit, collapse, fetch or stale)
    upload, delete   forwarded, then the cache invalidates what they change
    download         streamed, never cached

What the request did goes into its `Exchange`, which the edge made and the access log reads.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response

from proxy.auth import Authenticator, Caller
from proxy.cache import FORWARDED_BY_METHOD, CacheTarget, TargetKind, target_for
from proxy.caching import Answer, ResponseCache
from proxy.config import Settings, Tenant
from proxy.errors import InvalidRequestError, RequestTimeoutError, RequestTooLargeError
from proxy.exchange import Exchange
from proxy.headers import (
    MAX_VARIANT_HEADER_BYTES,
    VARIANT_HEADERS,
    Headers,
    end_to_end,
    on_behalf_of,
    to_upstream,
)
from proxy.listing import FilteredPages, ReadPage, own_page
from proxy.ownership import Ownership
from proxy.ratelimit import RateLimiter
from proxy.reply import Reply
from proxy.responses import UpstreamStreamResponse, whole_response
from proxy.routes import Operation, RouteMatch, resolve
from proxy.store import Store
from proxy.upstream import UpstreamClient, UpstreamReply

# List pages of 1000 files are a few hundred KB; anything far larger is not a Files API answer.
_MAX_JSON_ANSWER = 32 * 1024 * 1024
# A query string of 100 `ids[]` is about 3 KB.
_MAX_QUERY_BYTES = 8 * 1024
# The usage page lists files in the GA shape (`limit`, `page`, `next_page`).
_GA_VERSION = "2023-06-01"
_TARGET_KINDS = {
    Operation.LIST: TargetKind.LIST_PAGE,
    Operation.UPLOAD: TargetKind.SCOPE,
    Operation.METADATA: TargetKind.FILE,
    Operation.DELETE: TargetKind.FILE,
    Operation.DOWNLOAD: TargetKind.FILE,
}
Send = Callable[..., Awaitable[UpstreamReply]]


class _Call:
    """One authenticated, routed Files request: what every operation's answer is made from."""

    __slots__ = ("exchange", "request", "caller", "match", "received", "headers", "target")

    def __init__(
        self,
        exchange: Exchange,
        request: Request,
        caller: Caller,
        match: RouteMatch,
        received: Headers,
        headers: dict[str, list[str]],
    ) -> None:
        self.exchange = exchange
        self.request = request
        self.caller = caller
        self.match = match
        self.received = received
        self.headers = headers
        self.target = _target(
            _TARGET_KINDS[match.operation],
            caller.tenant,
            headers,
            match.file_id,
            request.scope["query_string"],
        )

    @property
    def tenant(self) -> Tenant:
        return self.caller.tenant


class FilesHandler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        upstream: UpstreamClient,
        cache: ResponseCache,
        ownership: Ownership,
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._cache = cache
        self._rate_limiter = RateLimiter(store)
        self.ownership = ownership
        self._filtered_pages = FilteredPages(settings.cache.local_ttl_s)
        self._answers: dict[Operation, Callable[[_Call], Awaitable[Response]]] = {
            Operation.LIST: self._list,
            Operation.METADATA: self._read,
            Operation.UPLOAD: self._upload,
            Operation.DELETE: self._delete,
            Operation.DOWNLOAD: self._download,
        }
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Take new tenants (keys, rate limits) and limits; a request in flight keeps its tenant."""
        self._authenticator = Authenticator(settings.tenants)
        self.ownership.apply(settings)
        self._max_upload_bytes = settings.limits.max_upload_bytes
        self._client_body_timeout_s = settings.limits.client_body_timeout_s
        self._client_send_timeout_s = settings.limits.client_send_timeout_s

    async def handle(self, exchange: Exchange, request: Request) -> Response:
        """Answer one request to any path; only the five Files routes ever reach upstream. Every
        store call of the request (rate limit, ownership, cache) shares one `cache.timeout_s`."""
        with self._store.request_budget():
            call = await self._admit(exchange, request)
            return await self._answers[call.match.operation](call)

    async def _admit(self, exchange: Exchange, request: Request) -> _Call:
        received = end_to_end(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.scope["headers"]
        )
        headers: dict[str, list[str]] = {}
        for name, value in received:
            headers.setdefault(name, []).append(value)
        caller = self._authenticator.authenticate(
            headers.get("x-api-key", []), headers.get("authorization", [])
        )
        exchange.tenant = tenant = caller.tenant
        match = resolve(request.method, request.scope.get("raw_path") or request.url.path.encode())
        exchange.operation, exchange.file_id = match.operation, match.file_id
        _check_key_inputs(headers, request.scope["query_string"])
        await self._rate_limiter.check(tenant)
        await self.ownership.admit(tenant, match.operation, match.file_id)
        return _Call(exchange, request, caller, match, received, headers)

    async def _read(self, call: _Call) -> Response:
        answer = await self._cache.read(call.target, lambda: self._read_whole(call), no_cache=_no_cache(call))
        return _answered(call.exchange, answer)

    async def _list(self, call: _Call) -> Response:
        if not self.ownership.filters(call.tenant):
            return await self._read(call)
        read_page = self._page_reader(call.tenant, call.headers, self._sender(call), _no_cache(call))
        own = await self._own_list(call.tenant, call.request.scope["query_string"], read_page)
        return _answered(call.exchange, own)

    async def _upload(self, call: _Call) -> Response:
        body = self._upload_body(call)
        declared = _first(call.headers, "content-length")
        async with self.ownership.upload(call.tenant, declared) as upload:
            reply = await self._read_whole(call, upload.bounded(body))
            await upload.settle(reply)
        if reply.status == 200:
            call.exchange.upload_size_bytes = _size_bytes(reply.body)
        await self._cache.after_upload(call.target, reply)
        return _forwarded(call.exchange, reply)

    async def _delete(self, call: _Call) -> Response:
        reply = await self._read_whole(call)
        if await self._cache.after_delete(call.target, reply):
            await self.ownership.forget(call.tenant, call.match.file_id)
        return _forwarded(call.exchange, reply)

    async def _download(self, call: _Call) -> Response:
        reply = await self._sender(call)(stream=True)
        call.exchange.cache = FORWARDED_BY_METHOD
        return UpstreamStreamResponse(reply, self._client_send_timeout_s)

    def _sender(self, call: _Call) -> Send:
        """Sends this request upstream (with another query, for the pages of an `own` list), timed."""

        async def send(
            body: AsyncIterator[bytes] | None = None, *, stream: bool = False, query: bytes | None = None
        ) -> UpstreamReply:
            operation = call.match.operation
            headers = to_upstream(
                call.received,
                call.caller.key_headers,
                call.tenant.api_key,
                with_body=operation is Operation.UPLOAD,
            )
            started = time.perf_counter()
            try:
                return await self._upstream.send(
                    operation.method,
                    call.match.upstream_path,
                    call.request.scope["query_string"] if query is None else query,
                    headers,
                    body,
                    tenant=call.tenant,
                    stream=stream,
                )
            finally:
                call.exchange.upstream_ms = round((time.perf_counter() - started) * 1000, 3)

        return send

    async def _read_whole(self, call: _Call, body: AsyncIterator[bytes] | None = None) -> Reply:
        """Send, and read the small JSON answer whole (it may be cached or fill the cache)."""
        reply = await self._sender(call)(body)
        return await reply.read_whole(_MAX_JSON_ANSWER)

    async def list_files(self, tenant: Tenant, query: bytes) -> Reply:
        """One GA list page of a tenant's files for the usage page, answered through the cache (and the
        tenant's rate limit) as the same request from an SDK would be."""
        await self._rate_limiter.check(tenant)
        headers = on_behalf_of(tenant.api_key, _GA_VERSION)

        async def send(*, query: bytes) -> UpstreamReply:
            return await self._upstream.send("GET", Operation.LIST.template, query, headers, tenant=tenant)

        read_page = self._page_reader(tenant, {"anthropic-version": [_GA_VERSION]}, send, False)
        if self.ownership.filters(tenant):
            return (await self._own_list(tenant, query, read_page)).reply
        return (await read_page(query)).reply

    def _page_reader(
        self, tenant: Tenant, headers: dict[str, list[str]], send: Send, no_cache: bool
    ) -> ReadPage:
        """Reads one list page by its query through the cache shared by every tenant on the key."""

        def read_page(query: bytes) -> Awaitable[Answer]:
            target = _target(TargetKind.LIST_PAGE, tenant, headers, None, query)

            async def fetch() -> Reply:
                return await (await send(query=query)).read_whole(_MAX_JSON_ANSWER)

            return self._cache.read(target, fetch, no_cache=no_cache)

        return read_page

    async def _own_list(self, tenant: Tenant, query: bytes, read_page: ReadPage) -> Answer:
        """The list answer holding only this `own` tenant's files (listing.py)."""

        async def owned(file_ids: Sequence[str]) -> set[str]:
            return await self.ownership.owned_among(tenant, file_ids)

        remembered = (self._filtered_pages, tenant.name)
        return await own_page(query, read_page, owned, self.ownership.config.max_list_pages, remembered)

    def _upload_body(self, call: _Call) -> AsyncIterator[bytes]:
        declared = _first(call.headers, "content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequestError("Content-Length must be a non-negative integer.")
            if int(declared) > self._max_upload_bytes:
                raise self._too_large()
        return self._limited(call.request.stream())

    async def _limited(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The body, cut off when too large or when the client pauses too long (uvicorn never does:
        a stalled upload would hold its upstream connection forever). Raising here, inside the body
        that aiohttp is sending, drops the upstream connection, so the upstream never completes it."""
        received = 0
        timeout_s = self._client_body_timeout_s
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeoutError(
                    f"No request body received for {timeout_s:g} seconds.", headers={"connection": "close"}
                ) from None
            received += len(chunk)
            if received > self._max_upload_bytes:
                raise self._too_large()
            yield chunk

    def _too_large(self) -> RequestTooLargeError:
        limit = self._max_upload_bytes
        return RequestTooLargeError(f"Upload is larger than this proxy's limit of {limit} bytes.")


def _answered(exchange: Exchange, answer: Answer) -> Response:
    exchange.cache = answer.outcome
    return whole_response(answer.reply)


def _forwarded(exchange: Exchange, reply: Reply) -> Response:
    exchange.cache = FORWARDED_BY_METHOD
    return whole_response(reply)


def _target(
    kind: TargetKind, tenant: Tenant, headers: dict[str, list[str]], file_id: str | None, query: bytes
) -> CacheTarget:
    return target_for(
        kind,
        tenant.cache_scope,
        _first(headers, "anthropic-workspace-id"),
        _first(headers, "anthropic-version"),
        headers.get("anthropic-beta", []),
        file_id,
        query,
    )


def _no_cache(call: _Call) -> bool:
    return "no-cache" in (_first(call.headers, "cache-control") or "").lower()


def _check_key_inputs(headers: dict[str, list[str]], query: bytes) -> None:
    """Bound what the cache key is made of, so no client value makes the key costly to build or keep."""
    for name in VARIANT_HEADERS:
        if sum(len(value) for value in headers.get(name, ())) > MAX_VARIANT_HEADER_BYTES:
            raise InvalidRequestError(f"{name}: longer than {MAX_VARIANT_HEADER_BYTES} bytes.")
    if len(query) > _MAX_QUERY_BYTES:
        raise InvalidRequestError(f"Query string longer than {_MAX_QUERY_BYTES} bytes.")


def _size_bytes(file_object: bytes) -> int | None:
    """The `size_bytes` of an uploaded file's answer, if it is a well-formed file object."""
    try:
        size = json.loads(file_object).get("size_bytes")
    except (ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    found = headers.get(name)
    return found[0] if found else None
