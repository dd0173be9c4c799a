"""The front end's bounds (proxy/server.py), each met through a real socket with small limits: a
header section too large or too slow, an idle connection, the connection cap, WebSocket upgrades,
and what the server logs at debug level."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from proxy.config import ServerConfig, Settings
from proxy.server import MAX_TARGET_BYTES, OneSendPerTurn, allowed_connections
from tests.constants import ALPHA, VERSION
from tests.support import Served, served_proxy, wait_for

Reply = tuple[int, dict[str, str], bytes]


@pytest.fixture
def serve_bounded(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Served]]:
    """Start the proxy app under `proxy.server` with these `[server]` bounds (small, to be quick)."""
    started: list[Served] = []

    def start(log_level: str = "warning", **bounds: Any) -> Served:
        config = ServerConfig(**{"header_timeout_s": 5.0, "keep_alive_s": 5.0, **bounds})
        served = served_proxy(make_settings(), bounds=config, log_level=log_level).__enter__()
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        served.__exit__(None, None, None)


def _connect(served: Served) -> socket.socket:
    return socket.create_connection(("127.0.0.1", served.port), timeout=10)


def _read_reply(conn: socket.socket) -> Reply:
    """One response from a kept-alive connection: head, then exactly Content-Length bytes."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a response: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (ln.partition(":") for ln in lines)}
    while len(body) < int(headers["content-length"]):
        body += conn.recv(65536)
    return int(status_line.split()[1]), headers, body


def _is_closed(conn: socket.socket) -> bool:
    """True once the server closed the connection (waits up to the socket's timeout)."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def _assert_envelope(reply: Reply, status: int, error_type: str) -> None:
    got_status, headers, body = reply
    assert got_status == status, body
    envelope = json.loads(body)
    assert envelope["type"] == "error"
    assert envelope["error"]["type"] == error_type
    assert envelope["request_id"] == headers["request-id"]


REQUEST = f"GET /v1/files HTTP/1.1\r\nhost: proxy\r\nanthropic-version: {VERSION}\r\n".encode()
AUTHENTICATED = REQUEST + f"x-api-key: {ALPHA.proxy_key}\r\n".encode()


def test_a_header_section_over_the_bound_gets_431_and_the_rest_is_not_read(
    serve_bounded: Callable[..., Served],
) -> None:
    served = serve_bounded(max_header_bytes=4096)
    with _connect(served) as conn:
        conn.sendall(REQUEST + b"x-big: ")
        try:
            for _ in range(1024):  # up to 64 MB; the server closes long before
                conn.sendall(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_reply(conn)

    _assert_envelope(reply, 431, "invalid_request_error")
    assert reply[1]["connection"] == "close"


def test_a_header_section_within_the_bound_is_served(serve_bounded: Callable[..., Served]) -> None:
    served = serve_bounded(max_header_bytes=4096)
    with _connect(served) as conn:
        conn.sendall(REQUEST + b"x-team-trace: " + b"t" * 3000 + b"\r\n\r\n")
        reply = _read_reply(conn)

    _assert_envelope(reply, 401, "authentication_error")  # it reached the app: no key was sent


def test_a_request_target_longer_than_any_files_route_gets_414_before_the_app(
    serve_bounded: Callable[..., Served],
) -> None:
    """A target past MAX_TARGET_BYTES is refused unparsed, even with a body and a pipelined request
    behind it; one just within it reaches the app (whose own bound on the query answers 400)."""
    served = serve_bounded()
    long_target = b"/v1/files?after_id=" + b"a" * MAX_TARGET_BYTES
    body = b"x" * 100
    with _connect(served) as conn:
        conn.sendall(
            AUTHENTICATED.replace(b"GET /v1/files", b"POST " + long_target)
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
            + AUTHENTICATED
            + b"\r\n"
        )
        reply = _read_reply(conn)
        assert _is_closed(conn)
    _assert_envelope(reply, 414, "invalid_request_error")
    assert reply[1]["connection"] == "close"

    within = b"/v1/files?after_id=" + b"a" * (MAX_TARGET_BYTES - 100)
    with _connect(served) as conn:
        conn.sendall(AUTHENTICATED.replace(b"/v1/files", within, 1) + b"\r\n")
        _assert_envelope(_read_reply(conn), 400, "invalid_request_error")


def test_a_header_section_sent_too_slowly_is_closed_after_the_header_timeout(
    serve_bounded: Callable[..., Served],
) -> None:
    """A byte now and then does not keep a header section alive: the timeout counts from its start."""
    served = serve_bounded(header_timeout_s=0.5)
    with _connect(served) as conn:
        conn.sendall(b"GET /v1/files HTTP/1.1\r\n")
        try:
            for _ in range(100):  # 10 s of one byte every 0.1 s; the server stops it long before
                conn.sendall(b"x")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_reply(conn)
        assert _is_closed(conn)

    _assert_envelope(reply, 408, "timeout_error")


def test_a_connection_that_never_sends_a_request_is_closed_after_the_header_timeout(
    serve_bounded: Callable[..., Served],
) -> None:
    served = serve_bounded(header_timeout_s=0.3)
    with _connect(served) as conn:
        assert _is_closed(conn)


def test_an_idle_kept_alive_connection_lasts_keep_alive_s_not_the_header_timeout(
    serve_bounded: Callable[..., Served],
) -> None:
    served = serve_bounded(header_timeout_s=0.3, keep_alive_s=1.5)
    with _connect(served) as conn:
        conn.sendall(AUTHENTICATED + b"\r\n")
        assert _read_reply(conn)[0] == 200
        time.sleep(0.8)  # idle longer than the header timeout, within keep-alive
        conn.sendall(AUTHENTICATED + b"\r\n")
        assert _read_reply(conn)[0] == 200
        assert _is_closed(conn)  # then idle past keep_alive_s


def test_connections_past_the_cap_get_503_and_those_served_are_unaffected(
    serve_bounded: Callable[..., Served],
) -> None:
    served = serve_bounded(max_connections=3)
    held = [_connect(served) for _ in range(3)]
    try:
        with _connect(served) as refused:
            reply = _read_reply(refused)
            assert _is_closed(refused)
        _assert_envelope(reply, 503, "overloaded_error")
        for conn in held:
            conn.sendall(AUTHENTICATED + b"\r\n")
            assert _read_reply(conn)[0] == 200
    finally:
        for conn in held:
            conn.close()


def test_the_open_files_limit_is_raised_and_the_cap_fits_below_it(caplog: pytest.LogCaptureFixture) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert allowed_connections(100) == 100
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard
    if hard != resource.RLIM_INFINITY:
        assert allowed_connections(hard * 2) < hard
        assert "open-files limit" in caplog.text


WEBSOCKET_UPGRADE = (
    b"connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        pytest.param(REQUEST + WEBSOCKET_UPGRADE, 401, id="no-key"),
        pytest.param(AUTHENTICATED + WEBSOCKET_UPGRADE, 200, id="files-route"),
        pytest.param(
            b"GET /v1/messages HTTP/1.1\r\nhost: proxy\r\n"
            + f"x-api-key: {ALPHA.proxy_key}\r\n".encode()
            + WEBSOCKET_UPGRADE,
            404,
            id="other-path",
        ),
    ],
)
def test_a_websocket_upgrade_is_an_ordinary_request_with_one_access_line(
    serve_bounded: Callable[..., Served], caplog: pytest.LogCaptureFixture, head: bytes, status: int
) -> None:
    served = serve_bounded()
    with caplog.at_level(logging.INFO, logger="files_proxy.access"), _connect(served) as conn:
        conn.sendall(head + b"\r\n")
        reply = _read_reply(conn)

    assert reply[0] == status
    assert "upgrade" not in reply[1]
    if status != 200:
        _assert_envelope(reply, status, "authentication_error" if status == 401 else "not_found_error")

    def access_lines() -> list[dict[str, Any]]:
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == "files_proxy.access"]

    wait_for(lambda: bool(access_lines()), what="the access line")  # written as the response ends
    [line] = access_lines()
    assert line["status"] == status
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_request_header_value_is_logged_at_debug_level(
    serve_bounded: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    """Keys, tokens and every other header value stay out of every log, access log included."""
    served = serve_bounded(log_level="debug", max_header_bytes=4096)
    markers = [f"marker-{n}-9f3b" for n in range(6)]
    heads = [
        REQUEST + f"x-api-key: {markers[0]}\r\n".encode() + WEBSOCKET_UPGRADE,
        REQUEST + f"authorization: Bearer {markers[1]}\r\n".encode(),
        AUTHENTICATED + f"anthropic-beta: {markers[2]}\r\nx-trace: {markers[3]}\r\n".encode(),
        AUTHENTICATED + f"cookie: {markers[4]}\r\n".encode() + WEBSOCKET_UPGRADE,
        REQUEST + f"x-api-key: {markers[5]}\r\nx-pad: {'p' * 5000}\r\n".encode(),  # refused with 431
    ]
    with caplog.at_level(logging.DEBUG):
        for head in heads:
            with _connect(served) as conn:
                conn.sendall(head + b"\r\n")
                _read_reply(conn)

    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "files_proxy.access" in logged  # the log was on
    assert not [marker for marker in markers if marker in logged]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_writes_of_one_turn_leave_in_one_send_and_close_sends_what_is_held() -> None:
    """uvicorn writes an answer's head and body apart; the client's transport sends them together."""
    sent: list[bytes] = []

    class Recording(asyncio.Transport):
        closed = False

        def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
            sent.append(b"".join(data))

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    transport = OneSendPerTurn(Recording())
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"{}")
    assert sent == []
    await asyncio.sleep(0)
    assert sent == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
    transport.write(b"last")
    transport.close()
    assert sent[-1] == b"last" and transport.is_closing()
    transport.write(b"after close")
    await asyncio.sleep(0)
    assert len(sent) == 2
