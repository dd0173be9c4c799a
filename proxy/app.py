"""Build the proxy's ASGI app. Nothing starts at import; clients open and close with the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.config import Settings
from proxy.errors import ProxyError, error_response, new_request_id
from proxy.handler import FilesHandler
from proxy.upstream import UpstreamClient

logger = logging.getLogger(__name__)


def create_app(settings: Settings, *, http_client: httpx.AsyncClient | None = None) -> Starlette:
    """The proxy app for these settings; `http_client` replaces the upstream client (tests, bench)."""
    upstream = UpstreamClient(settings.upstream, client=http_client)
    handler = FilesHandler(settings, upstream)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await upstream.aclose()

    return Starlette(
        routes=[
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/readyz", _readyz, methods=["GET"]),
            # Every other path and method goes to the handler, which answers 404/405 itself.
            Route("/{path:path}", handler.handle, methods=None),
        ],
        exception_handlers={
            ProxyError: _render_proxy_error,
            ClientDisconnect: _client_gone,
            Exception: _render_unexpected,
        },
        lifespan=lifespan,
    )


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _readyz(request: Request) -> Response:
    return JSONResponse({"status": "ready"})


async def _render_proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    response = error_response(exc.status_code, exc.error_type, exc.message, new_request_id())
    response.headers.update(exc.headers)
    return response


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client left mid-request; the upstream request was already abandoned with it."""
    logger.info("client disconnected during the request")
    return Response(status_code=499)


async def _render_unexpected(request: Request, exc: Exception) -> Response:
    """A bug of ours: the client still gets the envelope, never a traceback."""
    return error_response(500, "api_error", "Internal error in files-proxy.", new_request_id())
