"""The cache end to end: a proxy under uvicorn, the simulator behind it, and the store each test names:
the embedded `memory://` store and a real redis-server (the `cache_url` fixture runs both)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anthropic
import httpx
import pytest

from files_api_simulator import Simulator
from tests.constants import ALPHA, BETA_HEADERS, BRAVO, GA_HEADERS
from tests.support import FakeClock, RedisServer, wait_for


@pytest.fixture
def cached_proxy(serve_proxy: Callable[..., str], cache_url: str) -> str:
    return serve_proxy(cache={"url": cache_url})


def _upstream_reads(simulator: Simulator, path: str) -> int:
    return sum(1 for r in simulator.received if r.method == "GET" and r.path == path)


def test_second_metadata_and_list_reads_are_hits(cached_proxy: str, simulator: Simulator) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="seen.bin", downloadable=False)
    for path in (f"/v1/files/{file_id}", "/v1/files"):
        first = httpx.get(cached_proxy + path, headers=GA_HEADERS)
        second = httpx.get(cached_proxy + path, headers=GA_HEADERS)

        assert first.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"
        assert second.headers["cache-status"].startswith("files-proxy; hit; ttl=")
        assert "fwd=" not in second.headers["cache-status"]
        assert int(second.headers["age"]) >= 0
        assert second.content == first.content
        assert second.headers["request-id"] == first.headers["request-id"]
        assert second.headers["content-type"] == "application/json"
        assert _upstream_reads(simulator, path) == 1


def test_upload_delete_and_list_stay_correct_through_the_cache(
    cached_proxy: str, simulator: Simulator
) -> None:
    with anthropic.Anthropic(base_url=cached_proxy, api_key=ALPHA.proxy_key, max_retries=0) as client:
        assert list(client.files.list()) == []
        uploaded = client.files.upload(file=("new.txt", b"new", "text/plain"))
        assert [f.id for f in client.files.list()] == [uploaded.id]
        # The upload answer filled the metadata cache: this read never reaches upstream.
        assert client.files.retrieve_metadata(uploaded.id) == uploaded
        assert _upstream_reads(simulator, f"/v1/files/{uploaded.id}") == 0

        client.files.delete(uploaded.id)
        with pytest.raises(anthropic.NotFoundError):
            client.files.retrieve_metadata(uploaded.id)
        assert list(client.files.list()) == []


def test_concurrent_misses_collapse_into_one_upstream_request(
    cached_proxy: str, simulator: Simulator
) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="hot.bin", downloadable=False)
    simulator.latency_ms = 300

    async def read_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=cached_proxy, headers=GA_HEADERS, limits=limits) as client:
            return await asyncio.gather(*(client.get(f"/v1/files/{file_id}") for _ in range(100)))

    responses = asyncio.run(read_all())

    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert _upstream_reads(simulator, f"/v1/files/{file_id}") == 1
    statuses = [r.headers["cache-status"] for r in responses]
    assert statuses.count("files-proxy; fwd=uri-miss; stored") == 1
    assert all(
        s == "files-proxy; fwd=uri-miss; collapsed" or "hit" in s for s in statuses if "stored" not in s
    )


def test_another_tenant_never_gets_a_cached_entry(cached_proxy: str, simulator: Simulator) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="alpha-only.bin", downloadable=False)
    for path in (f"/v1/files/{file_id}", "/v1/files"):
        httpx.get(cached_proxy + path, headers=GA_HEADERS)
        assert (
            httpx.get(cached_proxy + path, headers=GA_HEADERS)
            .headers["cache-status"]
            .startswith("files-proxy; hit")
        )

    bravo = {**GA_HEADERS, "x-api-key": BRAVO.proxy_key}
    metadata = httpx.get(f"{cached_proxy}/v1/files/{file_id}", headers=bravo)
    listing = httpx.get(f"{cached_proxy}/v1/files", headers=bravo)

    assert metadata.status_code == 404
    assert listing.json()["data"] == []
    assert "hit" not in metadata.headers["cache-status"] and "hit" not in listing.headers["cache-status"]
    # Bravo's reads went upstream with Bravo's own key.
    bravo_reads = [r for r in simulator.received if r.header("x-api-key") == BRAVO.upstream_key]
    assert len(bravo_reads) == 2


def test_beta_and_ga_lists_are_separate_entries_each_in_its_shape(
    cached_proxy: str, simulator: Simulator
) -> None:
    simulator.add_file(ALPHA.upstream_key, filename="both.bin", downloadable=False)
    for _ in range(2):
        ga = httpx.get(f"{cached_proxy}/v1/files?limit=5", headers=GA_HEADERS)
        beta = httpx.get(f"{cached_proxy}/v1/files?limit=5", headers=BETA_HEADERS)
        assert set(ga.json()) == {"data", "next_page"}
        assert set(beta.json()) == {"data", "has_more", "first_id", "last_id"}
        assert "expires_at" in ga.json()["data"][0] and "expires_at" not in beta.json()["data"][0]
    assert ga.headers["cache-status"].startswith("files-proxy; hit")
    assert beta.headers["cache-status"].startswith("files-proxy; hit")
    assert _upstream_reads(simulator, "/v1/files") == 2


def test_stale_list_page_stands_in_for_upstream_failure_within_stale_if_error(
    serve_proxy: Callable[..., str], cache_url: str, simulator: Simulator
) -> None:
    clock = FakeClock()
    cache = {"url": cache_url, "list_ttl_s": 10, "stale_if_error_s": 30}
    url = serve_proxy(clock=clock, cache=cache, upstream={"read_timeout_s": 0.3})
    simulator.add_file(ALPHA.upstream_key, filename="kept.bin", downloadable=False)
    fresh = httpx.get(f"{url}/v1/files", headers=GA_HEADERS)

    clock.advance(15)
    simulator.inject_fault(status=503)
    stale = httpx.get(f"{url}/v1/files", headers=GA_HEADERS)
    assert stale.status_code == 200
    assert stale.content == fresh.content
    assert stale.headers["cache-status"] == "files-proxy; fwd=stale; fwd-status=503"
    assert int(stale.headers["age"]) >= 15

    simulator.inject_fault(delay_s=0.6)  # past the proxy's read timeout: a timeout, no status
    assert (
        httpx.get(f"{url}/v1/files", headers=GA_HEADERS).headers["cache-status"] == "files-proxy; fwd=stale"
    )

    clock.advance(30)
    simulator.inject_fault(status=503)
    failed = httpx.get(f"{url}/v1/files", headers=GA_HEADERS)
    assert failed.status_code == 503
    assert failed.json()["error"]["type"] == "api_error"
    assert failed.headers["cache-status"] == "files-proxy; fwd=uri-miss"


def test_errors_are_never_stored(cached_proxy: str, simulator: Simulator) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="x.bin", downloadable=False)
    simulator.inject_fault(status=529)
    assert httpx.get(f"{cached_proxy}/v1/files/{file_id}", headers=GA_HEADERS).status_code == 529
    recovered = httpx.get(f"{cached_proxy}/v1/files/{file_id}", headers=GA_HEADERS)
    assert recovered.status_code == 200
    assert recovered.headers["cache-status"] == "files-proxy; fwd=uri-miss; stored"


def test_metadata_404_is_cached_briefly(
    serve_proxy: Callable[..., str], cache_url: str, simulator: Simulator
) -> None:
    clock = FakeClock()
    url = serve_proxy(clock=clock, cache={"url": cache_url, "negative_ttl_s": 5})
    for _ in range(2):
        assert httpx.get(f"{url}/v1/files/file_missing", headers=GA_HEADERS).status_code == 404
    assert _upstream_reads(simulator, "/v1/files/file_missing") == 1
    clock.advance(6)
    assert httpx.get(f"{url}/v1/files/file_missing", headers=GA_HEADERS).status_code == 404
    assert _upstream_reads(simulator, "/v1/files/file_missing") == 2


def test_no_cache_request_fetches_upstream_and_stores(cached_proxy: str, simulator: Simulator) -> None:
    httpx.get(f"{cached_proxy}/v1/files", headers=GA_HEADERS)
    forced = httpx.get(f"{cached_proxy}/v1/files", headers={**GA_HEADERS, "cache-control": "no-cache"})
    after = httpx.get(f"{cached_proxy}/v1/files", headers=GA_HEADERS)

    assert forced.headers["cache-status"] == "files-proxy; fwd=request; stored"
    assert after.headers["cache-status"].startswith("files-proxy; hit")
    assert after.headers["request-id"] == forced.headers["request-id"]
    assert _upstream_reads(simulator, "/v1/files") == 2


def test_downloads_uploads_and_deletes_are_forwarded_with_fwd_method(
    cached_proxy: str, simulator: Simulator
) -> None:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="d.bin", size_bytes=10)
    download = httpx.get(f"{cached_proxy}/v1/files/{file_id}/content", headers=GA_HEADERS)
    delete = httpx.delete(f"{cached_proxy}/v1/files/{file_id}", headers=GA_HEADERS)
    assert download.headers["cache-status"] == delete.headers["cache-status"] == "files-proxy; fwd=method"


def test_a_delete_during_a_redis_outage_is_applied_when_redis_returns(
    serve_proxy: Callable[..., str], redis_server: RedisServer, simulator: Simulator
) -> None:
    url = serve_proxy(cache={"url": redis_server.url})
    with anthropic.Anthropic(base_url=url, api_key=ALPHA.proxy_key, max_retries=0) as client:
        uploaded = client.files.upload(file=("doomed.txt", b"x", "text/plain"))
        assert client.files.retrieve_metadata(uploaded.id).id == uploaded.id

        redis_server.pause()  # Redis keeps its data, but stops answering
        client.files.delete(uploaded.id)
        redis_server.resume()

        # The cached metadata survived in Redis; the held invalidation is written as soon as it answers.
        wait_for(lambda: httpx.get(f"{url}/readyz").json()["cache"] == "up")
        with pytest.raises(anthropic.NotFoundError):
            client.files.retrieve_metadata(uploaded.id)
        assert uploaded.id not in {f.id for f in client.files.list()}
