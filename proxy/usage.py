"""Usage per workspace and tenant per UTC day, for chargeback and capacity.

Requests only add to counters in process; a background task writes them to the store every
`usage.flush_interval_s` in one pipeline (HINCRBY), so no request waits on a store round trip. A
failed write keeps its counts for the next one, and every replica adds into the same hashes, so
the totals are the sum across replicas. One hash per day: `fp:usage:{YYYY-MM-DD}`, fields
`<workspace>|<tenant>|<counter>` (names cannot contain `|`).

The day hashes have no TTL, so Redis under `volatile-lru` (and the embedded store's byte cap) never
evicts them for cache traffic: they are trimmed instead. At the first flush and at each new UTC day,
the flush also deletes the days just past `usage.retention_days`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from proxy.cache import CacheResult
from proxy.exchange import Exchange
from proxy.ownership import TeamStorage
from proxy.routes import Operation
from proxy.store import CacheUnavailableError, Store
from proxy.writes import Delete, HashIncrement, Write

logger = logging.getLogger(__name__)

COUNTERS = (
    "requests",
    "uploads",
    "upload_bytes",
    "downloads",
    "download_bytes",
    "deletes",
    "cache_hits",
    "errors",
)
# Days past retention deleted at each trim: a proxy stopped for longer leaves older days behind.
_TRIM_WINDOW_DAYS = 31


@dataclass
class UsageRow:
    workspace: str
    tenant: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))


def usage_report(
    since: date, until: date, rows: list[UsageRow], storage: Sequence[TeamStorage] = ()
) -> dict[str, Any]:
    """The JSON shape shared by `GET /admin/usage` and `files-proxy usage --json`; `storage` is what
    each team holds now (files and bytes against its quotas, null when unset)."""
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "counters": list(COUNTERS),
        "rows": [{"workspace": r.workspace, "tenant": r.tenant, **r.counts} for r in rows],
        "storage": [asdict(row) for row in storage],
    }


def counts_for(exchange: Exchange) -> dict[str, int]:
    """What one request adds to its tenant's counters, by its operation."""
    counts = {
        "requests": 1,
        "errors": int(exchange.status >= 400),
        "cache_hits": int(exchange.cache_result is CacheResult.HIT),
    }
    if exchange.status != 200:
        return counts
    if exchange.operation is Operation.UPLOAD:
        counts |= {"uploads": 1, "upload_bytes": exchange.upload_size_bytes or 0}
    elif exchange.operation is Operation.DOWNLOAD:
        counts |= {"downloads": 1, "download_bytes": exchange.bytes_out}
    elif exchange.operation is Operation.DELETE:
        counts["deletes"] = 1
    return counts


def _day_key(iso_day: str) -> str:
    return f"fp:usage:{{{iso_day}}}"


@functools.lru_cache(maxsize=2)
def _day_key_of(epoch_day: int) -> str:
    """The day hash of a UTC day counted from the epoch (the same one or two days, request after
    request)."""
    return _day_key((date(1970, 1, 1) + timedelta(days=epoch_day)).isoformat())


class UsageCounter:
    def __init__(
        self, store: Store, retention_days: int = 400, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._retention_days = retention_days
        self._clock = clock
        self._pending: Counter[tuple[str, str]] = Counter()  # (day key, field) -> amount
        self._trimmed_on: date | None = None

    def add(self, exchange: Exchange) -> None:
        """Count a finished request (unauthenticated ones have no tenant and are not counted)."""
        tenant = exchange.tenant
        if tenant is None:
            return
        key = _day_key_of(int(exchange.started_at // 86400))
        prefix = f"{tenant.workspace}|{tenant.name}|"
        for counter, amount in counts_for(exchange).items():
            if amount:
                self._pending[(key, prefix + counter)] += amount

    async def flush(self) -> bool:
        """Write what was counted since the last flush, and trim old days once a day; on failure
        keep the counts for the next one."""
        today = datetime.fromtimestamp(self._clock(), UTC).date()
        trim = [] if today == self._trimmed_on else self._trim(today)
        if not self._pending and not trim:
            return True
        taken, self._pending = self._pending, Counter()
        writes: list[Write] = [*trim]
        writes += [HashIncrement(key, name, amount) for (key, name), amount in taken.items()]
        try:
            await self._store.write(writes)
        except CacheUnavailableError:
            self._pending.update(taken)
            return False
        self._trimmed_on = today
        return True

    def _trim(self, today: date) -> list[Write]:
        """Delete the days just past retention (today is the first of `retention_days` days kept)."""
        newest = today - timedelta(days=self._retention_days)
        oldest = newest - timedelta(days=_TRIM_WINDOW_DAYS - 1)
        return [Delete(_day_key(day.isoformat())) for day in _days(oldest, newest)]

    async def run(self, interval_s: float, on_flush: Callable[[bool], None]) -> None:
        """Flush every `interval_s` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                on_flush(await self.flush())
                _end_if_cancelled()
        finally:
            if not await self.flush():
                logger.error("usage counters could not be written at shutdown: %s", dict(self._pending))


def _end_if_cancelled() -> None:
    """redis-py shields a command from cancellation (redis/redis-py#2666): a cancel that arrives
    during a flush is absorbed there, and without this the loop, and shutdown, would go on forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def read_usage(store: Store, since: date, until: date, workspace: str | None = None) -> list[UsageRow]:
    """Totals per workspace and tenant over the days from `since` to `until`, both included."""
    rows: dict[tuple[str, str], UsageRow] = {}
    for day in _days(since, until):
        for raw_field, raw_amount in (await store.hgetall(_day_key(day.isoformat()))).items():
            row_workspace, tenant, counter = raw_field.decode().split("|")
            if workspace is not None and row_workspace != workspace:
                continue
            row = rows.setdefault((row_workspace, tenant), UsageRow(row_workspace, tenant))
            row.counts[counter] = row.counts.get(counter, 0) + int(raw_amount)
    return [rows[key] for key in sorted(rows)]


async def read_usage_by_day(store: Store, since: date, until: date) -> dict[date, list[UsageRow]]:
    """Each day's rows per workspace and tenant from `since` to `until`, both included (the usage page)."""
    return {day: await read_usage(store, day, day) for day in _days(since, until)}


def _days(since: date, until: date) -> Iterator[date]:
    day = since
    while day <= until:
        yield day
        day += timedelta(days=1)
