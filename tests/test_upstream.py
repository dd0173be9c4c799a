"""Header filtering (pure) and the proxy's promise never to retry, seen from the simulator."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from pydantic import HttpUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.app import create_app
from proxy.config import Settings, UpstreamConfig
from proxy.simulator import Simulator
from proxy.upstream import end_to_end
from tests.support import ALPHA, BRAVO, Served, raw_http


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


def test_header_bytes_outside_ascii_pass_both_ways_unchanged() -> None:
    """HTTP allows obs-text (0x80-0xFF) in field values; httpx encodes str headers as ASCII and may
    decode a response header as UTF-8, so both directions once failed (a 500 from the proxy)."""
    seen: list[list[tuple[bytes, bytes]]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.raw)
        echoed = request.headers.get("x-note", "").encode("latin-1")
        utf8_name = 'attachment; filename="r\u00e9sum\u00e9.txt"'.encode()
        return httpx.Response(
            200, headers=[(b"x-note-echo", echoed), (b"content-disposition", utf8_name)], content=b"{}"
        )

    settings = Settings(
        tenants=(ALPHA.tenant(),), upstream=UpstreamConfig(base_url=HttpUrl("http://upstream.test"))
    )
    with Served(create_app(settings, upstream_transport=httpx.MockTransport(upstream))) as proxy:
        head = (
            b"GET /v1/files/file_1/content HTTP/1.1\r\nhost: p\r\nconnection: close\r\n"
            + f"x-api-key: {ALPHA.proxy_key}\r\n".encode()
            + b"x-note: caf\xe9 \xff\r\n\r\n"
        )
        status, headers, _ = raw_http(proxy.port, head)

    assert status == 200
    assert (b"x-note", b"caf\xe9 \xff") in seen[0]
    assert headers["x-note-echo"].encode("latin-1") == b"caf\xe9 \xff"
    assert (
        headers["content-disposition"].encode("latin-1")
        == 'attachment; filename="r\u00e9sum\u00e9.txt"'.encode()
    )


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
        settings = Settings(
            tenants=(ALPHA.tenant(), BRAVO.tenant()),
            upstream=UpstreamConfig(base_url=HttpUrl(served.url)),
        )
        with Served(create_app(settings)) as proxy:
            for team in (ALPHA, BRAVO, ALPHA):
                head = (
                    b"GET /v1/files/file_1 HTTP/1.1\r\nhost: p\r\nconnection: close\r\n"
                    + f"x-api-key: {team.proxy_key}\r\ncache-control: no-cache\r\n\r\n".encode()
                )
                status, headers, _ = raw_http(proxy.port, head)
                assert status == 200
                assert headers["set-cookie"].startswith("__cf_bm=")  # the client still sees it

    assert cookies_seen == [None, None, None]
