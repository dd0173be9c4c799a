"""The `files-proxy` command: serve, check-config, hash-key, simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import uvicorn
from pydantic import HttpUrl
from starlette.types import ASGIApp

from proxy.access import start_access_log
from proxy.app import create_app
from proxy.config import ConfigError, Settings, Tenant, UpstreamConfig, hash_key, load_settings
from proxy.simulator import Simulator
from proxy.store import open_store
from proxy.usage import COUNTERS, UsageRow, read_usage, usage_report

_DEMO_SNIPPET = """\
    import anthropic
    client = anthropic.Anthropic(base_url="{url}", api_key="{key}")
    print([f.filename for f in client.files.list()])"""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # No format here shows them, and each record would look them up (a getpid call each).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        return int(args.command(args))
    except ConfigError as exc:
        print(f"files-proxy: config error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="files-proxy", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, type=Path)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", default=8080, type=int)
    serve.set_defaults(command=_serve)

    check = commands.add_parser("check-config", help="validate a config file and its secrets, then exit")
    check.add_argument("--config", required=True, type=Path)
    check.set_defaults(command=_check_config)

    hash_cmd = commands.add_parser("hash-key", help="print the sha256 of a proxy key, for client_key_sha256")
    hash_cmd.add_argument("key", nargs="?", default="-", help="the key; omit or '-' to read it from stdin")
    hash_cmd.set_defaults(command=_hash_key)

    simulate = commands.add_parser("simulate", help="run the local Files API simulator")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", default=8081, type=int)
    simulate.add_argument("--latency-ms", default=0.0, type=float)
    simulate.set_defaults(command=_simulate)

    usage = commands.add_parser("usage", help="print usage per workspace and tenant from the shared store")
    usage.add_argument("--config", required=True, type=Path)
    usage.add_argument(
        "--since", type=date.fromisoformat, help="first UTC day, YYYY-MM-DD (default: 1st of month)"
    )
    usage.add_argument("--until", type=date.fromisoformat, help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--workspace")
    usage.add_argument("--json", action="store_true", help="print JSON, as GET /admin/usage does")
    usage.set_defaults(command=_usage)

    demo = commands.add_parser("demo", help="run the simulator and a proxy in front of it, for a first try")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", default=8080, type=int)
    demo.set_defaults(command=_demo)
    return parser


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    app = create_app(settings, load_settings=lambda: load_settings(args.config))
    access_log = start_access_log()
    try:
        _run_on_server_loop(
            _run_servers(
                [(app, bind_listener(args.host, args.port))],
                args.log_level,
                grace_s=settings.server.shutdown_grace_s,
                on_hangup=app.reload,
            )
        )
    finally:
        access_log.stop()
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(f"{args.config}: OK")
    print(f"  upstream: {settings.upstream.origin}")
    print(f"  cache:    {_without_password(settings.cache.url)}")
    for tenant in settings.tenants:
        keys = len(tenant.client_key_hashes)
        print(f"  tenant {tenant.name}: workspace {tenant.workspace}, {keys} proxy key(s)")
    return 0


def _without_password(url: str) -> str:
    """A store URL fit to print: `redis://user:secret@host` shows as `redis://user:***@host`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def _hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    if not key:
        print("files-proxy: hash-key: empty key", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    listener = bind_listener(args.host, args.port)
    print(f"Files API simulator on {_url(listener)} (any API key is accepted)", flush=True)
    _run_on_server_loop(_run_servers([(Simulator(latency_ms=args.latency_ms).app, listener)], args.log_level))
    return 0


def _demo(args: argparse.Namespace) -> int:
    proxy_key = "fp-demo-" + secrets.token_urlsafe(24)
    upstream_key = "sk-ant-demo-" + secrets.token_hex(16)
    simulator = Simulator()
    simulator.add_file(upstream_key, filename="example-output.bin", size_bytes=4096, downloadable=True)
    simulator_listener = bind_listener("127.0.0.1", 0)
    proxy_listener = bind_listener(args.host, args.port)
    tenant = Tenant(
        name="demo",
        workspace="demo",
        client_key_hashes=frozenset({hash_key(proxy_key)}),
        api_key=upstream_key,
    )
    upstream = UpstreamConfig(base_url=HttpUrl(_url(simulator_listener)))
    settings = Settings(tenants=(tenant,), upstream=upstream)
    url = _url(proxy_listener)
    print(
        f"files-proxy demo: a proxy in front of a local Files API simulator. Nothing is written to disk.\n"
        f"  base URL:  {url}\n"
        f"  proxy key: {proxy_key}\n"
        f"Try it with the official SDK (pip install anthropic):\n"
        f"{_DEMO_SNIPPET.format(url=url, key=proxy_key)}\n"
        f"Ctrl-C stops it.",
        flush=True,
    )
    servers: list[tuple[ASGIApp, socket.socket]] = [
        (simulator.app, simulator_listener),
        (create_app(settings), proxy_listener),
    ]
    _run_on_server_loop(_run_servers(servers, "warning" if args.log_level == "info" else args.log_level))
    return 0


def _usage(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, with_secrets=False)
    if settings.cache.url == "memory://":
        print(
            "files-proxy: usage: cache.url is memory://, so each proxy keeps its own counters;"
            " ask a running proxy with GET /admin/usage, or use a shared Redis",
            file=sys.stderr,
        )
        return 2
    today = datetime.now(UTC).date()
    since, until = args.since or today.replace(day=1), args.until or today
    rows = asyncio.run(_read_usage(settings.cache.url, since, until, args.workspace))
    if args.json:
        print(json.dumps(usage_report(since, until, rows), indent=2))
        return 0
    print(f"Usage from {since} to {until} (UTC days, both included)")
    table = [["workspace", "tenant", *COUNTERS]]
    table += [[r.workspace, r.tenant, *(str(r.counts[c]) for c in COUNTERS)] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


async def _read_usage(url: str, since: date, until: date, workspace: str | None) -> list[UsageRow]:
    store = open_store(url, timeout_s=5.0)
    try:
        return await read_usage(store, since, until, workspace)
    finally:
        await store.aclose()


class _Server(uvicorn.Server):
    """Leaves signals to `_run_servers`, so several servers in one process stop on one Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _run_on_server_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on the event loop `uvicorn.run` would pick: uvloop when it is installed (it is, with
    uvicorn[standard]). Plain `asyncio.run` would quietly serve on the slower stdlib loop."""
    loop_factory = uvicorn.Config(app=_run_servers, log_config=None).get_loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


async def _run_servers(
    apps: Sequence[tuple[ASGIApp, socket.socket]],
    log_level: str,
    *,
    grace_s: int | None = None,
    on_hangup: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM: stop accepting, let requests in flight finish for up to
    `grace_s`, then return. SIGHUP runs `on_hangup` (a config reload) and keeps serving."""
    # Our access log replaces uvicorn's; neither it nor httpx writes a line per request to stderr.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def server(app: ASGIApp) -> _Server:
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level=log_level,
            server_header=False,
            access_log=False,
            timeout_graceful_shutdown=grace_s,
        )
        return _Server(config)

    servers = [(server(app), listener) for app, listener in apps]

    def stop() -> None:
        for server, _ in servers:
            server.should_exit = True

    reloads: set[asyncio.Task[None]] = set()

    async def reload(hangup: Callable[[], Awaitable[None]]) -> None:
        try:
            await hangup()
        except ConfigError as exc:
            logging.getLogger(__name__).error("config reload rejected, the running config stays: %s", exc)

    def hang_up() -> None:
        if on_hangup is not None:
            task = asyncio.create_task(reload(on_hangup))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    loop.add_signal_handler(signal.SIGHUP, hang_up)
    await asyncio.gather(*(server.serve(sockets=[listener]) for server, listener in servers))


def bind_listener(host: str, port: int) -> socket.socket:
    """Bind before serving, so port 0 works and the real address can be printed first.

    TCP_NODELAY is set here because accepted connections inherit it: on a socket handed to the
    server, nothing else sets it, and Nagle's algorithm with delayed ACKs then holds every
    response on a kept-alive connection for ~40 ms.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, reuse_port=False)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
