"""Upstream and Redis faults (issue 7): a slow or unreachable upstream, a connection reset in the middle
of a download, a 5xx storm, and Redis killed and restarted under load. The simulator injects the
upstream faults; Redis is a real redis-server that the test stops and starts."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import pytest

from files_api_simulator import Simulator
from tests.constants import ALPHA, GA_HEADERS
from tests.support import FakeClock, RedisServer, free_port, wait_for


def _assert_proxy_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    assert response.headers["request-id"].startswith("req_fp")


def test_upstream_slower_than_the_read_timeout_is_504(
    serve_proxy: Callable[..., str], simulator: Simulator
) -> None:
    url = serve_proxy(upstream={"read_timeout_s": 0.2})
    simulator.inject_fault(delay_s=1.0)

    _assert_proxy_error(httpx.get(f"{url}/v1/files", headers=GA_HEADERS), 504, "timeout_error")


def test_upstream_refusing_connections_is_502_without_naming_the_host(
    serve_proxy: Callable[..., str],
) -> None:
    url = serve_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")

    response = httpx.get(f"{url}/v1/files", headers=GA_HEADERS)

    _assert_proxy_error(response, 502, "api_error")
    assert "127.0.0.1" not in response.text


def test_reset_mid_download_aborts_the_client_response_and_nothing_is_kept(
    proxy_url: str, simulator: Simulator
) -> None:
    """The headers (with Content-Length) are out when the upstream connection breaks: the proxy can
    only cut the client's connection short, which httpx reports as an error, never as a short file.
    Downloads are never cached, so the next download goes upstream and arrives whole."""
    size = 1_000_000
    file_id = simulator.add_file(ALPHA.upstream_key, filename="cut.bin", size_bytes=size)
    simulator.inject_fault(reset_after_bytes=200_000, path_prefix=f"/v1/files/{file_id}/content")
    url = f"{proxy_url}/v1/files/{file_id}/content"

    received = 0
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        with httpx.stream("GET", url, headers=GA_HEADERS) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(size)
            for chunk in response.iter_raw():
                received += len(chunk)
    assert received < size
    assert simulator.downloads[0].finished == "reset"

    again = httpx.get(url, headers=GA_HEADERS)
    assert again.status_code == 200
    assert again.headers["cache-status"] == "files-proxy; fwd=method"
    assert again.content == b"".join(simulator.content_of(file_id))
    assert [d.finished for d in simulator.downloads] == ["reset", "complete"]
    assert httpx.get(f"{proxy_url}/healthz").json() == {"status": "ok"}


def test_a_5xx_storm_serves_stale_list_pages_and_metadata_hits_stay_hits(
    serve_proxy: Callable[..., str], simulator: Simulator
) -> None:
    clock = FakeClock()
    url = serve_proxy(clock=clock, cache={"list_ttl_s": 10, "stale_if_error_s": 300})
    file_id = simulator.add_file(ALPHA.upstream_key, filename="kept.bin", downloadable=False)
    with anthropic.Anthropic(base_url=url, api_key=ALPHA.proxy_key, max_retries=0) as client:
        page = client.files.with_raw_response.list()
        metadata = client.files.retrieve_metadata(file_id)

        clock.advance(60)  # every list page is past its freshness, within stale-if-error
        simulator.inject_fault(status=503, times=-1)  # every upstream request fails until cleared

        def read(_: int) -> tuple[str, str]:
            listed = client.files.with_raw_response.list()
            retrieved = client.files.with_raw_response.retrieve_metadata(file_id)
            assert listed.http_response.content == page.http_response.content
            assert retrieved.parse() == metadata
            return listed.headers["cache-status"], retrieved.headers["cache-status"]

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(read, range(40)))
        with pytest.raises(anthropic.InternalServerError):  # not cacheable: the 503 passes through
            client.files.upload(file=("storm.txt", b"x", "text/plain"))

    list_statuses = Counter(listed for listed, _ in answers)
    assert set(list_statuses) <= {"files-proxy; fwd=stale; fwd-status=503"}, list_statuses
    assert all(retrieved.startswith("files-proxy; hit; ttl=") for _, retrieved in answers)
    assert not any(r.path == f"/v1/files/{file_id}" for r in simulator.received[2:])


def test_redis_killed_and_restarted_under_load_every_request_succeeds_and_hits_return(
    serve_proxy: Callable[..., str], redis_server: RedisServer, simulator: Simulator
) -> None:
    """Four SDK clients read metadata and list pages without pause while Redis is killed and started
    again: nothing fails (no SDK retries hide a failure), answers bypass the cache while it is away,
    and hits come back once it returns."""
    url = serve_proxy(cache={"url": redis_server.url})
    file_id = simulator.add_file(ALPHA.upstream_key, filename="r.bin", downloadable=False)
    statuses: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        with anthropic.Anthropic(base_url=url, api_key=ALPHA.proxy_key, max_retries=0) as client:
            while not stop.is_set():
                try:
                    retrieved = client.files.with_raw_response.retrieve_metadata(file_id)
                    assert retrieved.parse().id == file_id
                    listed = client.files.with_raw_response.list()
                    assert file_id in {f.id for f in listed.parse().data}
                    statuses.extend([retrieved.headers["cache-status"], listed.headers["cache-status"]])
                except BaseException as exc:  # noqa: B036 - recorded, then the test fails on it
                    failures.append(exc)
                    return

    def seen(marker: str) -> Callable[[], bool]:
        start = len(statuses)
        return lambda: any(marker in status for status in statuses[start:])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(seen("; hit"), what="hits before the outage")
        redis_server.stop()
        wait_for(seen("fwd=bypass; detail=cache-unavailable"), what="bypass during the outage")
        with anthropic.Anthropic(base_url=url, api_key=ALPHA.proxy_key, max_retries=0) as client:
            uploaded = client.files.upload(file=("outage.txt", b"still works", "text/plain"))
        assert httpx.get(f"{url}/readyz").json() == {"status": "ready", "cache": "unavailable"}
        redis_server.start()
        wait_for(seen("; hit"), seconds=15, what="hits after Redis returned")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    assert failures == []
    assert httpx.get(f"{url}/readyz").json()["cache"] == "up"
    with anthropic.Anthropic(base_url=url, api_key=ALPHA.proxy_key, max_retries=0) as client:
        assert uploaded.id in {f.id for f in client.files.list()}
