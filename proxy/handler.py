"""The Files endpoint: authenticate, route, swap the key, then answer from cache or forward."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response

from proxy.auth import CREDENTIAL_HEADERS, Authenticator, Caller
from proxy.cache import METHOD_STATUS, Entry, target_for
from proxy.caching import Answer, ResponseCache
from proxy.config import Settings, Tenant
from proxy.errors import InvalidRequestError, RequestTimeoutError, RequestTooLargeError
from proxy.listing import FilteredPages, ReadPage, own_page
from proxy.ownership import Ownership
from proxy.ratelimit import RateLimiter
from proxy.responses import UpstreamStreamResponse, answer_response
from proxy.routes import Operation, resolve
from proxy.upstream import UpstreamClient, UpstreamReply, end_to_end

# List pages of 1000 files are a few hundred KB; anything far larger is not a Files API answer.
_MAX_JSON_ANSWER = 32 * 1024 * 1024
# The headers that choose an answer's shape (part of the cache key), and their bound in bytes; real
# values are a few dozen bytes. A query string of 100 `ids[]` is about 3 KB.
_VARIANT_HEADERS = ("anthropic-beta", "anthropic-version")
_MAX_VARIANT_HEADER_BYTES = 1024
_MAX_QUERY_BYTES = 8 * 1024
# The usage page lists files in the GA shape (`limit`, `page`, `next_page`).
_GA_VERSION = "2023-06-01"


class FilesHandler:
    def __init__(
        self,
        settings: Settings,
        upstream: UpstreamClient,
        cache: ResponseCache,
        rate_limiter: RateLimiter,
        ownership: Ownership | None = None,
    ) -> None:
        self._upstream = upstream
        self._cache = cache
        self._rate_limiter = rate_limiter
        self.ownership = ownership or Ownership(cache.store, settings)
        self._filtered_pages = FilteredPages(settings.cache.local_ttl_s)
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Take new tenants (keys, rate limits) and limits; a request in flight keeps its tenant."""
        self._authenticator = Authenticator(settings.tenants)
        self.ownership.apply(settings)
        self._max_upload_bytes = settings.limits.max_upload_bytes
        self._client_body_timeout_s = settings.limits.client_body_timeout_s
        self._client_send_timeout_s = settings.limits.client_send_timeout_s

    async def handle(self, request: Request) -> Response:
        """Answer one request to any path; only the five Files routes ever reach upstream.

        Every store call of the request (rate limit, ownership, cache) shares one `cache.timeout_s`.
        What the access record needs and only this handler knows goes into `request.state`.
        """
        with self._cache.store.request_budget():
            return await self._handle(request)

    async def _handle(self, request: Request) -> Response:
        notes = request.state
        # Hop-by-hop headers go before anything reads the request: routing, auth, the cache key and
        # forwarding all see the same end-to-end headers (a header named in Connection is not sent on).
        received = end_to_end(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.scope["headers"]
        )
        headers = _header_values(received)
        caller = self._authenticator.authenticate(
            headers.get("x-api-key", []), headers.get("authorization", [])
        )
        notes.tenant, notes.workspace = caller.tenant.name, caller.tenant.workspace
        match = resolve(request.method, request.scope.get("raw_path") or request.url.path.encode())
        operation = match.operation
        notes.route, notes.file_id = operation.template, match.file_id
        _check_key_inputs(headers, request.scope["query_string"])
        await self._rate_limiter.check(caller.tenant)
        target = target_for(
            operation,
            caller.tenant.cache_scope,
            _first(headers, "anthropic-workspace-id"),
            _first(headers, "anthropic-version"),
            headers.get("anthropic-beta", []),
            match.file_id,
            request.scope["query_string"],
        )
        await self.ownership.admit(caller.tenant, operation, match.file_id)

        async def send(
            body: AsyncIterator[bytes] | None = None, *, stream: bool = False, query: bytes | None = None
        ) -> UpstreamReply:
            headers = _upstream_headers(received, caller)
            started = time.perf_counter()
            try:
                path, query = match.upstream_path, request.scope["query_string"] if query is None else query
                return await self._upstream.send(
                    operation.method, path, query, headers, body, tenant=caller.tenant, stream=stream
                )
            finally:
                notes.upstream_ms = round((time.perf_counter() - started) * 1000, 3)

        if operation is Operation.DOWNLOAD:
            reply = await send(stream=True)
            return UpstreamStreamResponse(
                reply, [("cache-status", METHOD_STATUS)], self._client_send_timeout_s
            )
        if operation is Operation.UPLOAD:
            body = self._upload_body(request)
            async with self.ownership.upload(caller.tenant, request.headers.get("content-length")) as upload:
                entry = await self._read_whole(lambda: send(upload.bounded(body)))
                await upload.settle(entry)
            if entry.status == 200:
                notes.upload_size_bytes = _size_bytes(entry.body)
                await self._cache.invalidate(target, self._cache.policy.writes_after_upload(target, entry))
            return answer_response(Answer(entry, METHOD_STATUS))
        if operation is Operation.DELETE:
            entry = await self._read_whole(send)
            if entry.status in (200, 404):
                await self._cache.invalidate(target, self._cache.policy.writes_after_delete(target))
                await self.ownership.forget(caller.tenant, match.file_id)
            return answer_response(Answer(entry, METHOD_STATUS))
        no_cache = "no-cache" in (_first(headers, "cache-control") or "").lower()
        if operation is Operation.LIST and self.ownership.filters(caller.tenant):
            read_page = self._page_reader(caller.tenant, headers, send, no_cache)
            own = await self._own_list(caller.tenant, request.scope["query_string"], read_page)
            return answer_response(own)
        answer = await self._cache.read(target, lambda: self._read_whole(send), no_cache=no_cache)
        return answer_response(answer)

    async def list_files(self, tenant: Tenant, query: bytes) -> Entry:
        """One GA list page of a tenant's files for the usage page, answered through the cache (and the
        tenant's rate limit) as the same request from an SDK would be."""
        await self._rate_limiter.check(tenant)
        headers = [("anthropic-version", _GA_VERSION), ("x-api-key", tenant.api_key)]

        async def send(*, query: bytes) -> UpstreamReply:
            return await self._upstream.send("GET", Operation.LIST.template, query, headers, tenant=tenant)

        read_page = self._page_reader(tenant, {"anthropic-version": [_GA_VERSION]}, send, False)
        if self.ownership.filters(tenant):
            return (await self._own_list(tenant, query, read_page)).entry
        return (await read_page(query)).entry

    def _page_reader(
        self,
        tenant: Tenant,
        headers: dict[str, list[str]],
        send: Callable[..., Awaitable[UpstreamReply]],
        no_cache: bool,
    ) -> ReadPage:
        """Reads one list page by its query through the cache shared by every tenant on the key."""

        def read_page(query: bytes) -> Awaitable[Answer]:
            target = target_for(
                Operation.LIST,
                tenant.cache_scope,
                _first(headers, "anthropic-workspace-id"),
                _first(headers, "anthropic-version"),
                headers.get("anthropic-beta", []),
                None,
                query,
            )

            def fetch() -> Awaitable[Entry]:
                return self._read_whole(lambda: send(query=query))

            return self._cache.read(target, fetch, no_cache=no_cache)

        return read_page

    async def _own_list(self, tenant: Tenant, query: bytes, read_page: ReadPage) -> Answer:
        """The list answer holding only this `own` tenant's files (listing.py)."""

        async def owned(file_ids: Sequence[str]) -> set[str]:
            return await self.ownership.owned_among(tenant, file_ids)

        remembered = (self._filtered_pages, tenant.name)
        return await own_page(query, read_page, owned, self.ownership.config.max_list_pages, remembered)

    async def _read_whole(self, send: Callable[[], Awaitable[UpstreamReply]]) -> Entry:
        """Send, and read the small JSON answer whole (it may be cached or fill the cache)."""
        reply = await send()
        try:
            body = await reply.read(_MAX_JSON_ANSWER)
        finally:
            await reply.aclose()
        now = self._cache.clock()
        return Entry(reply.status_code, tuple(reply.decoded_headers), body, now, now, now)

    def _upload_body(self, request: Request) -> AsyncIterator[bytes]:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequestError("Content-Length must be a non-negative integer.")
            if int(declared) > self._max_upload_bytes:
                raise self._too_large()
        return self._limited(request.stream())

    async def _limited(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The body, cut off when too large or when the client pauses too long (uvicorn never does:
        a stalled upload would hold its upstream connection forever). Raising here, inside the body
        that httpx is sending, drops the upstream connection, so the upstream never completes it."""
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


def _header_values(received: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Every header's values by name, in one pass. Starlette's `Headers` scans the whole list again
    for each name looked up: six times per request here."""
    values: dict[str, list[str]] = {}
    for name, value in received:
        values.setdefault(name, []).append(value)
    return values


def _check_key_inputs(headers: dict[str, list[str]], query: bytes) -> None:
    """Bound what the cache key is made of, so no client value makes the key costly to build or keep."""
    for name in _VARIANT_HEADERS:
        if sum(len(value) for value in headers.get(name, ())) > _MAX_VARIANT_HEADER_BYTES:
            raise InvalidRequestError(f"{name}: longer than {_MAX_VARIANT_HEADER_BYTES} bytes.")
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


def _upstream_headers(received: list[tuple[str, str]], caller: Caller) -> list[tuple[str, str]]:
    """The client's end-to-end headers with its proxy key replaced by the tenant's Anthropic key."""
    headers = [(name, value) for name, value in received if name not in CREDENTIAL_HEADERS]
    api_key = caller.tenant.api_key
    if "x-api-key" in caller.key_headers:
        headers.append(("x-api-key", api_key))
    if "authorization" in caller.key_headers:
        headers.append(("authorization", f"Bearer {api_key}"))
    return headers
