"""Route policy: the five Files routes on the raw path; everything else is 404, 405 or 400."""

from __future__ import annotations

import pytest

from proxy.errors import InvalidRequestError, MethodNotAllowedError, NotFoundError, ProxyError
from proxy.routes import Operation, RouteMatch, resolve

FILE_ID = "file_011CNha8iCJcU1wXNR6q4V8w"


def test_route_table_is_exactly_the_five_files_routes() -> None:
    assert {(op.method, op.template) for op in Operation} == {
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/files/{file_id}"),
        ("DELETE", "/v1/files/{file_id}"),
        ("GET", "/v1/files/{file_id}/content"),
    }


@pytest.mark.parametrize(
    ("method", "raw_path", "operation", "file_id", "upstream_path"),
    [
        pytest.param("GET", b"/v1/files", Operation.LIST, None, "/v1/files", id="list"),
        pytest.param("POST", b"/v1/files", Operation.UPLOAD, None, "/v1/files", id="upload"),
        pytest.param(
            "GET",
            f"/v1/files/{FILE_ID}".encode(),
            Operation.METADATA,
            FILE_ID,
            f"/v1/files/{FILE_ID}",
            id="metadata",
        ),
        pytest.param(
            "DELETE",
            f"/v1/files/{FILE_ID}".encode(),
            Operation.DELETE,
            FILE_ID,
            f"/v1/files/{FILE_ID}",
            id="delete",
        ),
        pytest.param(
            "GET",
            f"/v1/files/{FILE_ID}/content".encode(),
            Operation.DOWNLOAD,
            FILE_ID,
            f"/v1/files/{FILE_ID}/content",
            id="download",
        ),
        pytest.param(
            "GET",
            b"/v1/files/file_%41bc-%5F",
            Operation.METADATA,
            "file_Abc-_",
            "/v1/files/file_Abc-_",
            id="encoded-unreserved-is-canonicalised",
        ),
        pytest.param(
            "GET",
            b"/v1/%66iles/abc/%63ontent",
            Operation.DOWNLOAD,
            "abc",
            "/v1/files/abc/content",
            id="encoded-literal-segments",
        ),
        pytest.param("GET", b"/v1/files/-", Operation.METADATA, "-", "/v1/files/-", id="one-char-id"),
        pytest.param(
            "GET",
            b"/v1/files/" + b"a" * 256,
            Operation.METADATA,
            "a" * 256,
            "/v1/files/" + "a" * 256,
            id="256-char-id",
        ),
    ],
)
def test_resolves(
    method: str, raw_path: bytes, operation: Operation, file_id: str | None, upstream_path: str
) -> None:
    match = resolve(method, raw_path)

    assert match == RouteMatch(operation=operation, file_id=file_id)
    assert match.upstream_path == upstream_path


@pytest.mark.parametrize(
    ("method", "raw_path", "error", "allow"),
    [
        pytest.param("GET", b"/", NotFoundError, None, id="root"),
        pytest.param("GET", b"", NotFoundError, None, id="empty"),
        pytest.param("GET", b"/v1", NotFoundError, None, id="v1"),
        pytest.param("POST", b"/v1/messages", NotFoundError, None, id="messages"),
        pytest.param("GET", b"/v1/files/", NotFoundError, None, id="files-trailing-slash"),
        pytest.param("GET", b"/v1/files/a/b", NotFoundError, None, id="files-id-other"),
        pytest.param("GET", b"/v1/files/a/content/x", NotFoundError, None, id="below-content"),
        pytest.param("GET", b"/v1/files/a/content/", NotFoundError, None, id="content-trailing-slash"),
        pytest.param("GET", b"/v1/files/a/", NotFoundError, None, id="id-trailing-slash"),
        pytest.param("GET", b"/v1/filesx", NotFoundError, None, id="filesx"),
        pytest.param("GET", b"/V1/files", NotFoundError, None, id="upper-case-v1"),
        pytest.param("GET", b"//v1/files", NotFoundError, None, id="double-leading-slash"),
        pytest.param("GET", b"/v1//files", NotFoundError, None, id="double-inner-slash"),
        pytest.param("GET", b"v1/files", NotFoundError, None, id="no-leading-slash"),
        pytest.param("GET", b"/v2/files", NotFoundError, None, id="other-version"),
        pytest.param("PUT", b"/v1/files", MethodNotAllowedError, "GET, POST", id="put-files"),
        pytest.param("HEAD", b"/v1/files", MethodNotAllowedError, "GET, POST", id="head-files"),
        pytest.param("get", b"/v1/files", MethodNotAllowedError, "GET, POST", id="lower-case-method"),
        pytest.param("POST", b"/v1/files/x", MethodNotAllowedError, "DELETE, GET", id="post-file"),
        pytest.param(
            "PATCH", f"/v1/files/{FILE_ID}".encode(), MethodNotAllowedError, "DELETE, GET", id="patch-file"
        ),
        pytest.param(
            "DELETE",
            f"/v1/files/{FILE_ID}/content".encode(),
            MethodNotAllowedError,
            "GET",
            id="delete-content",
        ),
        pytest.param("POST", b"/v1/files/x/content", MethodNotAllowedError, "GET", id="post-content"),
        pytest.param("GET", b"/v1/files/..%2Fmessages", InvalidRequestError, None, id="dotdot-encoded-slash"),
        pytest.param("GET", b"/v1/files/a%2fb", InvalidRequestError, None, id="encoded-slash-lower"),
        pytest.param("GET", b"/v1/files/a%2Fb", InvalidRequestError, None, id="encoded-slash-upper"),
        pytest.param("GET", b"/v1/files/a%5Cb", InvalidRequestError, None, id="encoded-backslash"),
        pytest.param("GET", b"/v1/files/a\\b", InvalidRequestError, None, id="raw-backslash"),
        pytest.param("GET", b"/v1/files/a%00", InvalidRequestError, None, id="encoded-nul"),
        pytest.param("GET", b"/v1/files/a\x00", InvalidRequestError, None, id="raw-nul"),
        pytest.param("GET", b"/v1/files/..", InvalidRequestError, None, id="raw-dotdot"),
        pytest.param("GET", b"/v1/files/.", InvalidRequestError, None, id="raw-dot"),
        pytest.param("GET", b"/v1/files/%2e%2e", InvalidRequestError, None, id="encoded-dotdot"),
        pytest.param("GET", b"/v1/files/%2E.", InvalidRequestError, None, id="half-encoded-dotdot"),
        pytest.param("GET", b"/v1/files/%2e", InvalidRequestError, None, id="encoded-dot"),
        pytest.param("GET", b"/v1/files/../files", InvalidRequestError, None, id="dotdot-then-files"),
        pytest.param("GET", b"/v1/./files", InvalidRequestError, None, id="dot-before-files"),
        pytest.param("GET", b"/v1/files/a/..", InvalidRequestError, None, id="dotdot-after-id"),
        pytest.param("GET", b"/v1/files/a%252Fb", InvalidRequestError, None, id="double-encoded-slash"),
        pytest.param("GET", b"/v1/files/" + b"a" * 257, InvalidRequestError, None, id="257-char-id"),
        pytest.param("GET", b"/v1/files/" + b"a" * 10000, InvalidRequestError, None, id="10000-char-id"),
        pytest.param("GET", "/v1/files/fïle".encode(), InvalidRequestError, None, id="raw-non-ascii"),
        pytest.param("GET", b"/v1/files/f%C3%AFle", InvalidRequestError, None, id="encoded-non-ascii"),
        pytest.param("GET", b"/v1/files/f%FF", InvalidRequestError, None, id="encoded-invalid-utf-8"),
        pytest.param("GET", b"/v1/files/file.txt", InvalidRequestError, None, id="dot-in-id"),
        pytest.param("GET", b"/v1/files/file%20id", InvalidRequestError, None, id="encoded-space-in-id"),
        pytest.param("GET", b"/v1/files/a%zz", InvalidRequestError, None, id="bad-percent-escape"),
        pytest.param("GET", b"/v1/files/a;b", InvalidRequestError, None, id="semicolon-in-id"),
        pytest.param("GET", b"/v1/files/a%3Fb", InvalidRequestError, None, id="encoded-question-mark"),
        pytest.param("GET", b"/v1/files/a%23b", InvalidRequestError, None, id="encoded-hash"),
        pytest.param("PUT", b"/v1/files/a.b", InvalidRequestError, None, id="bad-id-before-bad-method"),
    ],
)
def test_refused(method: str, raw_path: bytes, error: type[ProxyError], allow: str | None) -> None:
    with pytest.raises(ProxyError) as caught:
        resolve(method, raw_path)

    assert type(caught.value) is error
    assert caught.value.headers == ({} if allow is None else {"allow": allow})
    assert len(caught.value.message) < 300


def test_not_found_message_bounds_the_echoed_path() -> None:
    with pytest.raises(NotFoundError) as caught:
        resolve("GET", b"/v1/" + b"x" * 10000)

    assert "/v1/xxx" in caught.value.message
    assert len(caught.value.message) < 300
