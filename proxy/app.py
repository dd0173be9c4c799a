"""Build the proxy's ASGI app. Nothing starts at import; clients open and close with the lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Router
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.access import log_access
from proxy.auth import check_admin
from proxy.cache import CachePolicy
from proxy.caching import ResponseCache
from proxy.config import ConfigError, Settings, sections_needing_restart
from proxy.edge import ControlRoute, Edge
from proxy.errors import InvalidRequestError
from proxy.handler import FilesHandler
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.ownership import Ownership
from proxy.reconcile import run_upkeep
from proxy.store import Store, open_store
from proxy.ui import UsagePage
from proxy.ui_pages import StorageRow
from proxy.upstream import UpstreamClient
from proxy.usage import UsageCounter, read_usage, usage_report

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

    async def readyz(request: Request) -> Response:
        """Ready once started; the cache state is reported, never a reason to be unready."""
        cache_state = "up" if await store.ping() else "unavailable"
        return JSONResponse({"status": "ready", "cache": cache_state})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

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

    async def admin_reload(request: Request) -> Response:
        check_admin(request.headers, current.admin.key_sha256)
        try:
            await reload()
        except ConfigError as exc:
            logger.error("config reload rejected, the running config stays: %s", exc)
            raise InvalidRequestError(f"Config rejected; the running config stays: {exc}") from None
        return JSONResponse({"reloaded": True, "tenants": len(current.tenants)})

    async def admin_usage(request: Request) -> Response:
        """Usage totals from the store, this replica's unwritten counts included."""
        check_admin(request.headers, current.admin.key_sha256)
        today = datetime.now(UTC).date()
        since = _date_param(request, "since", today.replace(day=1))
        until = _date_param(request, "until", today)
        await usage.flush()
        workspace = request.query_params.get("workspace")
        rows = await read_usage(store, since, until, workspace)
        storage = [row for row in await ownership.storage() if workspace in (None, row.workspace)]
        return JSONResponse(usage_report(since, until, rows, storage))

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
        try:
            yield
        finally:
            flusher.cancel()
            upkeep.cancel()
            await asyncio.gather(flusher, upkeep, return_exceptions=True)
            await upstream.aclose()
            await cache.aclose()
            await store.aclose()

    control = [
        ControlRoute("/healthz", {"GET": _healthz}, recorded=False),
        ControlRoute("/readyz", {"GET": readyz}, recorded=False),
        ControlRoute("/metrics", {"GET": metrics_endpoint}, recorded=False),
        ControlRoute("/admin/usage", {"GET": admin_usage}),
        ControlRoute("/admin/reload", {"POST": admin_reload}),
        *ui.routes(),
    ]
    edge = Edge(
        handler.handle,
        control,
        Router(lifespan=lifespan),
        [log_access, metrics.observe, usage.add],
        on_start=metrics.request_started,
        on_end=metrics.request_ended,
    )
    return ProxyApp(edge, reload)


def _date_param(request: Request, name: str, default: date) -> date:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"{name}: expected a date as YYYY-MM-DD.") from None


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})
