"""Owner records against the upstream's own listing: drop the records of files that are gone
(deleted at Anthropic directly, or expired), count the unowned files, and adopt them.

Each distinct Anthropic key (one upstream workspace) is listed in full, newest first, in GA pages of
1000. A record written after the listing began is never dropped for being missing from it (the
upload may have come after the page that would hold it): the cut-off is the store's own clock.
The proxy runs `reconcile` every `ownership.reconcile_interval_s`, on one replica per interval
(a lock in the store with that TTL); `files-proxy reconcile` runs it on demand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from proxy import ownership_lua as lua
from proxy.config import Settings, Tenant
from proxy.errors import ProxyError, UpstreamUnavailableError
from proxy.headers import on_behalf_of
from proxy.ownership import SCOPES_KEY, Keys, Ownership, expires_epoch, owner_of
from proxy.store import CacheUnavailableError, Store
from proxy.upstream import UpstreamClient
from proxy.writes import HashSet

logger = logging.getLogger(__name__)

_GA_VERSION = "2023-06-01"
_PAGE_LIMIT = 1000
_MAX_ANSWER = 32 * 1024 * 1024
_LOCK_KEY = "fp:own:reconcile-lock"


@dataclass(frozen=True, slots=True)
class LiveFile:
    file_id: str
    size: int
    expires_at: int  # epoch s, 0: none


@dataclass
class WorkspaceReport:
    """One upstream workspace (one Anthropic key) after reconciliation."""

    workspaces: str  # the configured workspace names of the tenants on the key
    tenants: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> files, bytes
    unowned: tuple[int, int] = (0, 0)
    dropped: list[tuple[str, str, int]] = field(default_factory=list)  # file id, owner, bytes


async def list_workspace(upstream: UpstreamClient, tenant: Tenant) -> list[LiveFile]:
    """Every file the tenant's Anthropic key can see, in GA pages, straight from upstream."""
    files: list[LiveFile] = []
    page: str | None = None
    while True:
        query = {"limit": str(_PAGE_LIMIT), **({"page": page} if page else {})}
        body = await _get(upstream, tenant, "/v1/files", urlencode(query).encode())
        data, page = body.get("data"), body.get("next_page")
        if not isinstance(data, list):
            raise UpstreamUnavailableError("The Anthropic API sent a file list the proxy could not read.")
        files += [_live(item) for item in data]
        if not isinstance(page, str) or not page:
            return files


async def reconcile(
    store: Store, upstream: UpstreamClient, tenants: Sequence[Tenant]
) -> list[WorkspaceReport]:
    """Reconcile every distinct upstream workspace among these tenants."""
    reports = []
    for scope, on_key in _by_key(tenants).items():
        reports.append(await _reconcile_key(store, upstream, scope, on_key))
    return reports


async def adopt(
    store: Store, upstream: UpstreamClient, tenant: Tenant, file_ids: Sequence[str] | None
) -> dict[str, str | None]:
    """Make `tenant` the owner of these files (None: every unowned file of its key); returns each
    file's owner afterwards (None: no such file upstream)."""
    if file_ids is None:
        files = [f for f in await list_workspace(upstream, tenant) if not _expired(f, time.time())]
    else:
        files = []
        for file_id in file_ids:
            found = await _get(upstream, tenant, f"/v1/files/{file_id}", b"", missing_ok=True)
            if found:
                files.append(_live(found))
    keys = Keys(tenant.cache_scope)
    args: list[int | str] = [tenant.name, int(await store.script(lua.TIME)([], []))]
    for f in files:
        args += [f.file_id, f.size, f.expires_at]
    owners = await store.script(lua.ADOPT)(keys.records, args) if files else []
    await store.write([HashSet(SCOPES_KEY, tenant.cache_scope, b"1")])
    result: dict[str, str | None] = dict.fromkeys(file_ids or (), None)
    result |= {f.file_id: owner.decode() for f, owner in zip(files, owners, strict=True)}
    return result


async def run_upkeep(
    ownership: Ownership, store: Store, upstream: UpstreamClient, settings: Callable[[], Settings]
) -> None:
    """Until cancelled: refresh the storage figures the metrics read, and reconcile every
    `reconcile_interval_s` on whichever replica takes the lock first."""
    take_lock = store.script("return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0")
    last_reconcile = time.monotonic()
    while True:
        config = settings().ownership
        await asyncio.sleep(config.storage_refresh_s)
        await ownership.refresh()
        _end_if_cancelled()
        interval = config.reconcile_interval_s
        if not interval or time.monotonic() - last_reconcile < interval:
            continue
        last_reconcile = time.monotonic()
        try:
            # Held for the whole interval: one reconciliation per interval across the replicas.
            if not await take_lock([_LOCK_KEY], ["1", interval * 1000]):
                continue
            for report in await reconcile(store, upstream, settings().tenants):
                logger.info(
                    "reconciled workspace %s: %d records dropped, %d unowned files",
                    report.workspaces,
                    len(report.dropped),
                    report.unowned[0],
                )
        except (CacheUnavailableError, ProxyError) as exc:
            logger.warning("reconciliation skipped: %s", type(exc).__name__)
        _end_if_cancelled()


def _end_if_cancelled() -> None:
    """redis-py shields a command from cancellation (redis/redis-py#2666): a cancel absorbed during a
    store call would otherwise keep this loop, and shutdown, going."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _reconcile_key(
    store: Store, upstream: UpstreamClient, scope: str, tenants: list[Tenant]
) -> WorkspaceReport:
    keys = Keys(scope)
    started_ms = int(await store.script(lua.TIME)([], []))
    listed = await list_workspace(upstream, tenants[0])
    now_s = started_ms // 1000
    live = {f.file_id: f for f in listed if not _expired(f, now_s)}
    listed_ids = {f.file_id for f in listed}
    recorded = [file_id.decode() for file_id in await store.hgetall(keys.own)]
    missing = [file_id for file_id in recorded if file_id not in listed_ids]
    expired = [file_id for file_id in recorded if file_id in listed_ids and file_id not in live]
    drop = store.script(lua.FORGET)
    dropped = []
    for before_ms, ids in ((started_ms, missing), (0, expired)):
        if ids:
            flat = await drop(keys.records, [before_ms, *ids])
            dropped += [
                (flat[i].decode(), flat[i + 1].decode(), int(flat[i + 2])) for i in range(0, len(flat), 3)
            ]
    await store.script(lua.RECOUNT)([keys.own, keys.storage], [])
    await store.write([HashSet(SCOPES_KEY, scope, b"1")])
    report = WorkspaceReport(",".join(sorted({t.workspace for t in tenants})), dropped=dropped)
    report.tenants = {t.name: (0, 0) for t in tenants}
    owners = await store.hgetall(keys.own)
    for record in owners.values():
        owner, size = record.decode().split("|")[:2]
        files, held = report.tenants.get(owner, (0, 0))
        report.tenants[owner] = (files + 1, held + int(size))
    unowned = [f for f in live.values() if owner_of(owners.get(f.file_id.encode())) is None]
    report.unowned = (len(unowned), sum(f.size for f in unowned))
    return report


def _by_key(tenants: Sequence[Tenant]) -> dict[str, list[Tenant]]:
    groups: dict[str, list[Tenant]] = {}
    for tenant in tenants:
        groups.setdefault(tenant.cache_scope, []).append(tenant)
    return groups


def _expired(file: LiveFile, now_s: float) -> bool:
    return 0 < file.expires_at <= now_s


def _live(item: Any) -> LiveFile:
    try:
        file_id, size = item["id"], item["size_bytes"]
    except (KeyError, TypeError):
        raise UpstreamUnavailableError("The Anthropic API sent a file object without id or size.") from None
    if not isinstance(file_id, str) or not isinstance(size, int):
        raise UpstreamUnavailableError("The Anthropic API sent a file object without id or size.")
    return LiveFile(file_id, size, expires_epoch(item.get("expires_at")))


async def _get(
    upstream: UpstreamClient, tenant: Tenant, path: str, query: bytes, *, missing_ok: bool = False
) -> dict[str, Any]:
    """One GA GET straight to upstream, read whole as a JSON object ({} for a 404 if `missing_ok`)."""
    headers = on_behalf_of(tenant.api_key, _GA_VERSION)
    reply = await (await upstream.send("GET", path, query, headers, tenant=tenant)).read_whole(_MAX_ANSWER)
    if reply.status == 404 and missing_ok:
        return {}
    if reply.status != 200:
        raise UpstreamUnavailableError(f"The Anthropic API answered {reply.status} to GET {path}.")
    try:
        value = json.loads(reply.body)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UpstreamUnavailableError("The Anthropic API sent an answer the proxy could not read.")
    return value
