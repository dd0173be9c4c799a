"""The access log: one JSON line per request, from its `Exchange`, written to stdout in batches by a
thread, so the event loop never blocks on the terminal or a log pipe and pays no thread hand-off per
line. No header value but the user agent and the client's own request id is ever logged, so no key
or token can reach a log line.
"""

from __future__ import annotations

import json
import logging
import os
import select
import stat
import sys
import threading
import time
from collections import deque
from datetime import UTC, datetime
from functools import lru_cache

from proxy.exchange import Exchange

access_logger = logging.getLogger("files_proxy.access")
_WHOLE = 1 << 20
# One encoder for every line (json.dumps with options makes a new one per call).
_JSON = json.JSONEncoder(separators=(",", ":"))


def access_line(exchange: Exchange) -> str:
    """The exchange as one JSON line; its fields are the README's access-log contract."""
    tenant = exchange.tenant
    operation = exchange.operation
    return _JSON.encode(
        {
            "ts": _timestamp(exchange.started_at),
            "request_id": exchange.request_id,
            "upstream_request_id": exchange.upstream_request_id,
            "client_request_id": exchange.client_request_id,
            "tenant": None if tenant is None else tenant.name,
            "workspace": None if tenant is None else tenant.workspace,
            "method": exchange.method,
            "route": None if operation is None else operation.template,
            "file_id": exchange.file_id,
            "status": exchange.status,
            "cache": exchange.cache_result.value,
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "upload_size_bytes": exchange.upload_size_bytes,
            "duration_ms": exchange.duration_ms,
            "upstream_ms": exchange.upstream_ms,
            "user_agent": exchange.user_agent,
        }
    )


def log_access(exchange: Exchange) -> None:
    if access_logger.isEnabledFor(logging.INFO):
        access_logger.info("%s", access_line(exchange))


def _timestamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds."""
    second = int(now)
    return f"{_second_text(second)}.{int((now - second) * 1000):03d}Z"


@lru_cache(maxsize=2)
def _second_text(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


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
        # A write to a pipe or socket larger than PIPE_BUF may block even when it has room; a write to
        # a regular file never waits for a reader, so it goes whole.
        self._write_bytes = _WHOLE if stat.S_ISREG(os.fstat(fd).st_mode) else select.PIPE_BUF
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
            written = os.write(self._fd, self._unwritten[: self._write_bytes])
            del self._unwritten[:written]  # cheap: a bytearray drops its head without copying the rest


def start_access_log() -> BatchedStdout:
    """Send access lines to stdout from a thread; stop the returned handler to flush at exit."""
    handler = BatchedStdout(sys.stdout.fileno())
    access_logger.addHandler(handler)
    access_logger.propagate = False
    return handler
