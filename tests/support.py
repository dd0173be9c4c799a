"""Test helpers shared by several modules: the proxy in this process (`team_settings`, `served_proxy`,
`SharedProxy`) and as a subprocess (`ProxyProcess`), other servers on real sockets, raw HTTP, a clock.
The constants they share (tenants, keys, headers) are in tests/constants.py."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import uvicorn
from pydantic import HttpUrl
from starlette.types import ASGIApp, Receive, Scope, Send

from files_api_simulator import Simulator
from proxy.app import create_app
from proxy.config import CacheConfig, LimitsConfig, ServerConfig, Settings, Tenant, UpstreamConfig, hash_key
from proxy.server import bind_listener, server_config
from proxy.store import CacheUnavailableError, RedisStore
from proxy.writes import Write
from tests.constants import ALPHA, BRAVO

FILES_PROXY = str(Path(sys.executable).parent / "files-proxy")


def config_toml(upstream_url: str, sections: str = "") -> str:
    """A config file for ALPHA and BRAVO (keys from KEY_ALPHA and KEY_BRAVO), plus extra sections."""
    tenants = "".join(
        f'[[tenants]]\nname = "{team.name}"\nworkspace = "{team.workspace}"\n'
        f'api_key_env = "KEY_{team.name.upper()}"\nclient_key_sha256 = ["{hash_key(team.proxy_key)}"]\n\n'
        for team in (ALPHA, BRAVO)
    )
    return f'[upstream]\nbase_url = "{upstream_url}"\n\n{sections}\n{tenants}'


def team_environment() -> dict[str, str]:
    """The variables `config_toml` names, for a `files-proxy serve` subprocess."""
    return {"KEY_ALPHA": ALPHA.upstream_key, "KEY_BRAVO": BRAVO.upstream_key}


def wait_for(condition: Callable[[], bool], seconds: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met in time"
        time.sleep(0.05)


def wait_until_up(url: str) -> None:
    """Until a proxy started in another process answers /healthz."""

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, seconds=15, what=f"{url}/healthz")


class ProxyProcess:
    """The tests' one way to run `files-proxy serve` in its own process: with `config`, on a free port,
    its output written to `output` (and fed to WATCH when it stops). `with` starts it and waits until
    it answers /healthz; leaving stops it, as `stop()` does."""

    def __init__(self, config: Path, output: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.output = output
        self._env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ProxyProcess:
        command = [FILES_PROXY, "serve", "--config", str(self.config), "--port", str(self.port)]
        with self.output.open("w") as sink:
            self._process = subprocess.Popen(command, env=self._env, stdout=sink, stderr=sink)
        try:
            wait_until_up(self.url)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM unless it has ended already; its exit code."""
        assert self._process is not None
        if self._process.poll() is None:
            self._process.terminate()
        code = self._process.wait(timeout=30)
        WATCH.feed(self.output.read_text())
        return code

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Served:
    """An ASGI app under the proxy's own server (`proxy.server`), in a thread of this process."""

    def __init__(self, app: ASGIApp, bounds: ServerConfig | None = None, log_level: str = "warning") -> None:
        self._listener = bind_listener("127.0.0.1", 0)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(app, log_level, bounds or ServerConfig()))
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._listener]}, daemon=True
        )

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


def team_settings(
    upstream_url: str,
    *,
    tenants: tuple[Tenant, ...] = (ALPHA.tenant(), BRAVO.tenant()),
    upstream: Mapping[str, Any] | None = None,
    cache: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    **sections: Any,
) -> Settings:
    """Settings for ALPHA and BRAVO (or `tenants`) in front of `upstream_url`. `upstream`, `cache` and
    `limits` are fields of those sections; `sections` are other sections whole (`admin=AdminConfig(...)`)."""
    return Settings(
        tenants=tenants,
        upstream=UpstreamConfig(base_url=HttpUrl(upstream_url), **(upstream or {})),
        cache=CacheConfig(**(cache or {})),
        limits=LimitsConfig(**(limits or {})),
        **sections,
    )


def served_proxy(
    settings: Settings, *, bounds: ServerConfig | None = None, log_level: str = "warning", **app: Any
) -> Served:
    """The tests' one way to run a proxy in this process: `create_app(settings, **app)` (`app` is its
    keyword options: `store`, `clock`, `load_settings`) under the proxy's own server on a free port,
    started by `with` (or `__enter__`) and stopped on leaving it."""
    return Served(create_app(settings, **app), bounds=bounds, log_level=log_level)


def team_simulator() -> Simulator:
    """A simulator that knows ALPHA's and BRAVO's upstream keys, each in its own workspace."""
    return Simulator(
        keys={ALPHA.upstream_key: ALPHA.upstream_workspace, BRAVO.upstream_key: BRAVO.upstream_workspace}
    )


class SharedProxy:
    """One proxy and one simulator on real sockets for a whole test module, so that many small cases
    cost no server start each. `fresh()` gives a test a new simulator (files, faults, request log)
    behind the same socket and empties the proxy's embedded cache."""

    def __init__(self, limits: dict[str, object] | None = None) -> None:
        self.simulator = team_simulator()
        self._cache_server = fakeredis.FakeServer()
        self._upstream = Served(_Delegate(lambda: self.simulator.app))
        self._limits = limits
        self._proxy: Served | None = None
        self.url = ""
        self.port = 0

    def __enter__(self) -> SharedProxy:
        self._upstream.__enter__()
        settings = team_settings(
            self._upstream.url,
            upstream={"read_timeout_s": 5},
            limits=self._limits,
            # No in-process copies: `fresh()` empties the store, and a copy would outlive that.
            cache={"local_ttl_s": 0},
        )
        store = RedisStore(fakeredis.FakeAsyncRedis(server=self._cache_server))
        self._proxy = served_proxy(settings, store=store).__enter__()
        self.url, self.port = self._proxy.url, self._proxy.port
        return self

    def fresh(self) -> Simulator:
        self.simulator = team_simulator()
        fakeredis.FakeRedis(server=self._cache_server).flushall()
        return self.simulator

    def __exit__(self, *exc_info: object) -> None:
        if self._proxy is not None:
            self._proxy.__exit__(None, None, None)
        self._upstream.__exit__(None, None, None)


class _Delegate:
    """An ASGI app that passes every call to whichever app `current` returns at that moment."""

    def __init__(self, current: Callable[[], ASGIApp]) -> None:
        self._current = current

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._current()(scope, receive, send)


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


class RedisServer:
    """A real redis-server on a free port, with no persistence; can be stopped and started again."""

    def __init__(self, port: int, extra: list[str] | None = None, folder: Path | None = None) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._extra = extra or []
        self._folder = folder
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/ensure-redis-server")
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self._extra,
            ],
            stdout=subprocess.DEVNULL,
            cwd=self._folder,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def pause(self) -> None:
        """Freeze the server: it keeps its data but answers nothing until `resume`."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


class FakeClock:
    """Wall-clock time that a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class OutputWatch:
    """Everything the proxy wrote during the test run, to be searched for secrets at the end."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def feed(self, text: str) -> None:
        self.chunks.append(text)

    def leaks(self, secrets: tuple[str, ...]) -> list[str]:
        everything = "\n".join(self.chunks)
        return [secret for secret in secrets if secret in everything]


WATCH = OutputWatch()


class RedisClusterNodes:
    """A local 3-master Redis Cluster (no replicas), made from redis-server in cluster mode."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self.ports = _cluster_ports(3)
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)
        self._nodes = [
            RedisServer(
                port, ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"], folder
            )
            for port in self.ports
        ]

    def start(self) -> None:
        for node in self._nodes:
            node.start()
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 15
        while not all(b"cluster_state:ok" in self._ask(port, "CLUSTER INFO") for port in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ready")
            time.sleep(0.1)

    def flush(self) -> None:
        for port in self.ports:
            self._ask(port, "FLUSHALL")

    def keyslot(self, key: str) -> int:
        """The slot the cluster itself assigns to a key."""
        return int(self._ask(self.ports[0], f"CLUSTER KEYSLOT {key}"))

    def stop(self) -> None:
        for node in self._nodes:
            node.stop()

    @staticmethod
    def _ask(port: int, command: str) -> bytes:
        return subprocess.run(
            ["redis-cli", "-p", str(port), *command.split()], check=True, capture_output=True
        ).stdout


def _cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 <= 65535 and port not in ports and _is_free(port + 10000):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ScriptedStore:
    """A `CacheStore` for the response cache's unit tests: writes fail while `down`; the first write
    after `hold` is set waits for it; reads are counted per key and written writes recorded."""

    def __init__(self) -> None:
        self.down = False
        self.hold: asyncio.Event | None = None
        self.reads: Counter[str] = Counter()
        self.written: list[Write] = []

    async def write(self, writes: Sequence[Write]) -> None:
        if self.down:
            raise CacheUnavailableError("down")
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
        self.written += writes

    async def read_with_generation(
        self, key: str, fields: Sequence[str] | None, generation_key: str, start: bytes, ttl_s: int
    ) -> tuple[list[bytes | None], bytes]:
        self.reads[key] += 1
        return [None for _ in fields or [key]], start

    def back_for_s(self) -> float:
        return math.inf  # never away: the writes fail, not the store as a whole

    @contextlib.contextmanager
    def request_budget(self) -> Iterator[None]:
        yield
