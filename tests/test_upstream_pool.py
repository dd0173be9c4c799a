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


async def _concurrent_gets(
    transport: httpx.AsyncBaseTransport, monkeypatch: pytest.MonkeyPatch, workers: int, requests_each: int
) -> tuple[int, int]:
    """`workers` tasks each sending `requests_each` GETs one after another: how many times a request
    started on a connection, and on how many connections in all."""
    started_on: list[httpcore.AsyncHTTPConnection] = []  # held, so no id is reused
    start = httpcore.AsyncHTTPConnection.handle_async_request

    async def counted(self: httpcore.AsyncHTTPConnection, request: httpcore.Request) -> httpcore.Response:
        started_on.append(self)
        return await start(self, request)

    monkeypatch.setattr(httpcore.AsyncHTTPConnection, "handle_async_request", counted)
    with Served(Starlette(routes=[Route("/", _ok)])) as upstream:
        async with httpx.AsyncClient(transport=transport, base_url=upstream.url) as client:

            async def worker() -> None:
                for _ in range(requests_each):
                    (await client.get("/")).raise_for_status()

            await asyncio.gather(*(worker() for _ in range(workers)))
    return len(started_on), len({id(connection) for connection in started_on})


async def test_each_request_starts_on_the_first_connection_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With httpcore's own pool, a request handed a connection that another request took first is
    queued and handed one again, sometimes hundreds of times (encode/httpcore#822)."""
    transport = fair_transport(httpx.Limits(max_connections=100, max_keepalive_connections=20))
    starts, _ = await _concurrent_gets(transport, monkeypatch, workers=8, requests_each=150)
    assert starts == 8 * 150


async def test_connections_are_kept_alive_while_more_requests_are_in_flight_than_the_keepalive_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpcore closes every connection that goes idle once it holds more connections than
    `max_keepalive_connections`, so each request then opens a new one."""
    transport = fair_transport(httpx.Limits(max_connections=100, max_keepalive_connections=2))
    _, connections = await _concurrent_gets(transport, monkeypatch, workers=8, requests_each=100)
    assert connections <= 2 * 8


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
