"""What a hostile or careless team can send a shared proxy (issue 12): one async function per attack.

Each takes the proxy's address (a `Target`, which also names the attacking team's own valid key and
files) and a deadline in `time.monotonic()` seconds. Each is bounded in count and in bytes, stops by
itself at the deadline, closes every connection it opened, and returns one line saying what it sent
and what the proxy did with it. The target is the proxy the bench started on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from itertools import islice, repeat
from typing import Any, TypeVar

from bench.seed import HEADERS

MB = 1_000_000
_CHUNK = memoryview(b"a" * 2**20)
# Descriptors the idle connections leave free for the attacking process's other sockets and files.
_SPARE_FDS = 300
_WORKERS = 4


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    key: str  # the attacking team's own proxy key: valid, so the attacks after authentication run
    file_ids: tuple[str, ...]  # its files: valid list cursors, and one to read
    scale: float = 1.0  # of every count and size; the smoke run's attacks are 1/100 of the full ones

    def scaled(self, full: int) -> int:
        return max(1, round(full * self.scale))

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"


AttackFunction = Callable[[Target, float], Coroutine[Any, Any, str]]
_T = TypeVar("_T")


async def huge_header(target: Target, deadline: float) -> str:
    """One header section of 96 MB, streamed as fast as the socket takes it, then ended."""
    size = target.scaled(96 * MB)
    started = time.monotonic()
    sent, ending = await _send_header(target, size, deadline, finish=True)
    return f"{sent / MB:,.1f} of {size / MB:,.1f} MB sent in {time.monotonic() - started:.1f} s, {ending}"


async def unfinished_headers(target: Target, deadline: float) -> str:
    """Six 64 MB header sections at once, never ended: each connection is held to the deadline."""
    size = target.scaled(64 * MB)
    results = await asyncio.gather(*(_send_header(target, size, deadline, finish=False) for _ in range(6)))
    sent = sum(bytes_sent for bytes_sent, _ in results)
    endings = _tally(Counter(ending for _, ending in results))
    return f"6 x {size / MB:,.1f} MB: {sent / MB:,.1f} MB sent; {endings}"


async def idle_connections(target: Target, deadline: float) -> str:
    """5,000 connections that send nothing, kept until the deadline (fewer if the bench's own
    open-files limit has no room for them)."""
    count = min(target.scaled(5000), _spare_descriptors())
    gate = asyncio.Semaphore(200)  # connections being opened at once

    async def idle() -> str:
        async with gate:
            try:
                reader, writer = await _within(deadline, _connect(target))
            except TimeoutError:
                return "not connected by the deadline"
            except OSError:
                return "refused"
        try:
            return await _ending(reader, deadline)
        finally:
            writer.transport.abort()

    endings = Counter(await asyncio.gather(*(idle() for _ in range(count))))
    return f"{count:,} connections: {_tally(endings)}"


async def slow_headers(target: Target, deadline: float) -> str:
    """A few hundred header sections, each growing by one byte every 4 s."""
    count = target.scaled(300)

    async def slow() -> tuple[int, str]:
        try:
            reader, writer = await _within(deadline, _connect(target))
        except (TimeoutError, OSError):
            return 0, "not connected"
        sent = 0
        answer = asyncio.ensure_future(_ending(reader, deadline))
        try:
            writer.write(_head_start(target))
            while not answer.done() and time.monotonic() < deadline:
                writer.write(b"a")
                sent += 1
                await asyncio.wait({answer}, timeout=min(4.0, max(0.0, deadline - time.monotonic())))
            return sent, await answer
        finally:
            answer.cancel()
            writer.transport.abort()

    results = await asyncio.gather(*(slow() for _ in range(count)))
    bytes_sent = sum(sent for sent, _ in results)
    return f"{count:,} connections, {bytes_sent:,} bytes in all: {_tally(Counter(e for _, e in results))}"


async def memo_flood(target: Target, deadline: float) -> str:
    """A 24 MB `anthropic-beta` (many distinct parts, so normalising it is costly), then distinct
    large `anthropic-beta`/`anthropic-version` values and large query strings, all with a valid key:
    what per-process memos keyed by raw client values would keep."""
    size = target.scaled(24 * MB)
    big = _request(target, "/v1/files?limit=1", {"anthropic-beta": _many_parts(size)})
    first = await _flood(target, iter([big]), deadline, workers=1)

    def heads() -> Iterator[bytes]:
        for i in range(target.scaled(256)):
            beta = f"files-api-2025-04-14,{i:08d}" + ",z" * 20_000
            version = f"2023-06-01-{i:08d}" + "v" * 8_000
            yield _request(
                target, "/v1/files?limit=1", {"anthropic-beta": beta, "anthropic-version": version}
            )
        for i in range(target.scaled(4096)):
            yield _request(target, f"/v1/files?limit=1&pad={i:08d}{'q' * 48_000}")

    rest = await _flood(target, heads(), deadline)
    return f"{size / MB:,.1f} MB anthropic-beta: {_tally(first)}; distinct large values: {_tally(rest)}"


async def list_flood(target: Target, deadline: float) -> str:
    """50,000 distinct valid list queries (`limit` and `after_id` varied), as many as the time allows."""
    count = target.scaled(50_000)
    queries = (
        f"/v1/files?limit={limit}&after_id={file_id}"
        for limit in range(1, 1001)
        for file_id in target.file_ids
    )
    heads = (_request(target, query) for query in islice(queries, count))
    started = time.monotonic()
    tally = await _flood(target, heads, deadline)
    return f"{sum(tally.values()):,} of {count:,} sent in {time.monotonic() - started:.1f} s: {_tally(tally)}"


async def websocket_upgrades(target: Target, deadline: float) -> str:
    """WebSocket upgrade requests, every other one with the team's valid key, one connection each."""
    count = target.scaled(2000)
    tally: Counter[str] = Counter()
    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:
            headers = {
                "connection": "Upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": base64.b64encode(os.urandom(16)).decode(),
            }
            try:
                reader, writer = await _connect(target)
            except OSError:
                tally["refused"] += 1
                continue
            try:
                writer.write(_request(target, "/v1/files", headers, authenticated=number % 2 == 0))
                tally[str(await _status(reader))] += 1
            except (OSError, asyncio.IncompleteReadError):
                tally["closed"] += 1
            finally:
                writer.transport.abort()

    with contextlib.suppress(TimeoutError):
        await _within(deadline, asyncio.gather(*(worker() for _ in range(_WORKERS))))
    return f"{sum(tally.values()):,} of {count:,} upgrades: {_tally(tally)}"


async def hit_flood(target: Target, deadline: float) -> str:
    """The team's own cached metadata hits as fast as the proxy answers: access lines, many."""
    count = target.scaled(200_000)
    head = _request(target, f"/v1/files/{target.file_ids[0]}")
    tally = await _flood(target, repeat(head, count), deadline)
    return f"{sum(tally.values()):,} requests: {_tally(tally)}"


def request_head(netloc: str, path: str, headers: dict[str, str]) -> bytes:
    """An HTTP/1.1 GET on a kept-alive connection."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"host: {netloc}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status of one answer (its body read and dropped), and whether the connection stays open."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip().lower() for name, _, value in (x.partition(":") for x in lines)
    }
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers.get("connection") != "close"
    await reader.read()  # no length: the body ends with the connection
    return int(status_line.split()[1]), False


async def _send_header(target: Target, size: int, deadline: float, *, finish: bool) -> tuple[int, str]:
    """Stream a header value of `size` bytes; end the section, or leave it unfinished. The bytes
    sent, and how it ended: the proxy's answer, a close, or still open at the deadline."""
    try:
        reader, writer = await _within(deadline, _connect(target))
    except (TimeoutError, OSError):
        return 0, "not connected"
    sent = 0
    # Read while sending: an early answer (a 431) is seen before the reset its close may bring.
    answer = asyncio.ensure_future(_ending(reader, deadline))
    try:
        with contextlib.suppress(OSError, TimeoutError):  # a close, or the deadline: `answer` says which
            async with asyncio.timeout(deadline - time.monotonic()):
                writer.write(_head_start(target))
                while sent < size and not answer.done():
                    piece = _CHUNK[: size - sent]
                    writer.write(piece)
                    await writer.drain()
                    sent += len(piece)
                if finish and not answer.done():
                    writer.write(b"\r\n\r\n")
                    await writer.drain()
        return sent, await answer
    finally:
        answer.cancel()
        writer.transport.abort()


async def _ending(reader: asyncio.StreamReader, deadline: float) -> str:
    """What the proxy did with a connection by the deadline: answered it, closed it, or neither."""
    try:
        return f"answered {await _within(deadline, _status(reader))}"
    except TimeoutError:
        return "open at the deadline"
    except (OSError, asyncio.IncompleteReadError):
        return "closed by the proxy"


async def _flood(
    target: Target, heads: Iterator[bytes], deadline: float, *, workers: int = _WORKERS
) -> Counter[str]:
    """Send `heads` over `workers` kept-alive connections, each request once the answer to the one
    before has come, until they run out or the deadline; the answers' statuses, counted."""
    tally: Counter[str] = Counter()

    async def worker() -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            for head in heads:
                if connection is None:
                    try:
                        connection = await _connect(target)
                    except OSError:
                        tally["refused"] += 1
                        continue
                reader, writer = connection
                try:
                    # Not drained first: the answer is read while a large head is still being sent.
                    writer.write(head)
                    status, keep_alive = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError):
                    tally["closed"] += 1
                    keep_alive = False
                else:
                    tally[str(status)] += 1
                if not keep_alive:
                    writer.transport.abort()
                    connection = None
        finally:
            if connection is not None:
                connection[1].transport.abort()

    with contextlib.suppress(TimeoutError):
        await _within(deadline, asyncio.gather(*(worker() for _ in range(workers))))
    return tally


async def _within(deadline: float, awaitable: Awaitable[_T]) -> _T:
    async with asyncio.timeout(deadline - time.monotonic()):
        return await awaitable


async def _connect(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(target.host, target.port)


async def _status(reader: asyncio.StreamReader) -> int:
    """The status of an answer's head (what follows is not read)."""
    status_line = await reader.readuntil(b"\r\n")
    return int(status_line.split()[1])


def _request(
    target: Target, path: str, headers: dict[str, str] | None = None, *, authenticated: bool = True
) -> bytes:
    """A request of the attacking team: the SDK's headers, its key, and `headers` over them."""
    sent = {**HEADERS, **({"x-api-key": target.key} if authenticated else {}), **(headers or {})}
    return request_head(target.netloc, path, sent)


def _head_start(target: Target) -> bytes:
    """A request line and the start of a header whose value the caller sends."""
    return f"GET /v1/files HTTP/1.1\r\nhost: {target.netloc}\r\nx-filler: ".encode()


def _many_parts(size: int) -> str:
    """About `size` bytes of distinct comma-separated parts (hex numbers), joined block by block so
    the bench never holds millions of small strings at once."""
    count, block = max(1, size // 8), 1 << 16
    blocks = (
        ",".join(f"{n:07x}" for n in range(start, min(start + block, count)))
        for start in range(0, count, block)
    )
    return ",".join(blocks)


def _spare_descriptors() -> int:
    """Sockets this process may still open under its soft open-files limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(0, soft - len(os.listdir("/proc/self/fd")) - _SPARE_FDS)


def _tally(counts: Counter[str]) -> str:
    """'3 x answered 431, 2 x closed', most frequent first."""
    return ", ".join(f"{n:,} x {what}" for what, n in counts.most_common()) or "nothing"
