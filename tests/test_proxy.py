"""End to end: the official SDK and raw HTTP through the proxy, under uvicorn, to the simulator."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from files_api_simulator import Simulator
from tests.constants import ALL_SECRETS, ALPHA, BETA_HEADERS, BRAVO, FILES_BETA, SDK_GA_HEADERS, SDK_VERSION
from tests.support import raw_http


def _sha256(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _assert_envelope(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]


def test_sdk_upload_retrieve_download_delete(alpha: anthropic.Anthropic, simulator: Simulator) -> None:
    uploaded = alpha.files.upload(file=("notes.txt", b"hello, files", "text/plain"))
    assert (uploaded.filename, uploaded.mime_type, uploaded.size_bytes) == ("notes.txt", "text/plain", 12)
    assert simulator.uploads[uploaded.id] == (12, hashlib.sha256(b"hello, files").hexdigest())

    assert alpha.files.retrieve_metadata(uploaded.id) == uploaded

    generated = simulator.add_file(ALPHA.upstream_key, filename="out.bin", size_bytes=300_000)
    downloaded = alpha.files.download(generated)
    assert downloaded.read() == b"".join(simulator.content_of(generated))
    assert downloaded.headers["content-length"] == "300000"
    assert "out.bin" in downloaded.headers["content-disposition"]

    assert alpha.files.delete(uploaded.id).id == uploaded.id
    with pytest.raises(anthropic.NotFoundError):
        alpha.files.retrieve_metadata(uploaded.id)


def test_sdk_error_for_non_downloadable_file_passes_through(alpha: anthropic.Anthropic) -> None:
    uploaded = alpha.files.upload(file=("in.txt", b"x", "text/plain"))
    with pytest.raises(anthropic.BadRequestError) as raised:
        alpha.files.download(uploaded.id)
    assert raised.value.body["error"]["details"]["error_code"] == "file_not_downloadable"  # type: ignore[index]
    assert raised.value.request_id and raised.value.request_id.startswith("req_")


def test_sdk_list_auto_paginates_over_several_pages(alpha: anthropic.Anthropic, simulator: Simulator) -> None:
    ids = [alpha.files.upload(file=(f"f{i}.txt", b"x", "text/plain")).id for i in range(7)]

    listed = [file.id for file in alpha.files.list(limit=3)]

    assert listed == ids[::-1]
    pages = [r for r in simulator.received if r.method == "GET" and r.path == "/v1/files"]
    assert len(pages) == 3
    assert "page=page_" in pages[1].query


def test_beta_list_keeps_beta_shape_and_cursors(proxy_url: str, alpha: anthropic.Anthropic) -> None:
    ids = [alpha.files.upload(file=(f"b{i}.txt", b"x", "text/plain")).id for i in range(5)]
    seen: list[str] = []
    params: dict[str, str | int] = {"beta": "true", "limit": 2}
    with httpx.Client(base_url=proxy_url, headers=BETA_HEADERS) as client:
        while True:
            page = client.get("/v1/files", params=params).json()
            assert set(page) == {"data", "has_more", "first_id", "last_id"}
            assert all("expires_at" not in item for item in page["data"])
            seen += [item["id"] for item in page["data"]]
            if not page["has_more"]:
                break
            params = {"beta": "true", "limit": 2, "after_id": page["last_id"]}
    assert seen == ids[::-1]


def test_tenants_see_only_their_own_files_and_upstream_never_sees_a_proxy_key(
    alpha: anthropic.Anthropic, bravo: anthropic.Anthropic, simulator: Simulator
) -> None:
    mine = alpha.files.upload(file=("a.txt", b"alpha", "text/plain"))
    theirs = bravo.files.upload(file=("b.txt", b"bravo", "text/plain"))

    assert [f.id for f in alpha.files.list()] == [mine.id]
    assert [f.id for f in bravo.files.list()] == [theirs.id]
    with pytest.raises(anthropic.NotFoundError):
        bravo.files.retrieve_metadata(mine.id)

    for received in simulator.received:
        sent = " ".join(value for _, value in received.headers)
        assert ALPHA.proxy_key not in sent and BRAVO.proxy_key not in sent
        # The SDK sends Bearer; the same form reaches upstream, with the tenant's own key.
        assert received.header("x-api-key") is None
        assert received.header("authorization") in {
            f"Bearer {ALPHA.upstream_key}",
            f"Bearer {BRAVO.upstream_key}",
        }


def test_end_to_end_headers_and_query_pass_unchanged_and_hop_by_hop_are_dropped(
    proxy_url: str, simulator: Simulator
) -> None:
    response = httpx.get(
        f"{proxy_url}/v1/files?limit=5&beta=true&limit=6",
        headers=[
            ("x-api-key", ALPHA.proxy_key),
            ("anthropic-version", SDK_VERSION),
            ("anthropic-beta", f"{FILES_BETA},other-beta-2026-01-01"),
            ("x-team-trace", "t-1"),
            ("connection", "keep-alive, x-private-hop"),
            ("x-private-hop", "must-not-pass"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
        ],
    )

    assert response.status_code == 200
    [received] = simulator.received
    assert received.query == "limit=5&beta=true&limit=6"
    assert received.header("anthropic-beta") == f"{FILES_BETA},other-beta-2026-01-01"
    assert received.header("anthropic-version") == SDK_VERSION
    assert received.header("x-team-trace") == "t-1"
    assert received.header("x-api-key") == ALPHA.upstream_key
    assert (received.header("host") or "").startswith("127.0.0.1:")
    for hop in ("x-private-hop", "keep-alive", "te"):
        assert received.header(hop) is None, hop
    assert received.header("connection") in (None, "keep-alive")  # httpx's own, not the client's
    assert response.headers["request-id"].startswith("req_")


def test_upstream_error_status_headers_and_body_pass_through(
    alpha: anthropic.Anthropic, proxy_url: str, simulator: Simulator
) -> None:
    simulator.inject_fault(status=429)
    response = httpx.get(f"{proxy_url}/v1/files", headers=SDK_GA_HEADERS)

    _assert_envelope(response, 429, "rate_limit_error")
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("method", "target", "headers", "status", "error_type"),
    [
        pytest.param("GET", "/v1/files", [], 401, "authentication_error", id="no-key"),
        pytest.param(
            "GET", "/v1/files", [("x-api-key", "fp-unknown")], 401, "authentication_error", id="unknown"
        ),
        pytest.param("GET", "/v1/files", [("x-api-key", "")], 401, "authentication_error", id="empty"),
        pytest.param(
            "GET",
            "/v1/files",
            [("x-api-key", ALPHA.upstream_key)],
            401,
            "authentication_error",
            id="upstream-key",
        ),
        pytest.param("POST", "/v1/messages", None, 404, "not_found_error", id="not-files"),
        pytest.param("GET", "/v1/models", None, 404, "not_found_error", id="models"),
        pytest.param("GET", "/admin", None, 404, "not_found_error", id="other-root"),
        pytest.param("GET", "/v1/files/file.1", None, 400, "invalid_request_error", id="bad-charset"),
    ],
)
def test_rejections_are_answered_by_the_proxy_and_never_reach_upstream(
    proxy_url: str,
    simulator: Simulator,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None,
    status: int,
    error_type: str,
) -> None:
    sent = [("x-api-key", ALPHA.proxy_key)] if headers is None else headers
    head = f"{method} {target} HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\ncontent-length: 0\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in sent) + "\r\n"

    got_status, got_headers, body = raw_http(int(proxy_url.rsplit(":", 1)[1]), head.encode())

    assert got_status == status
    envelope = json.loads(body)
    assert envelope["error"]["type"] == error_type
    assert envelope["request_id"] == got_headers["request-id"]
    assert not any(secret in body.decode() for secret in ALL_SECRETS)
    assert simulator.received == []


def test_health_endpoints_need_no_key_and_never_reach_upstream(proxy_url: str, simulator: Simulator) -> None:
    assert httpx.get(f"{proxy_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{proxy_url}/readyz").status_code == 200
    assert simulator.received == []
