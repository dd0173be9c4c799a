"""Large bodies stream through a proxy process without growing its memory; disconnects close upstream.

The proxy runs as `files-proxy serve` in its own process so its memory can be measured alone; the
bodies are generated and hashed chunk by chunk, so the test process never holds them either.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from files_api_simulator import Simulator
from tests.constants import ALPHA, SDK_GA_HEADERS
from tests.support import ProxyProcess, config_toml, team_environment

SIZE = 200 * 1024 * 1024
MEMORY_BOUND = 64 * 1024 * 1024
CHUNK = 1024 * 1024


class PeakRss:
    """Samples a process's resident memory in a thread; `growth` is the peak over the baseline."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        print(f"proxy RSS {self.baseline / 2**20:.1f} MiB at start, grew by {self.growth / 2**20:.1f} MiB")

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.fixture
def proxy_process(simulator_url: str, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """`files-proxy serve` as a subprocess in front of the in-process simulator: (url, pid)."""
    config = tmp_path / "proxy.toml"
    config.write_text(config_toml(simulator_url))
    env = {**os.environ, **team_environment()}
    with ProxyProcess(config, tmp_path / "proxy.out", env) as proxy:
        # Warm up the code paths once, so the baseline includes imports and pools.
        httpx.get(f"{proxy.url}/v1/files", headers=SDK_GA_HEADERS)
        yield proxy.url, proxy.pid


def _pattern(size: int) -> Iterator[bytes]:
    block = hashlib.sha256(b"upload").digest() * (CHUNK // 32)
    for offset in range(0, size, CHUNK):
        yield block[: min(CHUNK, size - offset)]


def test_200mb_download_streams_with_bounded_proxy_memory(
    proxy_process: tuple[str, int], simulator: Simulator
) -> None:
    url, pid = proxy_process
    file_id = simulator.add_file(ALPHA.upstream_key, filename="big.bin", size_bytes=SIZE)
    expected = hashlib.sha256()
    for chunk in simulator.content_of(file_id):
        expected.update(chunk)

    received = hashlib.sha256()
    size = 0
    with (
        PeakRss(pid) as rss,
        httpx.stream("GET", f"{url}/v1/files/{file_id}/content", headers=SDK_GA_HEADERS) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-length"] == str(SIZE)
        for chunk in response.iter_raw():
            received.update(chunk)
            size += len(chunk)

    assert size == SIZE
    assert received.hexdigest() == expected.hexdigest()
    assert rss.growth < MEMORY_BOUND, f"proxy grew by {rss.growth / 2**20:.1f} MiB"


def test_200mb_upload_streams_with_bounded_proxy_memory(
    proxy_process: tuple[str, int], simulator: Simulator
) -> None:
    url, pid = proxy_process
    head = b'--bnd\r\ncontent-disposition: form-data; name="file"; filename="big.bin"\r\n'
    head += b"content-type: application/octet-stream\r\n\r\n"
    tail = b"\r\n--bnd--\r\n"
    expected = hashlib.sha256()
    for chunk in _pattern(SIZE):
        expected.update(chunk)

    def body() -> Iterator[bytes]:
        yield head
        yield from _pattern(SIZE)
        yield tail

    headers = {
        **SDK_GA_HEADERS,
        "content-type": "multipart/form-data; boundary=bnd",
        "content-length": str(len(head) + SIZE + len(tail)),
    }
    with PeakRss(pid) as rss:
        response = httpx.post(f"{url}/v1/files", content=body(), headers=headers, timeout=120)

    assert response.status_code == 200, response.text
    uploaded = response.json()
    assert uploaded["size_bytes"] == SIZE
    assert simulator.uploads[uploaded["id"]] == (SIZE, expected.hexdigest())
    assert rss.growth < MEMORY_BOUND, f"proxy grew by {rss.growth / 2**20:.1f} MiB"


def test_client_disconnect_mid_download_closes_the_upstream_response(
    serve_proxy: Callable[..., str], simulator: Simulator
) -> None:
    url = serve_proxy()
    file_id = simulator.add_file(ALPHA.upstream_key, filename="big.bin", size_bytes=SIZE)

    with httpx.stream("GET", f"{url}/v1/files/{file_id}/content", headers=SDK_GA_HEADERS) as response:
        assert response.status_code == 200
        next(response.iter_raw())

    deadline = time.monotonic() + 10
    while not simulator.downloads or simulator.downloads[-1].finished is None:
        assert time.monotonic() < deadline, "the upstream download was never closed"
        time.sleep(0.02)
    [download] = simulator.downloads
    assert download.finished == "aborted"
    assert download.bytes_sent < SIZE // 4
