"""The upstream client: header filtering (pure), what reaches the upstream byte for byte, no retry,
no redirect, no decompression of downloads, reused connections, each team's share, and timeouts."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anthropic
import pytest
from pydantic import HttpUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from files_api_simulator import Simulator
from proxy.config import UpstreamConfig
from proxy.errors import UpstreamTimeoutError
from proxy.headers import end_to_end
from proxy.upstream import UpstreamClient
from tests.constants import ALPHA, BRAVO, SDK_VERSION
from tests.support import Served, raw_http, served_proxy, team_settings


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([("Content-Type", "a/b")], [("content-type", "a/b")], id="lower-cased"),
        pytest.param(
            [("connection", "close"), ("keep-alive", "5"), ("transfer-encoding", "chunked"), ("x-a", "1")],
            [("x-a", "1")],
            id="hop-by-hop",
        ),
        pytest.param(
            [("Connection", "X-Secret, Upgrade"), ("x-secret", "s"), ("upgrade", "h2c"), ("x-b", "2")],
            [("x-b", "2")],
            id="named-in-connection",
        ),
        pytest.param(
            [
                ("proxy-authorization", "Basic x"),
                ("te", "trailers"),
                ("trailer", "x"),
                ("proxy-connection", "k"),
            ],
            [],
            id="proxy-and-te",
        ),
        pytest.param(
            [
                ("anthropic-beta", "a"),
                ("anthropic-beta", "b"),
                ("request-id", "req_1"),
                ("retry-after-ms", "5"),
            ],
            [
                ("anthropic-beta", "a"),
                ("anthropic-beta", "b"),
                ("request-id", "req_1"),
                ("retry-after-ms", "5"),
            ],
            id="end-to-end-kept-with-repeats",
        ),
    ],
)
def test_end_to_end_drops_hop_by_hop_headers(
    headers: list[tuple[str, str]], expected: list[tuple[str, str]]
) -> None:
    assert end_to_end(headers) == expected


def test_a_failed_upload_is_never_retried_by_the_proxy(
    alpha: anthropic.Anthropic, simulator: Simulator
) -> None:
    simulator.inject_fault(status=503, method="POST")
    with pytest.raises(anthropic.InternalServerError):
        alpha.files.upload(file=("once.txt", b"once", "text/plain"))
    assert [r.method for r in simulator.received] == ["POST"]
    assert simulator.uploads == {}


def test_header_bytes_pass_both_ways_unchanged_or_are_refused() -> None:
    """HTTP allows obs-text (0x80-0xFF) in field values. An answer's header bytes pass unchanged
    whatever they are; aiohttp sends request headers as UTF-8, so a client's bytes that are UTF-8 pass
    unchanged and others are refused (400) rather than changed on the way."""
    seen: list[list[tuple[bytes, bytes]]] = []

    async def content(request: Request) -> Response:
        seen.append(list(request.scope["headers"]))
        response = Response(b"{}", media_type="application/octet-stream")
        echoed = next(value for name, value in request.scope["headers"] if name == b"x-note")
        response.raw_headers += [
            (b"x-note-echo", echoed),
            (b"x-latin", b"caf\xe9 \xff"),
            (b"content-disposition", 'attachment; filename="r\u00e9sum\u00e9.txt"'.encode()),
        ]
        return response

    upstream = Starlette(routes=[Route("/v1/files/{file_id}/content", content)])
    with Served(upstream) as served:
        with served_proxy(team_settings(served.url, tenants=(ALPHA.tenant(),))) as proxy:

            def download(note: bytes) -> tuple[int, dict[str, str], bytes]:
                head = (
                    b"GET /v1/files/file_1/content HTTP/1.1\r\nhost: p\r\nconnection: close\r\n"
                    + f"x-api-key: {ALPHA.proxy_key}\r\n".encode()
                    + b"x-note: "
                    + note
                    + b"\r\n\r\n"
                )
                return raw_http(proxy.port, head)

            status, headers, _ = download("caf\u00e9 \u2713".encode())
            refused_status, _, refused_body = download(b"caf\xe9 \xff")

    assert status == 200
    assert (b"x-note", "caf\u00e9 \u2713".encode()) in seen[0]
    assert headers["x-note-echo"].encode("latin-1") == "caf\u00e9 \u2713".encode()
    assert headers["x-latin"].encode("latin-1") == b"caf\xe9 \xff"
    assert (
        headers["content-disposition"].encode("latin-1")
        == 'attachment; filename="r\u00e9sum\u00e9.txt"'.encode()
    )
    assert refused_status == 400
    assert b"x-note" in refused_body and b"not UTF-8" in refused_body
    assert len(seen) == 1


def test_a_cookie_set_for_one_tenant_never_goes_upstream_for_another() -> None:
    """One pooled client serves every tenant; a cookie an answer sets (a CDN's bot-management
    cookie, say) would otherwise be sent on every later request, whoever makes it."""
    cookies_seen: list[str | None] = []

    async def metadata(request: Request) -> Response:
        cookies_seen.append(request.headers.get("cookie"))
        return JSONResponse(
            {"id": request.path_params["file_id"], "type": "file"},
            headers={"set-cookie": "__cf_bm=alpha-session; Path=/; HttpOnly"},
        )

    upstream = Starlette(routes=[Route("/v1/files/{file_id}", metadata)])
    with Served(upstream) as served:
        with served_proxy(team_settings(served.url)) as proxy:
            for team in (ALPHA, BRAVO, ALPHA):
                head = (
                    b"GET /v1/files/file_1 HTTP/1.1\r\nhost: p\r\nconnection: close\r\n"
                    + f"x-api-key: {team.proxy_key}\r\ncache-control: no-cache\r\n\r\n".encode()
                )
                status, headers, _ = raw_http(proxy.port, head)
                assert status == 200
                assert headers["set-cookie"].startswith("__cf_bm=")  # the client still sees it

    assert cookies_seen == [None, None, None]


class _RawUpstream:
    """An upstream on a socket that records each request head as bytes and answers with `answer`;
    with `answer=None` it reads the head and then nothing more, as a stalled server does."""

    def __init__(self, answer: bytes | None) -> None:
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.heads: list[bytes] = []
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            received = b""
            while b"\r\n\r\n" not in received and (chunk := conn.recv(65536)):
                received += chunk
            self.heads.append(received.partition(b"\r\n\r\n")[0])
            if self._answer is None:
                self._held.append(conn)
                continue
            conn.sendall(self._answer)
            conn.close()

    def close(self) -> None:
        self._listener.close()
        for conn in self._held:
            conn.close()


def _raw_proxy(upstream: _RawUpstream, **config: Any) -> Served:
    return served_proxy(team_settings(upstream.url, tenants=(ALPHA.tenant(),), upstream=config))


def _get(port: int, target: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    head = (
        f"GET {target} HTTP/1.1\r\nhost: p\r\nconnection: close\r\nx-api-key: {ALPHA.proxy_key}\r\n"
        f"anthropic-version: {SDK_VERSION}\r\n{extra}\r\n"
    )
    return raw_http(port, head.encode())


def test_the_upstream_gets_the_clients_headers_and_target_and_nothing_added() -> None:
    """No User-Agent, Accept, Accept-Encoding or cookie of the client library; the path and query
    bytes as received, and no `?` when there is no query."""
    upstream = _RawUpstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )
    try:
        with _raw_proxy(upstream) as proxy:
            _get(proxy.port, "/v1/files/file_a", "x-trace: t1\r\n")
            _get(proxy.port, "/v1/files/file_a?", "cache-control: no-cache\r\n")
            _get(proxy.port, "/v1/files?limit=2&ids%5B%5D=a%2Fb&x=%E2%9C%93")
    finally:
        upstream.close()

    lines = [head.split(b"\r\n") for head in upstream.heads]
    assert [request[0] for request in lines] == [
        b"GET /v1/files/file_a HTTP/1.1",
        b"GET /v1/files/file_a HTTP/1.1",
        b"GET /v1/files?limit=2&ids%5B%5D=a%2Fb&x=%E2%9C%93 HTTP/1.1",
    ]
    names = [line.split(b":")[0].lower() for line in lines[0][1:]]
    assert sorted(names) == [b"anthropic-version", b"host", b"x-api-key", b"x-trace"]
    assert (b"x-api-key: " + ALPHA.upstream_key.encode()) in lines[0]


def test_redirects_pass_through_unfollowed() -> None:
    answer = b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:9/elsewhere\r\ncontent-length: 0\r\n\r\n"
    upstream = _RawUpstream(answer)
    try:
        with _raw_proxy(upstream) as proxy:
            status, headers, _ = _get(proxy.port, "/v1/files/file_a/content")
    finally:
        upstream.close()
    assert status == 307
    assert headers["location"] == "http://127.0.0.1:9/elsewhere"
    assert len(upstream.heads) == 1


def test_a_download_streams_undecoded_and_a_json_answer_is_decoded() -> None:
    """Content-Encoding is the client's business on a download (its Content-Length counts the
    encoded bytes); a JSON answer the proxy reads (and may cache) is decoded first."""
    packed = gzip.compress(b'{"id": "file_a", "type": "file"}')
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
        + f"content-length: {len(packed)}\r\n\r\n".encode()
        + packed
    )
    upstream = _RawUpstream(answer)
    try:
        with _raw_proxy(upstream) as proxy:
            download = _get(proxy.port, "/v1/files/file_a/content", "accept-encoding: gzip\r\n")
            metadata = _get(proxy.port, "/v1/files/file_a", "accept-encoding: gzip\r\n")
    finally:
        upstream.close()

    assert download[0] == 200
    assert download[1]["content-encoding"] == "gzip"
    assert download[1]["content-length"] == str(len(packed))
    assert download[2] == packed
    assert metadata[0] == 200
    assert "content-encoding" not in metadata[1]
    assert metadata[2] == b'{"id": "file_a", "type": "file"}'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _ok(request: Request) -> Response:
    return JSONResponse({"type": "file", "port": request.client.port if request.client else None})


async def _blob(request: Request) -> Response:
    return Response(bytes(8 * 1024 * 1024), media_type="application/octet-stream")


@pytest.mark.anyio
async def test_connections_are_reused_under_concurrency() -> None:
    """Eight workers, 50 requests each: kept-alive connections are reused, never one per request."""
    with Served(Starlette(routes=[Route("/v1/files", _ok)])) as served:
        client = UpstreamClient(UpstreamConfig(base_url=HttpUrl(served.url)))
        await client.open()
        ports: set[int] = set()

        async def worker() -> None:
            for _ in range(50):
                reply = await client.send("GET", "/v1/files", b"", [], tenant=ALPHA.tenant())
                ports.add(json.loads((await reply.read_whole(1024)).body)["port"])

        await asyncio.gather(*(worker() for _ in range(8)))
        await client.aclose()
    assert len(ports) <= 8


@pytest.mark.anyio
async def test_a_body_is_read_in_pieces_larger_than_64_kib() -> None:
    with Served(Starlette(routes=[Route("/v1/files/f/content", _blob)])) as served:
        client = UpstreamClient(UpstreamConfig(base_url=HttpUrl(served.url)))
        await client.open()
        reply = await client.send("GET", "/v1/files/f/content", b"", [], tenant=ALPHA.tenant(), stream=True)
        sizes = []
        async for chunk in reply.iter_body():  # a slow reader lets the buffer fill
            sizes.append(len(chunk))
            await asyncio.sleep(0.001)
        await reply.aclose()
        await client.aclose()
    assert sum(sizes) == 8 * 1024 * 1024
    assert max(sizes) > 64 * 1024


@pytest.mark.anyio
async def test_a_team_waits_for_its_share_then_gets_504_and_a_closed_reply_frees_a_slot() -> None:
    with Served(Starlette(routes=[Route("/v1/files", _ok)])) as served:
        client = UpstreamClient(UpstreamConfig(base_url=HttpUrl(served.url), pool_timeout_s=0.2))
        await client.open()
        team = replace(ALPHA.tenant(), max_upstream_connections=1)
        held = await client.send("GET", "/v1/files", b"", [], tenant=team)
        with pytest.raises(UpstreamTimeoutError, match="team's upstream connections"):
            await client.send("GET", "/v1/files", b"", [], tenant=team)
        other = await client.send("GET", "/v1/files", b"", [], tenant=BRAVO.tenant())
        await other.aclose()
        await held.aclose()
        await held.aclose()  # twice is harmless and frees one slot, not two
        again = await client.send("GET", "/v1/files", b"", [], tenant=team)
        await again.aclose()
        await client.aclose()


@pytest.mark.anyio
async def test_an_upstream_that_stops_reading_an_upload_is_a_504_after_the_write_timeout() -> None:
    upstream = _RawUpstream(None)
    client = UpstreamClient(UpstreamConfig(base_url=HttpUrl(upstream.url), write_timeout_s=0.3))
    await client.open()
    size = 64 * 1024 * 1024

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // (1024 * 1024)):
            yield bytes(1024 * 1024)

    headers = [("content-length", str(size)), ("content-type", "multipart/form-data; boundary=b")]
    try:
        with pytest.raises(UpstreamTimeoutError, match="stopped reading the request body"):
            await client.send("POST", "/v1/files", b"", headers, body(), tenant=ALPHA.tenant())
    finally:
        await client.aclose()
        upstream.close()
