"""Build the proxy's ASGI app. Nothing starts at import; clients open and close with the lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.routing import Router
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.access import log_access
from proxy.cache import CachePolicy
from proxy.caching import ResponseCache
from proxy.config import ConfigError, Settings, sections_needing_restart
from proxy.control import ControlEndpoints
from proxy.edge import Edge
from proxy.handler import FilesHandler
from proxy.metrics import Metrics
from proxy.ownership import Ownership
from proxy.reconcile import run_upkeep
from proxy.store import Store, open_store
from proxy.ui import UsagePage
from proxy.ui_pages import StorageRow
from proxy.upstream import UpstreamClient
from proxy.usage import UsageCounter

logger = logging.getLogger(__name__)


class ProxyApp:
    """The proxy's ASGI app, plus `reload` for SIGHUP and `POST /admin/reload`."""

    def __init__(self, app: ASGIApp, reload: Callable[[], Awaitable[None]]) -> None:
        self._app = app
        self.reload = reload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    load_settings: Callable[[], Settings] | None = None,
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
    access_lines_dropped: Callable[[], int] = lambda: 0,
) -> ProxyApp:
    """The proxy app for these settings; `load_settings` re-reads them on reload; `store` replaces the
    configured one (tests, bench); `access_lines_dropped` reads the access log's
    count of lines it could not write, for metrics."""
    upstream = UpstreamClient(settings.upstream)
    cache_config = settings.cache
    store = store or open_store(
        cache_config.url,
        max_connections=cache_config.max_connections,
        timeout_s=cache_config.timeout_s,
        memory_max_bytes=cache_config.memory_max_bytes,
    )
    cache = ResponseCache(
        CachePolicy(cache_config),
        store,
        collapse_timeout_s=cache_config.collapse_timeout_s,
        local_ttl_s=cache_config.local_ttl_s,
        journal_path=cache_config.journal_path,
        clock=clock,
    )
    ownership = Ownership(store, settings)
    handler = FilesHandler(settings, store, upstream, cache, ownership)
    metrics = Metrics(
        cache_available=lambda: not store.breaker.is_open,
        access_lines_dropped=access_lines_dropped,
        storage=lambda: ownership.snapshot,
    )
    store.on_call = lambda outcome: metrics.cache_operations.labels(outcome).inc()
    usage = UsageCounter(store, retention_days=settings.usage.retention_days)

    current = settings

    async def reload() -> None:
        """Re-read config and secrets; on any problem raise ConfigError and keep the running ones.

        Tenants (keys, rate limits), limits and the admin key change at once; a request in flight
        keeps the tenant it started with. Other sections need a restart.
        """
        nonlocal current
        if load_settings is None:
            raise ConfigError("this proxy was not started from a config file")
        new = await asyncio.to_thread(load_settings)
        handler.apply(new)
        for section in sections_needing_restart(current, new):
            logger.warning("config [%s] changed: it takes effect at the next restart", section)
        current = new
        logger.info("config reloaded: %d tenants", len(new.tenants))

    async def storage_rows() -> list[StorageRow]:
        return [
            StorageRow(row.tenant, row.files, row.bytes, row.quota_bytes, row.max_files)
            for row in await ownership.storage()
        ]

    ui = UsagePage(lambda: current, store, usage, handler, storage=storage_rows, clock=clock)

    @asynccontextmanager
    async def lifespan(app: object) -> AsyncIterator[None]:
        def flushed(ok: bool) -> None:
            metrics.usage_flushes.labels("ok" if ok else "error").inc()

        await upstream.open()
        # Connect (and, for a Cluster, learn its slots) before the first request, not under load.
        if not await store.ping():
            logger.warning("cache store unavailable at startup; serving without cache until it answers")
        await store.start()
        await cache.start()
        flusher = asyncio.create_task(usage.run(settings.usage.flush_interval_s, flushed))
        await ownership.refresh()
        upkeep = asyncio.create_task(run_upkeep(ownership, store, upstream, lambda: current))
        fairness = asyncio.create_task(upstream.hold_to_fair_shares())
        try:
            yield
        finally:
            for task in (flusher, upkeep, fairness):
                task.cancel()
            await asyncio.gather(flusher, upkeep, fairness, return_exceptions=True)
            await upstream.aclose()
            await cache.aclose()
            await store.aclose()

    control = ControlEndpoints(lambda: current, reload, store, metrics, usage, ownership)
    edge = Edge(
        handler.handle,
        [*control.routes(), *ui.routes()],
        Router(lifespan=lifespan),
        [log_access, metrics.observe, usage.add],
        on_start=metrics.request_started,
        on_end=metrics.request_ended,
        charge=upstream.fair_share.charge,
    )
    return ProxyApp(edge, reload)
