"""The upstream connection pool never gives one idle connection to two requests at once."""

from __future__ import annotations

import asyncio

import httpcore
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.upstream_pool import fair_transport
from tests.support import Served

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _ok(request: Request) -> Response:
    return JSONResponse({"type": "file"})


async def test_each_request_starts_on_the_first_connection_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With httpcore's own pool, a request handed a connection that another request took first is
    queued and handed one again, sometimes hundreds of times (encode/httpcore#822)."""
    starts = 0
    start = httpcore.AsyncHTTPConnection.handle_async_request

    async def counted(self: httpcore.AsyncHTTPConnection, request: httpcore.Request) -> httpcore.Response:
        nonlocal starts
        starts += 1
        return await start(self, request)

    monkeypatch.setattr(httpcore.AsyncHTTPConnection, "handle_async_request", counted)
    workers, requests_each = 8, 150
    transport = fair_transport(httpx.Limits(max_connections=100, max_keepalive_connections=20))
    with Served(Starlette(routes=[Route("/", _ok)])) as upstream:
        async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:

            async def worker() -> None:
                for _ in range(requests_each):
                    (await client.get("/")).raise_for_status()

            await asyncio.gather(*(worker() for _ in range(workers)))

    assert starts == workers * requests_each


async def test_a_body_is_read_in_pieces_larger_than_httpcores_64_kib() -> None:
    async def blob(request: Request) -> Response:
        return Response(bytes(8 * 1024 * 1024), media_type="application/octet-stream")

    transport = fair_transport(httpx.Limits(max_connections=1))
    with Served(Starlette(routes=[Route("/blob", blob)])) as upstream:
        async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:
            async with client.stream("GET", "/blob") as response:
                # A slow reader lets the socket buffer fill, as a client slower than upstream does.
                sizes = []
                async for chunk in response.aiter_raw():
                    sizes.append(len(chunk))
                    await asyncio.sleep(0.001)

    assert sum(sizes) == 8 * 1024 * 1024
    assert max(sizes) > 64 * 1024
