"""No team holds the upstream: one team's 100 downloads that are never read take at most its share of
upstream connections, every other team's requests go through meanwhile, and each stalled download is
cut after `limits.client_send_timeout_s`, which releases its upstream connection at once."""

from __future__ import annotations

import concurrent.futures
import json
import socket
from collections.abc import Callable, Iterator

import anthropic
import httpx
import pytest

from files_api_simulator import Simulator
from tests.constants import ALPHA, BRAVO, SDK_GA_HEADERS, SDK_VERSION
from tests.support import wait_for

STALLED = 100
SHARE = 4  # half of max_connections
SEND_TIMEOUT_S = 1.0
POOL_TIMEOUT_S = 1.5
# Larger than loopback can buffer for one unread download (the proxy's receive buffer may grow to
# net.ipv4.tcp_rmem's 32 MiB, plus the simulator's send buffer), so no stalled download can complete.
SIZE = 128 * 1024 * 1024


def _open_unread_download(port: int, file_id: str) -> socket.socket:
    """A GET for the content whose answer is never read; a tiny receive buffer stalls it soon."""
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.connect(("127.0.0.1", port))
    conn.sendall(
        f"GET /v1/files/{file_id}/content HTTP/1.1\r\nhost: p\r\nx-api-key: {ALPHA.proxy_key}\r\n"
        f"anthropic-version: {SDK_VERSION}\r\nconnection: close\r\n\r\n".encode()
    )
    return conn


def _read_all(conn: socket.socket) -> tuple[int, int, bytes]:
    """Status, declared Content-Length and the body bytes received until the proxy closed."""
    conn.settimeout(15)
    received = b""
    while chunk := conn.recv(1 << 20):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), length, body


@pytest.fixture
def stalled_proxy(serve_proxy: Callable[..., str]) -> str:
    return serve_proxy(
        upstream={"max_connections": 2 * SHARE, "pool_timeout_s": POOL_TIMEOUT_S},
        limits={"client_send_timeout_s": SEND_TIMEOUT_S},
    )


@pytest.fixture
def unread(stalled_proxy: str, simulator: Simulator) -> Iterator[list[socket.socket]]:
    file_id = simulator.add_file(ALPHA.upstream_key, filename="huge.bin", size_bytes=SIZE)
    port = int(stalled_proxy.rsplit(":", 1)[1])
    conns = [_open_unread_download(port, file_id) for _ in range(STALLED)]
    yield conns
    for conn in conns:
        conn.close()


def test_one_team_with_100_unread_downloads_leaves_room_for_the_others_and_is_cut(
    stalled_proxy: str, simulator: Simulator, unread: list[socket.socket]
) -> None:
    wait_for(lambda: len(simulator.downloads) >= SHARE, what="the first downloads reached upstream")

    with anthropic.Anthropic(base_url=stalled_proxy, api_key=BRAVO.proxy_key, max_retries=0) as bravo:
        listed = bravo.files.with_raw_response.list()  # a miss
        uploaded = bravo.files.upload(file=("b.txt", b"bravo's file", "text/plain"))
        small = simulator.add_file(BRAVO.upstream_key, filename="s.bin", size_bytes=200_000)
        content = bravo.files.download(small).read()
    assert listed.headers["cache-status"].startswith("files-proxy; fwd=uri-miss")
    assert uploaded.id in simulator.uploads
    assert content == b"".join(simulator.content_of(small))
    alpha_running = [d for d in simulator.downloads if d.file_id != small and d.finished is None]
    assert len(alpha_running) <= SHARE

    # Every stalled download is cut and its upstream response closed; the ones that waited past the
    # pool timeout for one of alpha's slots got 504 instead.
    wait_for(
        lambda: (
            all(d.finished is not None for d in simulator.downloads)
            and sum(1 for d in simulator.downloads if d.file_id != small) >= SHARE
        ),
        seconds=10,
        what="alpha's stalled downloads cut",
    )
    alpha_downloads = [d for d in simulator.downloads if d.file_id != small]
    assert {d.finished for d in alpha_downloads} == {"aborted"}
    assert all(d.bytes_sent < SIZE for d in alpha_downloads)

    answers = [_read_all(conn) for conn in unread]
    cut = [(length, body) for status, length, body in answers if status == 200]
    refused = [json.loads(body) for status, _, body in answers if status == 504]
    assert len(cut) + len(refused) == STALLED
    assert len(cut) == len(alpha_downloads)
    assert all(len(body) < length for length, body in cut)
    assert {error["error"]["type"] for error in refused} <= {"timeout_error"}


def test_a_team_past_its_share_waits_then_gets_504_while_others_pass(
    serve_proxy: Callable[..., str], simulator: Simulator
) -> None:
    """Slow upstream answers (0.8 s each) to three of one team's requests with a share of two: the
    third waits; with a pool timeout of 0.3 s it gets 504, and the other team is not delayed."""
    url = serve_proxy(upstream={"max_connections": 4, "pool_timeout_s": 0.3})
    simulator.inject_fault(delay_s=0.8, method="GET", times=2)
    headers = {**SDK_GA_HEADERS, "cache-control": "no-cache"}

    with httpx.Client(base_url=url, timeout=10) as client:
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            slow = [pool.submit(client.get, f"/v1/files?limit={n}", headers=headers) for n in (1, 2)]
            wait_for(lambda: simulator.faults_left == 0, seconds=5, what="both slow requests upstream")
            third = client.get("/v1/files?limit=3", headers=headers)
            # Had bravo waited for one of alpha's connections (busy 0.8 s), its own 0.3 s pool
            # timeout would have made this a 504.
            other = client.get("/v1/files", headers={**headers, "x-api-key": BRAVO.proxy_key})
            statuses = [f.result().status_code for f in slow]

    assert third.status_code == 504
    assert third.json()["error"]["type"] == "timeout_error"
    assert statuses == [200, 200]
    assert other.status_code == 200
