"""The named battery of hostile requests (issue 7), each a test, against a proxy on a real socket in
front of the simulator. Requests go out as raw bytes so that nothing on the client side normalises
them. For each case the test states who answers: the proxy itself (nothing reaches upstream), or the
upstream, whose answer passes through unchanged and uncached."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from files_api_simulator import Simulator
from tests.constants import ALL_SECRETS, ALPHA, BRAVO, GA_HEADERS, VERSION
from tests.support import SharedProxy, raw_http, wait_for

MAX_UPLOAD_BYTES = 100_000
BODY_TIMEOUT_S = 0.5

GA = list(GA_HEADERS.items())  # as (name, value) pairs, for `_send` and `_head`
FILE_PART_HEAD = b'--b\r\ncontent-disposition: form-data; name="file"; filename="x.bin"\r\n\r\n'
MULTIPART_TAIL = b"\r\n--b--\r\n"
MULTIPART = [("content-type", "multipart/form-data; boundary=b")]

Answer = tuple[int, dict[str, str], bytes]


@pytest.fixture(scope="module")
def shared() -> Iterator[SharedProxy]:
    limits = {"max_upload_bytes": MAX_UPLOAD_BYTES, "client_body_timeout_s": BODY_TIMEOUT_S}
    with SharedProxy(limits) as proxy:
        yield proxy


@pytest.fixture
def simulator(shared: SharedProxy) -> Simulator:
    """A new simulator behind the module's proxy, whose cache starts empty."""
    return shared.fresh()


@pytest.fixture
def proxy_url(shared: SharedProxy, simulator: Simulator) -> str:
    return shared.url


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _head(method: str, target: str | bytes, headers: list[tuple[str, str]], body_length: int | None) -> bytes:
    raw_target = target.encode() if isinstance(target, str) else target
    head = method.encode() + b" " + raw_target + b" HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n"
    if body_length is not None:
        head += f"content-length: {body_length}\r\n".encode()
    head += b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
    return head + b"\r\n"


def _send(
    url: str, method: str, target: str | bytes, headers: list[tuple[str, str]], body: bytes = b""
) -> Answer:
    """One request exactly as given, Content-Length from the body (also 0 on a GET)."""
    return raw_http(_port(url), _head(method, target, headers, len(body)), body)


def _assert_proxy_error(answer: Answer, status: int, error_type: str) -> dict[str, object]:
    """An error the proxy made: Anthropic's envelope, a proxy request id, no key in it."""
    got_status, headers, body = answer
    assert got_status == status, body
    envelope = json.loads(body)
    assert envelope["type"] == "error"
    assert envelope["error"]["type"] == error_type
    assert envelope["request_id"] == headers["request-id"]
    assert headers["request-id"].startswith("req_fp")
    _assert_no_secret(answer)
    error: dict[str, object] = envelope["error"]
    return error


def _assert_upstream_error(answer: Answer, status: int, error_type: str) -> None:
    """An upstream error passed through: its envelope and its own request id, never cached."""
    got_status, headers, body = answer
    assert got_status == status, body
    envelope = json.loads(body)
    assert envelope["error"]["type"] == error_type
    assert envelope["request_id"] == headers["request-id"]
    assert not headers["request-id"].startswith("req_fp")
    assert "stored" not in headers["cache-status"] and "hit" not in headers["cache-status"]
    _assert_no_secret(answer)


def _assert_no_secret(answer: Answer) -> None:
    _, headers, body = answer
    shown = body.decode("latin-1") + " ".join(headers.values())
    assert not any(secret in shown for secret in ALL_SECRETS)


def _multipart(file_content: bytes) -> bytes:
    return FILE_PART_HEAD + file_content + MULTIPART_TAIL


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/v1/files/..%2F..%2Fv1%2Fmessages", id="dotdot-encoded-slashes"),
        pytest.param("/v1/files/..%2f..%2fv1%2fmessages", id="lower-case-escapes"),
        pytest.param("/v1/files/%2e%2e/content", id="encoded-dotdot-segment"),
        pytest.param("/v1/files/%2E%2E%2Fmessages", id="fully-encoded"),
        pytest.param("/v1/files/..%5C..%5Cv1%5Cmessages", id="encoded-backslashes"),
        pytest.param("/v1/files/%252e%252e%252fmessages", id="double-encoded"),
        pytest.param("/v1/files/../messages", id="raw-dotdot"),
    ],
)
def test_encoded_traversal_is_refused_by_the_proxy(proxy_url: str, simulator: Simulator, target: str) -> None:
    _assert_proxy_error(_send(proxy_url, "GET", target, GA), 400, "invalid_request_error")
    assert simulator.received == []


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        pytest.param(b"/v1/files/file_1%00", GA, id="encoded-in-file-id"),
        pytest.param(b"/v1/files/file_1%00/content", GA, id="encoded-before-content"),
        pytest.param(b"/v1/files%00", GA, id="encoded-in-files"),
    ],
)
def test_nul_byte_in_the_path_is_refused_by_the_proxy(
    proxy_url: str, simulator: Simulator, target: bytes, headers: list[tuple[str, str]]
) -> None:
    error = _assert_proxy_error(_send(proxy_url, "GET", target, headers), 400, "invalid_request_error")
    assert "NUL" in str(error["message"])
    assert simulator.received == []


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET /v1/files/file_1\x00 HTTP/1.1\r\n", id="raw-in-path"),
        pytest.param(b"GET /v1/files?limit=1\x00 HTTP/1.1\r\n", id="raw-in-query"),
        pytest.param(b"GET /v1/files HTTP/1.1\r\nx-trace: a\x00b\r\n", id="raw-in-header"),
    ],
)
def test_raw_nul_byte_is_refused_by_the_http_parser(
    proxy_url: str, simulator: Simulator, head: bytes
) -> None:
    """A raw NUL is not HTTP at all: uvicorn's parser answers its own plain 400 before the app runs
    (the one answer not in Anthropic's envelope), and nothing reaches upstream."""
    auth = f"x-api-key: {ALPHA.proxy_key}\r\nanthropic-version: {VERSION}\r\n".encode()
    status, _, body = raw_http(_port(proxy_url), head + b"host: p\r\nconnection: close\r\n" + auth + b"\r\n")
    assert status == 400
    assert ALPHA.proxy_key.encode() not in body
    assert simulator.received == []


def test_nul_byte_in_the_query_is_passed_to_upstream_to_judge(proxy_url: str, simulator: Simulator) -> None:
    answer = _send(proxy_url, "GET", "/v1/files?limit=%00", GA)

    _assert_upstream_error(answer, 400, "invalid_request_error")
    [received] = simulator.received
    assert received.query == "limit=%00"


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        pytest.param("GET", "", id="metadata"),
        pytest.param("GET", "/content", id="download"),
        pytest.param("DELETE", "", id="delete"),
    ],
)
def test_a_10000_char_file_id_is_refused_and_not_echoed(
    proxy_url: str, simulator: Simulator, method: str, suffix: str
) -> None:
    file_id = "f" * 10_000
    answer = _send(proxy_url, method, f"/v1/files/{file_id}{suffix}", GA)

    _assert_proxy_error(answer, 400, "invalid_request_error")
    assert len(answer[2]) < 400
    assert simulator.received == []


@pytest.mark.parametrize("limit", ["0", "-1", "100000", "abc"])
def test_limit_values_are_passed_unchanged_for_upstream_to_judge_and_never_cached(
    proxy_url: str, simulator: Simulator, limit: str
) -> None:
    """`limit` is the upstream's to validate (1..1000): the proxy forwards it as sent, passes the
    400 through, and stores nothing, so the same request goes upstream again."""
    for _ in range(2):
        answer = _send(proxy_url, "GET", f"/v1/files?limit={limit}", GA)
        _assert_upstream_error(answer, 400, "invalid_request_error")
        assert answer[1]["cache-status"] == "files-proxy; fwd=uri-miss"
    assert [r.query for r in simulator.received] == [f"limit={limit}"] * 2


def test_repeated_query_keys_pass_in_order_and_are_never_cached(proxy_url: str, simulator: Simulator) -> None:
    """The simulator, like many servers, reads the last of repeated values: `limit=1&limit=2` and
    `limit=2&limit=1` are different pages. A repeated name is not a query the cache can normalise,
    so each such request is forwarded as it is and never stored (one team cannot fill the cache)."""
    for name in ("a", "b", "c"):
        simulator.add_file(ALPHA.upstream_key, filename=f"{name}.bin", downloadable=False)

    def page_size(query: str) -> int:
        status, headers, body = _send(proxy_url, "GET", f"/v1/files?{query}", GA)
        assert status == 200
        return len(json.loads(body)["data"])

    assert page_size("limit=1&limit=2") == 2
    assert page_size("limit=2&limit=1") == 1
    assert page_size("beta=true&limit=1&limit=2") == 2
    assert page_size("limit=1&limit=2&beta=true") == 2  # repeated names: forwarded, never cached
    queries = [r.query for r in simulator.received]
    assert queries == [
        "limit=1&limit=2",
        "limit=2&limit=1",
        "beta=true&limit=1&limit=2",
        "limit=1&limit=2&beta=true",
    ]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("x-api-key", id="x-api-key"),
        pytest.param("authorization", id="bearer"),
    ],
)
def test_60kb_credential_header_is_refused_and_not_echoed(
    proxy_url: str, simulator: Simulator, name: str
) -> None:
    value = ("k" * 60_000) if name == "x-api-key" else "Bearer " + "k" * 60_000
    answer = _send(proxy_url, "GET", "/v1/files", [(name, value), ("anthropic-version", VERSION)])

    _assert_proxy_error(answer, 401, "authentication_error")
    assert b"kkkk" not in answer[2]
    assert simulator.received == []


@pytest.mark.parametrize("name", ["x-api-key", "x-team-trace"])
def test_a_header_section_over_64kib_is_refused_before_authentication(
    proxy_url: str, simulator: Simulator, name: str
) -> None:
    """`server.max_header_bytes` (64 KiB in all): 431 from the front end, and nothing is echoed."""
    answer = _send(proxy_url, "GET", "/v1/files", [*GA, (name, "k" * 65_536)])

    _assert_proxy_error(answer, 431, "invalid_request_error")
    assert b"kkkk" not in answer[2]
    assert simulator.received == []


@pytest.mark.parametrize("name", ["x-team-trace", "user-agent"])
def test_60kb_ordinary_header_passes_unchanged_and_stays_out_of_the_log(
    proxy_url: str, simulator: Simulator, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Not the proxy's to judge: the value reaches upstream whole (which may refuse it); the access
    line keeps at most 200 characters of a client-chosen value."""
    value = "v" * 60_000
    with caplog.at_level(logging.INFO, logger="files_proxy.access"):
        answers = [_send(proxy_url, "GET", "/v1/files", [*GA, (name, value)]) for _ in range(2)]

    assert [status for status, _, _ in answers] == [200, 200]
    assert answers[1][1]["cache-status"].startswith("files-proxy; hit")
    [received] = simulator.received
    assert received.header(name) == value
    access_lines = [r.getMessage() for r in caplog.records if r.name == "files_proxy.access"]
    assert len(access_lines) == 2
    assert all(len(line) < 2_000 for line in access_lines)


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        pytest.param([("anthropic-beta", "b" * 1025)], "/v1/files", id="anthropic-beta"),
        pytest.param(
            [("anthropic-beta", "b" * 600), ("anthropic-beta", "c" * 600)], "/v1/files", id="beta-twice"
        ),
        pytest.param([("anthropic-version", "v" * 1025)], "/v1/files", id="anthropic-version"),
        pytest.param([], "/v1/files?after_id=" + "a" * 8200, id="query"),
    ],
)
def test_cache_key_inputs_over_their_bound_are_refused(
    proxy_url: str, simulator: Simulator, headers: list[tuple[str, str]], target: str
) -> None:
    """What the cache key is made of is bounded: over 1 KiB of `anthropic-beta` or `anthropic-version`,
    or a query string over 8 KiB, is a 400 from the proxy, and nothing reaches upstream."""
    answer = _send(proxy_url, "GET", target, [("x-api-key", ALPHA.proxy_key), *headers])

    _assert_proxy_error(answer, 400, "invalid_request_error")
    assert simulator.received == []


@pytest.mark.parametrize(
    ("headers", "upstream_forms"),
    [
        pytest.param(
            [("x-api-key", ALPHA.proxy_key), ("x-api-key", ALPHA.proxy_key)],
            [("x-api-key", ALPHA.upstream_key)],
            id="x-api-key-twice-same",
        ),
        pytest.param(
            [("authorization", f"Bearer {ALPHA.proxy_key}"), ("authorization", f"Bearer {ALPHA.proxy_key}")],
            [("authorization", f"Bearer {ALPHA.upstream_key}")],
            id="bearer-twice-same",
        ),
        pytest.param(
            [("x-api-key", ALPHA.proxy_key), ("authorization", f"Bearer {ALPHA.proxy_key}")],
            [("x-api-key", ALPHA.upstream_key), ("authorization", f"Bearer {ALPHA.upstream_key}")],
            id="both-forms-same",
        ),
    ],
)
def test_duplicate_auth_headers_naming_one_key_are_accepted_once(
    proxy_url: str,
    simulator: Simulator,
    headers: list[tuple[str, str]],
    upstream_forms: list[tuple[str, str]],
) -> None:
    """The same key in several headers is one key: upstream gets each form once, with the tenant's key."""
    answer = _send(proxy_url, "GET", "/v1/files", [*headers, ("anthropic-version", VERSION)])

    assert answer[0] == 200
    [received] = simulator.received
    sent = [(name, value) for name, value in received.headers if name in ("x-api-key", "authorization")]
    assert sorted(sent) == sorted(upstream_forms)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("x-api-key", ALPHA.proxy_key), ("x-api-key", BRAVO.proxy_key)], id="x-api-key-twice"),
        pytest.param(
            [("authorization", f"Bearer {ALPHA.proxy_key}"), ("authorization", f"Bearer {BRAVO.proxy_key}")],
            id="bearer-twice",
        ),
        pytest.param(
            [("x-api-key", ALPHA.proxy_key), ("authorization", f"Bearer {BRAVO.proxy_key}")],
            id="across-forms",
        ),
        pytest.param([("x-api-key", ALPHA.proxy_key), ("x-api-key", "")], id="valid-and-empty"),
        pytest.param([("x-api-key", ALPHA.proxy_key), ("x-api-key", "fp-unknown")], id="valid-and-unknown"),
        pytest.param([("x-api-key", f"{ALPHA.proxy_key}, {BRAVO.proxy_key}")], id="comma-joined"),
    ],
)
def test_conflicting_auth_headers_are_refused_never_resolved_to_one_tenant(
    proxy_url: str, simulator: Simulator, headers: list[tuple[str, str]]
) -> None:
    answer = _send(proxy_url, "GET", "/v1/files", [*headers, ("anthropic-version", VERSION)])

    _assert_proxy_error(answer, 401, "authentication_error")
    assert simulator.received == []


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("authorization", "Basic YWxwaGE6c2VjcmV0")], id="basic-alone"),
        pytest.param([("authorization", f"Basic {ALPHA.proxy_key}")], id="basic-carrying-a-valid-key"),
        pytest.param(
            [("x-api-key", ALPHA.proxy_key), ("authorization", "Basic YWxwaGE6c2VjcmV0")],
            id="basic-beside-a-valid-x-api-key",
        ),
    ],
)
def test_authorization_basic_is_refused(
    proxy_url: str, simulator: Simulator, headers: list[tuple[str, str]]
) -> None:
    """Basic is never forwarded (it would hand upstream a credential that is not the tenant's)."""
    error = _assert_proxy_error(_send(proxy_url, "GET", "/v1/files", headers), 401, "authentication_error")
    assert "Bearer" in str(error["message"])
    assert simulator.received == []


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "Bearer     ", "bearer\t"])
def test_empty_bearer_is_refused(proxy_url: str, simulator: Simulator, value: str) -> None:
    _assert_proxy_error(
        _send(proxy_url, "GET", "/v1/files", [("authorization", value)]), 401, "authentication_error"
    )
    assert simulator.received == []


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        pytest.param(method, target, allow, id=f"{method}-{name}")
        for name, target, allow, methods in [
            ("list", "/v1/files", "GET, POST", ["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "HEAD"]),
            ("file", "/v1/files/file_1", "DELETE, GET", ["POST", "PUT", "PATCH", "OPTIONS", "HEAD"]),
            ("content", "/v1/files/file_1/content", "GET", ["POST", "PUT", "DELETE", "PATCH", "HEAD"]),
        ]
        for method in methods
    ],
)
def test_methods_other_than_the_route_allows_are_405_with_allow(
    proxy_url: str, simulator: Simulator, method: str, target: str, allow: str
) -> None:
    answer = _send(proxy_url, method, target, GA)

    if method == "HEAD":  # no body in an answer to HEAD, but the same status and headers
        assert answer[0] == 405 and answer[2] == b""
    else:
        _assert_proxy_error(answer, 405, "invalid_request_error")
    assert answer[1]["allow"] == allow
    assert simulator.received == []


def test_a_request_target_that_is_not_a_path_gets_the_envelope(proxy_url: str, simulator: Simulator) -> None:
    """`OPTIONS *` never reaches the Files handler; Starlette's own 404 once answered in plain text."""
    _assert_proxy_error(_send(proxy_url, "OPTIONS", "*", GA), 404, "not_found_error")
    assert simulator.received == []


def test_multipart_without_a_file_part_is_upstreams_400_passed_through_and_nothing_invalidated(
    proxy_url: str, simulator: Simulator
) -> None:
    """The proxy streams bodies unparsed: the upstream judges the form, and a failed upload leaves
    cached list pages alone (only a 200 upload invalidates)."""
    listed = _send(proxy_url, "GET", "/v1/files", GA)
    body = b'--b\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nassistants' + MULTIPART_TAIL

    answer = _send(proxy_url, "POST", "/v1/files", [*GA, *MULTIPART], body)

    _assert_upstream_error(answer, 400, "invalid_request_error")
    assert answer[1]["cache-status"] == "files-proxy; fwd=method"
    assert b"file" in answer[2]
    assert simulator.uploads == {}
    again = _send(proxy_url, "GET", "/v1/files", GA)
    assert again[1]["cache-status"].startswith("files-proxy; hit")
    assert again[2] == listed[2]


def test_truncated_multipart_body_is_upstreams_400_passed_through(
    proxy_url: str, simulator: Simulator
) -> None:
    """A complete HTTP body whose form ends early (no closing boundary): the upstream refuses it."""
    body = FILE_PART_HEAD + b"half a file"

    answer = _send(proxy_url, "POST", "/v1/files", [*GA, *MULTIPART], body)

    _assert_upstream_error(answer, 400, "invalid_request_error")
    assert simulator.uploads == {}


def test_client_gone_mid_body_aborts_the_upstream_request(proxy_url: str, simulator: Simulator) -> None:
    """The client promises 50 000 bytes, sends some and hangs up: the upstream sees a cut body, no file
    is created, and the proxy keeps serving."""
    declared = len(FILE_PART_HEAD) + 50_000 + len(MULTIPART_TAIL)
    with socket.create_connection(("127.0.0.1", _port(proxy_url)), timeout=10) as conn:
        conn.sendall(_head("POST", "/v1/files", [*GA, *MULTIPART], declared) + FILE_PART_HEAD + b"x" * 5000)

    wait_for(lambda: any(r.method == "POST" for r in simulator.received), what="upstream request ended")
    [post] = [r for r in simulator.received if r.method == "POST"]
    assert post.body_bytes < declared
    assert simulator.uploads == {}
    assert _send(proxy_url, "GET", "/v1/files", GA)[0] == 200


def test_content_length_longer_than_the_body_ends_in_408_and_upstream_is_cut(
    proxy_url: str, simulator: Simulator
) -> None:
    url = proxy_url
    body = _multipart(b"short")
    head = _head("POST", "/v1/files", [*GA, *MULTIPART], len(body) + 100)

    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as conn:
        conn.sendall(head + body)  # and then nothing: the connection stays open, the 100 bytes never come
        answer = _Answers(conn).next()

    _assert_proxy_error(answer, 408, "timeout_error")
    assert answer[1]["connection"] == "close"
    wait_for(lambda: any(r.method == "POST" for r in simulator.received), what="upstream request ended")
    [post] = simulator.received
    assert post.body_bytes <= len(body)
    assert simulator.uploads == {}


def test_content_length_shorter_than_the_body_forwards_only_that_and_the_rest_is_a_new_request(
    proxy_url: str, simulator: Simulator
) -> None:
    """The bytes past Content-Length are the next request on the connection, answered by the proxy
    like any other (here a smuggled `/v1/messages`: 404); upstream gets exactly the declared body, on
    a connection of the proxy's own, so nothing can be smuggled to it."""
    body = _multipart(b"content")
    smuggled = (
        f"POST /v1/messages HTTP/1.1\r\nhost: p\r\nconnection: close\r\nx-api-key: {ALPHA.proxy_key}\r\n"
        "content-length: 0\r\n\r\n"
    ).encode()
    declared = len(body) - len(MULTIPART_TAIL)
    head = _head("POST", "/v1/files", [*GA, *MULTIPART], declared).replace(b"connection: close\r\n", b"")

    with socket.create_connection(("127.0.0.1", _port(proxy_url)), timeout=10) as conn:
        conn.sendall(head + body[:declared] + smuggled)
        answers = _Answers(conn)
        first, second = answers.next(), answers.next()

    _assert_upstream_error(first, 400, "invalid_request_error")  # the form lost its closing boundary
    _assert_proxy_error(second, 404, "not_found_error")
    [post] = simulator.received
    assert (post.method, post.path, post.body_bytes) == ("POST", "/v1/files", declared)


def test_a_slow_client_sending_one_byte_at_a_time_is_ended_by_the_body_timeout(
    proxy_url: str, simulator: Simulator
) -> None:
    """A byte every 2 s against a 0.5 s body timeout: 408 after the first pause, the connection is
    closed (the sender's later bytes go nowhere), and the upstream request is cut, never completed."""
    url = proxy_url
    body = _multipart(b"d" * 100)
    stop = threading.Event()

    with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as conn:
        conn.sendall(_head("POST", "/v1/files", [*GA, *MULTIPART], len(body)))

        def trickle() -> None:
            for byte in body:
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                if stop.wait(4 * BODY_TIMEOUT_S):
                    return

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            answers = _Answers(conn)
            answer = answers.next()
            assert answers.closed()
        finally:
            stop.set()
            sender.join()

    _assert_proxy_error(answer, 408, "timeout_error")
    wait_for(lambda: len(simulator.received) == 1, what="upstream request ended")
    assert simulator.received[0].body_bytes < len(body)
    assert simulator.uploads == {}


def test_an_upload_above_max_upload_bytes_by_content_length_is_413_before_upstream(
    proxy_url: str, simulator: Simulator
) -> None:
    """Refused on the declared length alone: no byte of the body is read, none sent upstream."""
    head = _head("POST", "/v1/files", [*GA, *MULTIPART], 2 * MAX_UPLOAD_BYTES)

    answer = raw_http(_port(proxy_url), head)  # the body is never sent: the answer comes first

    _assert_proxy_error(answer, 413, "request_too_large")
    assert simulator.received == []


def test_a_chunked_upload_above_max_upload_bytes_is_cut_off_while_streaming(
    proxy_url: str, simulator: Simulator
) -> None:
    """No Content-Length to judge by: the proxy counts while streaming and stops at the limit, so the
    upstream never receives the whole body."""
    chunks = [FILE_PART_HEAD, *[b"y" * 10_000] * 50, MULTIPART_TAIL]
    headers = [*GA, *MULTIPART]

    response = httpx.post(f"{proxy_url}/v1/files", content=iter(chunks), headers=headers)

    _assert_proxy_error(
        (response.status_code, dict(response.headers), response.content), 413, "request_too_large"
    )
    # The cut may come before the upstream saw the request at all, or part-way through its body: give
    # an upstream request that did start the time to end, then check it was cut short.
    time.sleep(0.5)
    assert len(simulator.received) <= 1
    assert all(received.body_bytes < sum(len(c) for c in chunks) for received in simulator.received)
    assert simulator.uploads == {}


class _Answers:
    """HTTP/1.1 answers with Content-Length bodies, read one by one from a connection."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._buffer = b""

    def next(self) -> Answer:
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        header_block, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status_line, *lines = header_block.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self._buffer) < length:
            self._fill()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        """True when the peer has closed the connection (and sent nothing more)."""
        try:
            return self._buffer == b"" and self._conn.recv(1) == b""
        except ConnectionResetError:
            return True

    def _fill(self) -> None:
        chunk = self._conn.recv(65536)
        assert chunk, "connection closed before a whole answer"
        self._buffer += chunk
