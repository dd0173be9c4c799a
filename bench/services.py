"""The servers a bench run measures, each in its own process group on a free loopback port.

Everything started here is registered on one `contextlib.ExitStack`, so a failure, Ctrl-C or a
normal exit stops it all: no stray simulator, proxy, Redis or nginx outlives the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from bench.relay import answers as _relay_answers
from bench.relay import send as _relay_send
from proxy.config import hash_key

_BENCH_DIR = Path(__file__).resolve().parent
_UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"


@dataclass(frozen=True)
class Keys:
    """The proxy key clients present and the tenant's upstream key it is swapped for."""

    proxy_key: str
    upstream_key: str
    # A second team on the same Anthropic key that sees only its own files (issue 16's list-hit row).
    own_proxy_key: str = ""


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    port: int
    pid: int


@dataclass(frozen=True)
class TlsSimulator:
    """The simulator over HTTPS (`bench/tls.py`): `service.url` is what the proxy and wrk use,
    `control_url` the same simulator over plain HTTP for seeding, `ca_file` the CA to trust."""

    service: Service
    control_url: str
    ca_file: Path


@dataclass(frozen=True)
class Relay:
    """A TCP relay in front of Redis (`bench/relay.py`): point proxies at `url`, then `cut()` the link
    (a partition: nothing is refused, bytes vanish) and `restore()` it."""

    service: Service
    control_port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.service.port}/0"

    def cut(self) -> None:
        _relay_send(self.control_port, "cut")

    def restore(self) -> None:
        _relay_send(self.control_port, "restore")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Services:
    """Starts servers; `close()` (or leaving the `with`) stops every one of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = contextlib.ExitStack()
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def stop(self, service: Service, sig: signal.Signals = signal.SIGTERM) -> int:
        """Stop one server now, not at `close()`: SIGTERM lets a proxy drain and keep its journal,
        SIGKILL is a crash. Returns its exit status."""
        process = self._processes.pop(service.pid)
        _stop(process, sig)
        return process.returncode

    def _stop_unless_stopped(self, process: subprocess.Popen[bytes]) -> None:
        """At `close()`: one `stop` already ended is left alone (its group id may be another's now)."""
        if self._processes.get(process.pid) is process:
            del self._processes[process.pid]
            _stop(process)

    def simulator(self, latency_ms: float, *, log_level: str = "info") -> Service:
        """`log_level` "warning" keeps a long run's stderr to what went wrong."""
        port = free_port()
        command = [_files_proxy(), "--log-level", log_level, "simulate", "--port", str(port)]
        command += ["--latency-ms", str(latency_ms)]
        return self._spawn("simulator", command, port, ready=lambda url: _answers(f"{url}/_simulator/health"))

    def tls_simulator(self) -> TlsSimulator:
        """The simulator as production's upstream is reached, over TLS, with a CA made for the run."""
        port, control_port = free_port(), free_port()
        ca_file = self.workdir / "tls" / "ca.pem"
        control_url = f"http://127.0.0.1:{control_port}"
        ports = ["--port", str(port), "--control-port", str(control_port)]
        command = [sys.executable, "-m", "bench.tls", *ports, "--ca-file", str(ca_file)]

        def ready(url: str) -> bool:
            # The control listener answers only once the CA is written, so it is read whole.
            return _answers(f"{control_url}/_simulator/health") and _answers(
                f"{url}/_simulator/health", verify=ssl.create_default_context(cafile=ca_file)
            )

        service = self._spawn(
            "simulator-tls", command, port, cwd=_BENCH_DIR.parent, scheme="https", ready=ready
        )
        return TlsSimulator(service, control_url, ca_file)

    def redis(self, port: int | None = None) -> Service:
        """redis-server without persistence; `port`: the one a killed Redis had, to bring it back."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/ensure-redis-server")
        port = port or free_port()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        service = self._spawn("redis", command, port, cwd=self.workdir, ready=lambda url: _redis_pong(port))
        return Service("redis", f"redis://127.0.0.1:{port}/0", port, service.pid)

    def proxy(
        self, name: str, upstream_url: str, cache_url: str, keys: Keys, *, ca_file: Path | None = None
    ) -> Service:
        """`files-proxy serve` with a generated config; its access lines go to a file, as a real
        deployment writes them somewhere (logging stays on: it is part of the cost). `ca_file`: the
        private CA an HTTPS upstream's certificate is verified against (`upstream.ca_file`)."""
        config = _proxy_config(upstream_url, cache_url, keys, ca_file)
        return self.proxy_with_config(name, config, {_UPSTREAM_KEY_ENV: keys.upstream_key})

    def proxy_with_config(
        self, name: str, config: str, secrets: dict[str, str], *, port: int | None = None
    ) -> Service:
        """`files-proxy serve` with this config text and these variables (the keys it names), on
        `port` (a restarted replica takes its old one back). The config goes to `{name}.toml`, the
        access lines to `{name}.access.log`, stderr to `{name}.stderr`: a restart needs a new name
        to keep the first run's files."""
        port = port or free_port()
        config_file = self.workdir / f"{name}.toml"
        config_file.write_text(config)
        command = [_files_proxy(), "serve", "--config", str(config_file), "--port", str(port)]
        log = self.workdir / f"{name}.access.log"
        return self._spawn(
            name,
            command,
            port,
            env={**os.environ, **secrets},
            stdout=log,
            ready=lambda url: _answers(f"{url}/healthz"),
        )

    def relay(self, target_port: int) -> Relay:
        """A relay to `target_port` (Redis) that the caller can cut and restore."""
        port, control_port = free_port(), free_port()
        command = [sys.executable, "-m", "bench.relay", "--port", str(port)]
        command += ["--target-port", str(target_port), "--control-port", str(control_port)]
        service = self._spawn(
            "relay", command, port, cwd=_BENCH_DIR.parent, ready=lambda url: _relay_answers(control_port)
        )
        return Relay(service, control_port)

    def bare(self, bodies_file: Path, *, framework: bool = True) -> Service:
        """`bench/bare.py`: these bodies from bare Starlette, or with no `framework`, from the server
        alone."""
        port = free_port()
        command = [sys.executable, "-m", "bench.bare", "--port", str(port), "--bodies", str(bodies_file)]
        return self._spawn(
            "bare" if framework else "server-alone",
            command if framework else [*command, "--no-framework"],
            port,
            cwd=_BENCH_DIR.parent,
            ready=lambda url: _answers(f"{url}/healthz"),
        )

    def lean(self, upstream_url: str, redis_url: str, keys: Keys) -> Service:
        """The lean stand-in proxy of `bench/lean.py`, a miss's floor."""
        port = free_port()
        command = [sys.executable, "-m", "bench.lean", "--port", str(port), "--upstream", upstream_url]
        command += ["--redis", redis_url, "--key-sha256", hash_key(keys.proxy_key)]
        command += ["--upstream-key-env", _UPSTREAM_KEY_ENV]
        return self._spawn(
            "lean",
            command,
            port,
            env={**os.environ, _UPSTREAM_KEY_ENV: keys.upstream_key},
            cwd=_BENCH_DIR.parent,
            stdout=self.workdir / "lean.log",
            ready=lambda url: _answers(f"{url}/healthz"),
        )

    def nginx(self, upstream_port: int) -> Service:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        port = free_port()
        prefix = self.workdir / "nginx"
        prefix.mkdir()
        template = (_BENCH_DIR / "nginx.conf.template").read_text()
        user = "user root;" if os.geteuid() == 0 else ""
        config = template.format(prefix=prefix, port=port, upstream_port=upstream_port, user=user)
        (prefix / "nginx.conf").write_text(config)
        command = [
            binary,
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            str(prefix / "error.log"),
        ]
        return self._spawn("nginx", command, port, ready=lambda url: _answers(f"{url}/nginx-health"))

    def _spawn(
        self,
        name: str,
        command: list[str],
        port: int,
        *,
        ready: Callable[[str], bool],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdout: Path | None = None,
        scheme: str = "http",
    ) -> Service:
        stderr_path = self.workdir / f"{name}.stderr"
        with contextlib.ExitStack() as files:
            out: IO[bytes] | int = (
                files.enter_context(stdout.open("wb")) if stdout is not None else subprocess.DEVNULL
            )
            err = files.enter_context(stderr_path.open("wb"))
            process = subprocess.Popen(
                command, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
            )
        self._processes[process.pid] = process
        self._stack.callback(self._stop_unless_stopped, process)
        url = f"{scheme}://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while not ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                detail = stderr_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not start ({' '.join(command)}):\n{detail}")
            time.sleep(0.05)
        return Service(name, url, port, process.pid)


def server_runtime(pid: int) -> str:
    """Which event loop and HTTP parser a Python server process really loaded (from its memory
    map, so it is what runs, not what its config asks for): e.g. "uvloop+httptools"."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    loop = "uvloop" if "/uvloop/" in maps else "asyncio"
    parser = "httptools" if "/httptools/" in maps else "h11"
    return f"{loop}+{parser}"


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    """`sig` to the whole process group (nginx has workers), then SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _proxy_config(upstream_url: str, cache_url: str, keys: Keys, ca_file: Path | None) -> str:
    # 500 MB is the Files API's limit for the file itself; the multipart envelope adds a little.
    ca = "" if ca_file is None else f'ca_file = "{ca_file}"\n'
    return (
        f'[upstream]\nbase_url = "{upstream_url}"\n{ca}\n'
        f'[cache]\nurl = "{cache_url}"\n\n'
        "[limits]\nmax_upload_bytes = 600000000\n\n"
        f'[[tenants]]\nname = "bench"\nworkspace = "bench"\napi_key_env = "{_UPSTREAM_KEY_ENV}"\n'
        f'client_key_sha256 = ["{hash_key(keys.proxy_key)}"]\nfiles = "all"\n'
        + (
            f'\n[[tenants]]\nname = "bench-own"\nworkspace = "bench"\napi_key_env = "{_UPSTREAM_KEY_ENV}"\n'
            f'client_key_sha256 = ["{hash_key(keys.own_proxy_key)}"]\nfiles = "own"\n'
            if keys.own_proxy_key
            else ""
        )
    )


def _files_proxy() -> str:
    """The console script of the interpreter running the bench (the venv's)."""
    script = Path(sys.executable).parent / "files-proxy"
    return str(script) if script.exists() else "files-proxy"


def _answers(url: str, *, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(url, timeout=1, verify=verify).status_code == 200
    except httpx.TransportError:
        return False


def _redis_pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False
