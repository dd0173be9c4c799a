"""Fixtures: the simulator and the proxy served by uvicorn on real sockets, and two test tenants."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import pytest
import uvicorn
from pydantic import HttpUrl
from starlette.types import ASGIApp

from proxy.app import create_app
from proxy.config import LimitsConfig, Settings, Tenant, UpstreamConfig, hash_key
from proxy.simulator import Simulator


@dataclass(frozen=True)
class TeamKeys:
    name: str
    workspace: str
    proxy_key: str
    upstream_key: str
    upstream_workspace: str

    def tenant(self) -> Tenant:
        return Tenant(
            name=self.name,
            workspace=self.workspace,
            client_key_hashes=frozenset({hash_key(self.proxy_key)}),
            api_key=self.upstream_key,
        )


ALPHA = TeamKeys("alpha", "alpha-prod", "fp-test-alpha-7c1d0e", "sk-ant-test-alpha-52aa", "wrkspc_alpha")
BRAVO = TeamKeys("bravo", "bravo-prod", "fp-test-bravo-91be44", "sk-ant-test-bravo-e07f", "wrkspc_bravo")
ALL_SECRETS = (ALPHA.proxy_key, ALPHA.upstream_key, BRAVO.proxy_key, BRAVO.upstream_key)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Served:
    """An ASGI app under a real uvicorn server, in a thread of this process."""

    def __init__(self, app: ASGIApp) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_config=None, log_level="warning", ws="none", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._listener]}, daemon=True)

    def __enter__(self) -> Served:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._listener.close()


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(
        keys={ALPHA.upstream_key: ALPHA.upstream_workspace, BRAVO.upstream_key: BRAVO.upstream_workspace}
    )


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
    ) -> Settings:
        return Settings(
            tenants=(ALPHA.tenant(), BRAVO.tenant()),
            upstream=UpstreamConfig(base_url=HttpUrl(upstream_url), **{"read_timeout_s": 5, **(upstream or {})}),
            limits=LimitsConfig(**(limits or {})),
        )

    return make


@pytest.fixture
def serve_proxy(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    """Start a proxy with `make_settings(**overrides)`; returns its base URL."""
    started: list[Served] = []

    def start(**overrides: Any) -> str:
        served = Served(create_app(make_settings(**overrides))).__enter__()
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


def raw_http(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (no client-side path normalisation) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + body)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    header_block, _, payload = received.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload
