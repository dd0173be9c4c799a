"""One record per request: measured by an ASGI middleware around the whole app, then written as a
JSON access line and handed to metrics and usage.

The middleware sees the bytes really received and sent (streamed bodies included) and the final
status; the handler adds what only it knows (tenant, route, file id, upstream time) through
`request.state`. Access lines are written to stdout in batches by a thread, so the event loop never
blocks on the terminal or a log pipe, and pays no thread hand-off per line. No header value but the
user agent and the client's own request id is ever logged, so no key or token can reach a log line.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import new_request_id

access_logger = logging.getLogger("files_proxy.access")

_UNRECORDED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_MAX_CLIENT_VALUE = 200


@dataclass(slots=True)
class RequestRecord:
    """What one request did. Not frozen: a frozen dataclass sets each field through
    `object.__setattr__`, about 3% of an in-process cache hit; the sinks only read it."""

    ts: str
    request_id: str
    upstream_request_id: str | None
    client_request_id: str | None
    tenant: str | None
    workspace: str | None
    method: str
    route: str | None
    file_id: str | None
    status: int
    cache: str
    bytes_in: int
    bytes_out: int
    # An upload answered 200: the file's size as the answer gives it (bytes_in counts the multipart body).
    upload_size_bytes: int | None
    duration_ms: float
    upstream_ms: float | None
    user_agent: str | None

    def json_line(self) -> str:
        # Not dataclasses.asdict: it deep-copies every field (about 7% of an in-process cache hit).
        return _JSON.encode({name: getattr(self, name) for name in _FIELD_NAMES})


_FIELD_NAMES = tuple(field.name for field in fields(RequestRecord))
# json.dumps with separators builds a new encoder on every call.
_JSON = json.JSONEncoder(separators=(",", ":"))
Sink = Callable[[RequestRecord], None]


class AccessMiddleware:
    """Gives every request an id (and a `request-id` header if it has none) and records it."""

    def __init__(
        self, app: ASGIApp, sinks: list[Sink], *, on_start: Callable[[], None], on_end: Callable[[], None]
    ):
        self._app = app
        self._sinks = sinks
        self._on_start = on_start
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNRECORDED_PATHS:
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = new_request_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        sizes = {"in": 0, "out": 0}
        response: dict[str, Any] = {"status": 500, "request_id": None, "cache_status": ""}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sizes["in"] += len(message.get("body", b""))
            return message

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                headers = list(message.get("headers", []))
                for name, value in headers:
                    if name == b"request-id":
                        response["request_id"] = value.decode("latin-1")
                    elif name == b"cache-status":
                        response["cache_status"] = value.decode("latin-1")
                if response["request_id"] is None:
                    headers.append((b"request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sizes["out"] += len(message.get("body", b""))
            await send(message)

        self._on_start()
        try:
            await self._app(scope, counting_receive, tagging_send)
        finally:
            self._on_end()
            record = _record(scope, state, request_id, response, sizes, started)
            for sink in self._sinks:
                sink(record)


def _record(
    scope: Scope,
    state: dict[str, Any],
    request_id: str,
    response: dict[str, Any],
    sizes: dict[str, int],
    started: float,
) -> RequestRecord:
    headers = {name: value for name, value in scope["headers"] if name in (b"user-agent", b"x-request-id")}
    upstream_request_id = response["request_id"] if response["request_id"] != request_id else None
    return RequestRecord(
        ts=_timestamp(time.time()),
        request_id=request_id,
        upstream_request_id=upstream_request_id,
        client_request_id=_client_value(headers.get(b"x-request-id")),
        tenant=state.get("tenant"),
        workspace=state.get("workspace"),
        method=scope["method"],
        route=state.get("route"),
        file_id=state.get("file_id"),
        status=response["status"],
        cache=cache_result(response["cache_status"]),
        bytes_in=sizes["in"],
        bytes_out=sizes["out"],
        upload_size_bytes=state.get("upload_size_bytes"),
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        upstream_ms=state.get("upstream_ms"),
        user_agent=_client_value(headers.get(b"user-agent")),
    )


def _timestamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds, as `datetime.isoformat` gives, for a third of its cost."""
    second = int(now)
    return f"{_second_text(second)}.{int((now - second) * 1000):03d}Z"


@lru_cache(maxsize=2)
def _second_text(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def cache_result(cache_status: str) -> str:
    """The `cache` field of a record, from the response's `Cache-Status` header."""
    if "; hit" in cache_status:
        return "hit"
    for marker, result in (("fwd=stale", "stale"), ("fwd=bypass", "bypass"), ("fwd=uri-miss", "miss")):
        if marker in cache_status:
            return result
    return "miss" if "fwd=request" in cache_status else "none"


def _client_value(raw: bytes | None) -> str | None:
    """A client-chosen header value, bounded so a huge one cannot bloat every log line."""
    return None if raw is None else raw.decode("latin-1")[:_MAX_CLIENT_VALUE]


def log_access(record: RequestRecord) -> None:
    if not access_logger.isEnabledFor(logging.INFO):
        return
    handlers = access_logger.handlers
    if len(handlers) == 1 and isinstance(handlers[0], BatchedStdout) and not access_logger.propagate:
        # What `serve` sets up: the line goes straight into the batch, without the LogRecord that
        # logging would build and take apart again (about 5% of a cache hit).
        handlers[0].add(record.json_line())
        return
    # makeRecord, not info(): the caller's file and line mean nothing here and cost a stack walk.
    line = access_logger.makeRecord(access_logger.name, logging.INFO, "", 0, record.json_line(), (), None)
    access_logger.handle(line)


class BatchedStdout(logging.Handler):
    """Collects access lines and lets a thread write them to stdout every `interval_s`, many at once.

    A line per write, or a queue hand-off per line, costs the event loop more than the line itself.
    The thread writes to the file descriptor only when it can take the bytes (a pipe-sized piece at a
    time), so a stdout nobody drains never blocks it for good: lines wait, up to `max_pending` of
    them, then new ones are dropped and counted in `dropped`, and `stop` gives up after `drain_s`.
    """

    def __init__(
        self, fd: int, *, interval_s: float = 0.05, max_pending: int = 10_000, drain_s: float = 2.0
    ) -> None:
        super().__init__()
        self._fd = fd
        self._lines: deque[str] = deque()  # append and popleft are atomic: no lock, no line lost
        self._max_pending = max_pending
        self._interval_s = interval_s
        self._drain_s = drain_s
        self._unwritten = bytearray()
        self.dropped = 0  # counted on the event loop's thread only, until the writer has stopped
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._run, name="files-proxy-access-log", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record.getMessage())

    def add(self, line: str) -> None:
        if len(self._lines) >= self._max_pending:
            self.dropped += 1
            return
        self._lines.append(line)

    def stop(self) -> None:
        """Write what is left, for at most `drain_s`, and end the thread."""
        self._stopping.set()
        self._writer.join(self._drain_s + 1)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self._write(until=None)
        self._write(until=time.monotonic() + self._drain_s)
        if self._unwritten or self._lines:
            self.dropped += len(self._lines) + self._unwritten.count(b"\n")
            logging.getLogger(__name__).warning("stdout is not being read: access lines were dropped")

    def _write(self, until: float | None) -> None:
        """Write waiting lines while stdout takes them; stop early when it does not, or at `until`.

        A new batch is taken only once the last one is written, so while stdout stalls the lines
        wait in `_lines`, where `add` sees them and drops what is over the bound.
        """
        while True:
            if not self._unwritten:
                batch = [self._lines.popleft() for _ in range(len(self._lines))]
                if not batch:
                    return
                self._unwritten = bytearray(("\n".join(batch) + "\n").encode())
            wait_s = self._interval_s if until is None else until - time.monotonic()
            if wait_s <= 0:
                return
            _, writable, _ = select.select([], [self._fd], [], wait_s)
            if not writable:
                return
            # At most PIPE_BUF bytes: a write that size to a pipe with room never blocks.
            written = os.write(self._fd, self._unwritten[: select.PIPE_BUF])
            del self._unwritten[:written]  # cheap: a bytearray drops its head without copying the rest


def start_access_log() -> BatchedStdout:
    """Send access lines to stdout from a thread; stop the returned handler to flush at exit."""
    handler = BatchedStdout(sys.stdout.fileno())
    access_logger.addHandler(handler)
    access_logger.propagate = False
    return handler
