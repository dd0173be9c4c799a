"""N truly concurrent requests for one uncached file: all connections are open before any request
is written, then every request is written at once, so the proxy sees them together."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx


@dataclass(frozen=True)
class FlightResult:
    requests: int
    ok: int
    upstream_requests: int
    cache_statuses: dict[str, int]
    seconds: float


async def concurrent_misses(
    proxy_url: str, simulator_url: str, headers: dict[str, str], file_id: str, count: int
) -> FlightResult:
    """Send `count` GETs of one file's metadata at once; count what reached the simulator."""
    path = f"/v1/files/{file_id}"
    async with httpx.AsyncClient(base_url=simulator_url) as control:
        (await control.delete("/_simulator/requests")).raise_for_status()
        parts = urlsplit(proxy_url)
        connections = await asyncio.gather(
            *(asyncio.open_connection(parts.hostname, parts.port) for _ in range(count))
        )
        lines = [f"GET {path} HTTP/1.1", f"host: {parts.netloc}", "connection: close"]
        request = ("\r\n".join(lines + [f"{k}: {v}" for k, v in headers.items()]) + "\r\n\r\n").encode()
        started = time.perf_counter()
        for _, writer in connections:
            writer.write(request)
        answers = await asyncio.gather(*(_answer(reader, writer) for reader, writer in connections))
        seconds = time.perf_counter() - started
        received = (await control.get("/_simulator/requests")).json()
    upstream = sum(1 for seen in received if seen["method"] == "GET" and seen["path"] == path)
    statuses = Counter(status for status, _ in answers)
    return FlightResult(
        requests=count,
        ok=statuses[200],
        upstream_requests=upstream,
        cache_statuses=dict(Counter(cache for _, cache in answers)),
        seconds=seconds,
    )


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, str]:
    """The status and Cache-Status of one response (read to the end: connection: close)."""
    try:
        raw = await reader.read()
    finally:
        writer.close()
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1]) if head and head[0] else 0
    cache = next(
        (line.split(":", 1)[1].strip() for line in head[1:] if line.lower().startswith("cache-status:")), ""
    )
    # Only the kind of answer (hit, stored, collapsed), not its ttl.
    return status, "; ".join(part for part in cache.split("; ")[1:] if not part.startswith("ttl="))
