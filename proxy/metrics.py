"""Prometheus metrics, one registry per app (no global state), with bounded labels.

Workspace and tenant come from config, route from the route table, method and status are
collapsed to a few values: nothing a client sends can create a new time series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from proxy.exchange import Exchange
from proxy.ownership import TeamStorage

_METHODS = frozenset({"GET", "POST", "DELETE"})
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(
        self,
        cache_available: Callable[[], bool],
        access_lines_dropped: Callable[[], int] = lambda: 0,
        storage: Callable[[], Sequence[TeamStorage]] = list,
    ) -> None:
        """`storage` returns the last storage figures read (refreshed in the background, so a scrape
        does no store work)."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "files_proxy_requests",
            "Requests answered, by workspace, tenant, route template, method, status class and cache result.",
            ["workspace", "tenant", "route", "method", "status_class", "cache"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "files_proxy_request_duration_seconds",
            "Time from request start to the last response byte.",
            ["route", "cache"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "files_proxy_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "files_proxy_bytes_in", "Request body bytes received.", ["workspace"], registry=self.registry
        )
        self.bytes_out = Counter(
            "files_proxy_bytes_out", "Response body bytes sent.", ["workspace"], registry=self.registry
        )
        # Counted here and read at scrape time.
        self._in_flight = 0
        in_flight = Gauge(
            "files_proxy_in_flight_requests", "Requests being answered.", registry=self.registry
        )
        in_flight.set_function(lambda: self._in_flight)
        self.cache_operations = Counter(
            "files_proxy_cache_operations",
            "Calls to the cache store, by outcome (ok, error, skipped while the breaker is open).",
            ["outcome"],
            registry=self.registry,
        )
        available = Gauge(
            "files_proxy_cache_available",
            "1 while the cache store is in use, 0 while it is skipped.",
            registry=self.registry,
        )
        available.set_function(lambda: 1.0 if cache_available() else 0.0)
        self.registry.register(
            _CounterReadAtScrape(
                "files_proxy_access_lines_dropped",
                "Access lines dropped because stdout was not being read fast enough.",
                access_lines_dropped,
            )
        )
        self.registry.register(_StorageGauges(storage))
        self.usage_flushes = Counter(
            "files_proxy_usage_flushes",
            "Writes of usage counters to the store, by outcome (a failed one is retried).",
            ["outcome"],
            registry=self.registry,
        )

    def request_started(self) -> None:
        self._in_flight += 1

    def request_ended(self) -> None:
        self._in_flight -= 1

    def observe(self, exchange: Exchange) -> None:
        tenant = exchange.tenant
        workspace, name = ("none", "none") if tenant is None else (tenant.workspace, tenant.name)
        route = "other" if exchange.operation is None else exchange.operation.template
        method = exchange.method if exchange.method in _METHODS else "other"
        status_class = f"{exchange.status // 100}xx"
        series = self._series(workspace, name, route, method, status_class, exchange.cache_result.value)
        requests, request_seconds, upstream_seconds, bytes_in, bytes_out = series
        requests.inc()
        request_seconds.observe(exchange.duration_ms / 1000)
        if exchange.upstream_ms is not None:
            upstream_seconds.observe(exchange.upstream_ms / 1000)
        if exchange.bytes_in:
            bytes_in.inc(exchange.bytes_in)
        bytes_out.inc(exchange.bytes_out)

    @cache  # noqa: B019 - one per app, like the registry; the label sets are bounded (see above)
    def _series(
        self, workspace: str, tenant: str, route: str, method: str, status_class: str, cache_result: str
    ) -> tuple[Any, ...]:
        """The children one request updates, kept as prometheus-client suggests, not looked up again."""
        return (
            self.requests.labels(workspace, tenant, route, method, status_class, cache_result),
            self.request_seconds.labels(route, cache_result),
            self.upstream_seconds.labels(route),
            self.bytes_in.labels(workspace),
            self.bytes_out.labels(workspace),
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CounterReadAtScrape(Collector):
    """A counter kept elsewhere (here: by the access log's writer) and read when scraped."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name = name
        self._documentation = documentation
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class _StorageGauges(Collector):
    """Files and bytes each team holds, by workspace and tenant (both from config)."""

    def __init__(self, read: Callable[[], Sequence[TeamStorage]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        labels = ["workspace", "tenant"]
        files = GaugeMetricFamily("files_proxy_storage_files", "Live files a team holds.", labels=labels)
        held = GaugeMetricFamily(
            "files_proxy_storage_bytes", "Bytes of live files a team holds.", labels=labels
        )
        for row in self._read():
            files.add_metric([row.workspace, row.tenant], row.files)
            held.add_metric([row.workspace, row.tenant], row.bytes)
        yield files
        yield held
