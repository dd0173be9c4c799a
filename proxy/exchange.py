"""One request's record, typed: made at the edge (`edge.py`), filled by the Files handler, read by the
access log, metrics and usage. The cache's part is its `CacheOutcome` (`cache.py`), rendered as
`Cache-Status` (RFC 9211) at the edge and never parsed back.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.cache import CacheOutcome, CacheResult
from proxy.config import Tenant
from proxy.routes import Operation


@dataclass(slots=True)
class Exchange:
    """What one request did. Not frozen: the edge and the handler fill it in as the request goes."""

    request_id: str
    method: str
    # Wall-clock and monotonic start: the access line's `ts`, and the duration.
    started_at: float
    started: float
    client_request_id: str | None = None
    user_agent: str | None = None
    tenant: Tenant | None = None
    operation: Operation | None = None
    file_id: str | None = None
    cache: CacheOutcome | None = None
    upstream_ms: float | None = None
    # The answer's own `request-id`, when it is not ours (the upstream's, or replayed from the cache).
    upstream_request_id: str | None = None
    status: int = 500
    bytes_in: int = 0
    bytes_out: int = 0
    # An upload answered 200: the file's size as the answer gives it (bytes_in counts the multipart body).
    upload_size_bytes: int | None = None
    duration_ms: float = 0.0

    @property
    def cache_result(self) -> CacheResult:
        return CacheResult.NONE if self.cache is None else self.cache.result
