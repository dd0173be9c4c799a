"""Fixtures: the simulator and the proxy served by uvicorn on real sockets, and a real redis-server."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import trustme

from files_api_simulator import Simulator
from proxy.config import Settings
from tests.constants import ALL_SECRETS, ALPHA, BRAVO
from tests.support import (
    WATCH,
    RedisClusterNodes,
    RedisServer,
    Served,
    free_port,
    served_proxy,
    team_settings,
    team_simulator,
)
from tests.upstream_support import ServedTLS


class _WatchHandler(logging.Handler):
    """Collects what the proxy and the libraries under it log (the SDK and test clients are not it)."""

    _PROXY_SIDE = ("proxy", "files_proxy", "uvicorn", "starlette", "aiohttp", "httpx", "redis", "fakeredis")

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in self._PROXY_SIDE:
            WATCH.feed(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_output() -> Iterator[None]:
    """Every log record of the whole run (access lines, errors, tracebacks) and every subprocess's
    output fed to WATCH are searched for the test tenants' keys once the run is over."""
    handler = _WatchHandler(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.DEBUG)
    yield
    root.removeHandler(handler)
    root.setLevel(previous_level)
    assert WATCH.leaks(ALL_SECRETS) == [], "a key appeared in the proxy's output"


@pytest.fixture
def simulator() -> Simulator:
    return team_simulator()


@pytest.fixture
def simulator_url(simulator: Simulator) -> Iterator[str]:
    with Served(simulator.app) as served:
        yield served.url


@pytest.fixture
def make_settings(simulator_url: str) -> Callable[..., Settings]:
    """Settings for ALPHA and BRAVO in front of the simulator; keyword overrides per section."""

    def make(
        upstream_url: str = simulator_url,
        upstream: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
    ) -> Settings:
        return team_settings(
            upstream_url, upstream={"read_timeout_s": 5, **(upstream or {})}, limits=limits, cache=cache
        )

    return make


@pytest.fixture
def serve_proxy(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    """Start a proxy with `make_settings(**overrides)` (and an optional clock); returns its base URL."""
    started: list[Served] = []

    def start(clock: Callable[[], float] = time.time, **overrides: Any) -> str:
        served = served_proxy(make_settings(**overrides), clock=clock).__enter__()
        started.append(served)
        return served.url

    yield start
    for served in reversed(started):
        served.__exit__(None, None, None)


@pytest.fixture
def proxy_url(serve_proxy: Callable[..., str]) -> str:
    return serve_proxy()


@pytest.fixture
def alpha(proxy_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=proxy_url, api_key=ALPHA.proxy_key, max_retries=0) as client:
        yield client


@pytest.fixture
def bravo(proxy_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=proxy_url, api_key=BRAVO.proxy_key, max_retries=0) as client:
        yield client


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
def cache_url(request: pytest.FixtureRequest) -> str:
    """Each cache test runs against the embedded store, a real redis-server and a Redis Cluster."""
    if request.param == "memory":
        return "memory://"
    if request.param == "cluster":
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throwaway CA per module: the TLS and egress tests' upstream certificates."""
    return trustme.CA()


@pytest.fixture
def tls_upstream(simulator: Simulator, ca: trustme.CA, tmp_path: Path) -> Iterator[ServedTLS]:
    """The simulator over HTTPS, its certificate signed by `ca`."""
    with ServedTLS(simulator.app, ca, tmp_path) as served:
        yield served
