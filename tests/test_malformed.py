"""Malformed upstream answers pass through as they came (status, headers, body), are never stored and
never fill the metadata cache; an upload answered 200 still makes the scope's list pages stale; and
answers marked `Cache-Control: no-store` or `private` are never stored."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from files_api_simulator import Simulator
from tests.constants import ALPHA, GA_HEADERS

HTML = "<html><body>Gateway says hello</body></html>"


def _twice(url: str) -> list[httpx.Response]:
    return [httpx.get(url, headers=GA_HEADERS) for _ in range(2)]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(HTML, "text/html", id="html"),
        pytest.param("[]", "application/json", id="array"),
        pytest.param('{"data": "nope"}', "application/json", id="data-not-a-list"),
        pytest.param(
            '{"data": [{"type": "file"}], "next_page": null}', "application/json", id="file-without-id"
        ),
        pytest.param('{"data": [', "application/json", id="truncated-json"),
    ],
)
def test_a_malformed_list_page_passes_through_and_is_not_stored(
    proxy_url: str, simulator: Simulator, body: str, content_type: str
) -> None:
    simulator.inject_fault(body=body, headers={"content-type": content_type, "x-middlebox": "1"})

    first, second = _twice(f"{proxy_url}/v1/files")

    assert first.status_code == 200
    assert first.text == body
    assert first.headers["content-type"] == content_type
    assert first.headers["x-middlebox"] == "1"
    assert first.headers["cache-status"] == "files-proxy; fwd=uri-miss"
    assert second.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"
    assert second.json()["data"] == []
    assert len(simulator.received) == 2


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(HTML, id="html"),
        pytest.param('[{"id": "file_x"}]', id="array"),
        pytest.param('{"type": "file", "filename": "x"}', id="without-id"),
        pytest.param('{"id": 7}', id="id-not-a-string"),
    ],
)
def test_a_malformed_file_object_passes_through_and_is_not_stored(
    proxy_url: str, simulator: Simulator, body: str
) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="m.bin", downloadable=False)
    simulator.inject_fault(body=body, path_prefix=f"/v1/files/{file_id}")

    first, second = _twice(f"{proxy_url}/v1/files/{file_id}")

    assert (first.status_code, first.text) == (200, body)
    assert first.headers["cache-status"] == "files-proxy; fwd=uri-miss"
    assert second.json()["id"] == file_id
    assert second.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"


def test_a_list_page_with_a_malformed_item_fills_no_metadata(proxy_url: str, simulator: Simulator) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="k.bin", downloadable=False)
    page = f'{{"data": [{{"id": "{file_id}", "type": "file"}}, {{"type": "file"}}], "next_page": null}}'
    simulator.inject_fault(body=page, headers={"content-type": "application/json"})

    assert httpx.get(f"{proxy_url}/v1/files", headers=GA_HEADERS).text == page
    metadata = httpx.get(f"{proxy_url}/v1/files/{file_id}", headers=GA_HEADERS)

    assert metadata.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"
    assert metadata.json()["filename"] == "k.bin"


@pytest.mark.parametrize(
    ("path", "cache_control"),
    [
        pytest.param("list", "no-store", id="list-no-store"),
        pytest.param("list", "private, max-age=60", id="list-private"),
        pytest.param("file", "No-Store", id="metadata-no-store"),
        pytest.param("file", 'private="set-cookie"', id="metadata-private-field"),
    ],
)
def test_no_store_and_private_answers_are_never_stored(
    proxy_url: str, simulator: Simulator, path: str, cache_control: str
) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="p.bin", downloadable=False)
    url = f"{proxy_url}/v1/files" + ("" if path == "list" else f"/{file_id}")
    simulator.inject_fault(headers={"cache-control": cache_control}, times=-1)

    first, second = _twice(url)

    assert first.status_code == second.status_code == 200
    assert first.headers["cache-control"] == cache_control
    assert [first.headers["cache-status"], second.headers["cache-status"]] == [
        "files-proxy; fwd=uri-miss"
    ] * 2
    assert len(simulator.received) == 2


def test_an_upload_answered_with_html_reaches_the_sdk_once_and_the_next_list_is_fresh(
    proxy_url: str, simulator: Simulator
) -> None:
    """A middlebox turns the upstream's 200 into an HTML page: the upload did happen. The proxy once
    answered 500, so the SDK uploaded the file three times and the cached list missed it."""
    with anthropic.Anthropic(base_url=proxy_url, api_key=ALPHA.proxy_key, max_retries=2) as client:
        assert client.files.list().data == []  # a cached, now outdated page
        simulator.inject_fault(body=HTML, headers={"content-type": "text/html"}, method="POST")

        raw = client.files.with_raw_response.upload(file=("once.txt", b"once", "text/plain"))

        assert raw.status_code == 200
        assert raw.http_response.text == HTML
        [uploaded] = simulator.uploads
        # The HTML filled no metadata: the first read of the new file goes upstream.
        metadata = client.files.with_raw_response.retrieve_metadata(uploaded)
        assert metadata.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"
        listed = client.files.with_raw_response.list()
        assert [f.id for f in listed.parse().data] == [uploaded]
        assert listed.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"
    assert [r.method for r in simulator.received].count("POST") == 1
