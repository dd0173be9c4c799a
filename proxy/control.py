"""The proxy's own endpoints besides the Files API: health, readiness, metrics, and the admin key's
usage report and config reload. The usage page's are in `ui.py`; `edge.py` routes to both."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.auth import check_admin
from proxy.config import ConfigError, Settings
from proxy.edge import ControlRoute
from proxy.errors import InvalidRequestError
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.ownership import Ownership
from proxy.store import Store
from proxy.usage import UsageCounter, read_usage, usage_report

logger = logging.getLogger(__name__)


class ControlEndpoints:
    def __init__(
        self,
        settings: Callable[[], Settings],
        reload: Callable[[], Awaitable[None]],
        store: Store,
        metrics: Metrics,
        usage: UsageCounter,
        ownership: Ownership,
    ) -> None:
        """`settings` returns the running settings (they change on reload)."""
        self._settings = settings
        self._reload = reload
        self._store = store
        self._metrics = metrics
        self._usage = usage
        self._ownership = ownership

    def routes(self) -> list[ControlRoute]:
        """Probes and scrapes get no access line; the admin's requests do."""
        return [
            ControlRoute("/healthz", {"GET": _healthz}, recorded=False),
            ControlRoute("/readyz", {"GET": self._readyz}, recorded=False),
            ControlRoute("/metrics", {"GET": self._metrics_page}, recorded=False),
            ControlRoute("/admin/usage", {"GET": self._admin_usage}),
            ControlRoute("/admin/reload", {"POST": self._admin_reload}),
        ]

    async def _readyz(self, request: Request) -> Response:
        """Ready once started; the cache state is reported, never a reason to be unready."""
        cache_state = "up" if await self._store.ping() else "unavailable"
        return JSONResponse({"status": "ready", "cache": cache_state})

    async def _metrics_page(self, request: Request) -> Response:
        return Response(self._metrics.exposition(), media_type=CONTENT_TYPE)

    async def _admin_reload(self, request: Request) -> Response:
        check_admin(request.headers, self._settings().admin.key_sha256)
        try:
            await self._reload()
        except ConfigError as exc:
            logger.error("config reload rejected, the running config stays: %s", exc)
            raise InvalidRequestError(f"Config rejected; the running config stays: {exc}") from None
        return JSONResponse({"reloaded": True, "tenants": len(self._settings().tenants)})

    async def _admin_usage(self, request: Request) -> Response:
        """Usage totals from the store, this replica's unwritten counts included."""
        check_admin(request.headers, self._settings().admin.key_sha256)
        today = datetime.now(UTC).date()
        since = _date_param(request, "since", today.replace(day=1))
        until = _date_param(request, "until", today)
        await self._usage.flush()
        workspace = request.query_params.get("workspace")
        rows = await read_usage(self._store, since, until, workspace)
        storage = [row for row in await self._ownership.storage() if workspace in (None, row.workspace)]
        return JSONResponse(usage_report(since, until, rows, storage))


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def _date_param(request: Request, name: str, default: date) -> date:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"{name}: expected a date as YYYY-MM-DD.") from None
