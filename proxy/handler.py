"""The Files endpoint: authenticate, route, swap the key, forward, stream the answer back."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from proxy.auth import CREDENTIAL_HEADERS, Authenticator, Caller
from proxy.config import Settings
from proxy.errors import InvalidRequestError, RequestTooLargeError
from proxy.responses import UpstreamStreamResponse
from proxy.routes import Operation, resolve
from proxy.upstream import UpstreamClient, end_to_end


class FilesHandler:
    def __init__(self, settings: Settings, upstream: UpstreamClient) -> None:
        self._authenticator = Authenticator(settings.tenants)
        self._upstream = upstream
        self._max_upload_bytes = settings.limits.max_upload_bytes

    async def handle(self, request: Request) -> Response:
        """Answer one request to any path; only the five Files routes ever reach upstream."""
        caller = self._authenticator.authenticate(request.headers)
        match = resolve(request.method, request.scope.get("raw_path") or request.url.path.encode())
        body = self._upload_body(request) if match.operation is Operation.UPLOAD else None
        reply = await self._upstream.send(
            match.operation.method,
            match.upstream_path,
            request.scope["query_string"],
            _upstream_headers(request, caller),
            body,
        )
        return UpstreamStreamResponse(reply, extra_headers=[])

    def _upload_body(self, request: Request) -> AsyncIterator[bytes]:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequestError("Content-Length must be a non-negative integer.")
            if int(declared) > self._max_upload_bytes:
                raise self._too_large()
        return self._limited(request.stream())

    async def _limited(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > self._max_upload_bytes:
                raise self._too_large()
            yield chunk

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"Upload is larger than this proxy's limit of {self._max_upload_bytes} bytes."
        )


def _upstream_headers(request: Request, caller: Caller) -> list[tuple[str, str]]:
    """The client's end-to-end headers with its proxy key replaced by the tenant's Anthropic key."""
    headers = [
        (name, value) for name, value in end_to_end(request.headers.items()) if name not in CREDENTIAL_HEADERS
    ]
    api_key = caller.tenant.api_key
    if "x-api-key" in caller.key_headers:
        headers.append(("x-api-key", api_key))
    if "authorization" in caller.key_headers:
        headers.append(("authorization", f"Bearer {api_key}"))
    return headers
