"""Build the proxy's ASGI app. Nothing starts at import; clients open and close with the lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, request_response

from proxy.cache import CachePolicy
from proxy.caching import ResponseCache
from proxy.config import Settings
from proxy.errors import ProxyError, error_response, new_request_id
from proxy.handler import FilesHandler
from proxy.store import RedisStore, open_store
from proxy.upstream import UpstreamClient

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    http_client: httpx.AsyncClient | None = None,
    store: RedisStore | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The proxy app for these settings; `http_client` and `store` replace the configured ones."""
    upstream = UpstreamClient(settings.upstream, client=http_client)
    cache_config = settings.cache
    store = store or open_store(
        cache_config.url, max_connections=cache_config.max_connections, timeout_s=cache_config.timeout_s
    )
    cache = ResponseCache(
        CachePolicy(cache_config), store, collapse_timeout_s=cache_config.collapse_timeout_s, clock=clock
    )
    handler = FilesHandler(settings, upstream, cache)

    async def readyz(request: Request) -> Response:
        """Ready once started; the cache state is reported, never a reason to be unready."""
        cache_state = "up" if await store.ping() else "unavailable"
        return JSONResponse({"status": "ready", "cache": cache_state})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await upstream.aclose()
            await store.aclose()

    return Starlette(
        routes=[
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            # Every other path and method goes to the handler, which answers 404/405 itself.
            Mount("", app=request_response(handler.handle)),
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
