"""The `files-proxy` command: serve the proxy, check a config, hash a proxy key, read usage per
team, and run the local Files API simulator alone (simulate) or with a proxy in front (demo)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import secrets
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import HttpUrl
from starlette.types import ASGIApp

from proxy.access import access_logger, start_access_log
from proxy.app import create_app
from proxy.config import ConfigError, ServerConfig, Settings, Tenant, UpstreamConfig, hash_key, load_settings
from proxy.server import ListenError, bind_listener, listener_url, run_on_server_loop, run_servers
from proxy.simulator import Simulator
from proxy.store import open_store
from proxy.usage import COUNTERS, UsageRow, read_usage, usage_report

_LOG_LEVELS = ("debug", "info", "warning", "error")
_DEMO_SNIPPET = """\
    import anthropic
    client = anthropic.Anthropic(base_url="{url}", api_key="{key}")
    print([f.filename for f in client.files.list()])
    print(len(client.files.download("{file_id}").read()), "bytes downloaded")"""


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
    except ListenError as exc:
        print(f"files-proxy: {exc} (another --port, or stop what uses it)", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="files-proxy", description=__doc__)
    parser.add_argument(
        "--log-level", default="info", choices=_LOG_LEVELS, help="what is logged on stderr (default: info)"
    )
    # --log-level is also accepted after the command; there it has no default, so the one above stands.
    after_command = argparse.ArgumentParser(add_help=False)
    after_command.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=_LOG_LEVELS,
        help="what is logged on stderr (default: info)",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help,
            description=help,
            parents=[after_command],
        )

    serve = command("serve", "run the proxy; access lines go to stdout, everything else to stderr")
    serve.add_argument("--config", required=True, type=Path, help="the TOML config file")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)",
    )
    serve.add_argument(
        "--port", default=8080, type=int, help="port to listen on, 0 for any free one (default: %(default)s)"
    )
    serve.set_defaults(command=_serve)

    check = command("check-config", "validate a config file and read its secrets, then exit")
    check.add_argument("--config", required=True, type=Path, help="the TOML config file")
    check.set_defaults(command=_check_config)

    hash_cmd = command("hash-key", "print the sha256 of a proxy key, for client_key_sha256")
    hash_cmd.add_argument("key", nargs="?", default="-", help="the key; '-' reads it from stdin (default: -)")
    hash_cmd.set_defaults(command=_hash_key)

    simulate = command("simulate", "run the local Files API simulator (any API key is its own workspace)")
    simulate.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    simulate.add_argument(
        "--port", default=8081, type=int, help="port to listen on, 0 for any free one (default: %(default)s)"
    )
    simulate.add_argument(
        "--latency-ms", default=0.0, type=float, help="delay added to every answer (default: %(default)s)"
    )
    simulate.set_defaults(command=_simulate)

    usage = command("usage", "print usage per workspace and tenant from the shared store")
    usage.add_argument("--config", required=True, type=Path, help="the TOML config file (no secrets needed)")
    usage.add_argument(
        "--since", type=date.fromisoformat, help="first UTC day, YYYY-MM-DD (default: the 1st of this month)"
    )
    usage.add_argument("--until", type=date.fromisoformat, help="last UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--workspace", help="only this workspace (default: every workspace)")
    usage.add_argument(
        "--json", action="store_true", help="print JSON, as GET /admin/usage does (default: a table)"
    )
    usage.set_defaults(command=_usage)

    demo = command("demo", "run the simulator and a proxy in front of it, for a first try")
    demo.add_argument(
        "--host", default="127.0.0.1", help="address the proxy listens on (default: %(default)s)"
    )
    demo.add_argument(
        "--port",
        default=8080,
        type=int,
        help="port the proxy listens on, 0 for any free one (default: %(default)s)",
    )
    demo.set_defaults(command=_demo)
    return parser


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    listener = bind_listener(args.host, args.port)
    access_log = start_access_log()
    app = create_app(
        settings,
        load_settings=lambda: load_settings(args.config),
        access_lines_dropped=lambda: access_log.dropped,
    )
    print(
        f"files-proxy: serving on {listener_url(listener)} ({len(settings.tenants)} tenants,"
        f" cache {_without_password(settings.cache.url)}); access lines go to stdout",
        file=sys.stderr,
        flush=True,
    )
    try:
        run_on_server_loop(
            run_servers([(app, listener)], args.log_level, settings.server, on_hangup=app.reload)
        )
    finally:
        access_log.stop()
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(f"{args.config}: OK")
    print(f"  upstream: {settings.upstream.origin}")
    print(f"  proxy:    {settings.upstream.proxy_shown()}")
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
    print(f"Files API simulator on {listener_url(listener)} (any API key is accepted)", flush=True)
    run_on_server_loop(
        run_servers([(Simulator(latency_ms=args.latency_ms).app, listener)], args.log_level, ServerConfig())
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    proxy_key = "fp-demo-" + secrets.token_urlsafe(24)
    upstream_key = "sk-ant-demo-" + secrets.token_hex(16)
    simulator = Simulator()
    file_id = simulator.add_file(
        upstream_key, filename="example-output.bin", size_bytes=4096, downloadable=True
    )
    simulator_listener = bind_listener("127.0.0.1", 0)
    proxy_listener = bind_listener(args.host, args.port)
    tenant = Tenant(
        name="demo",
        workspace="demo",
        client_key_hashes=frozenset({hash_key(proxy_key)}),
        api_key=upstream_key,
    )
    upstream = UpstreamConfig(base_url=HttpUrl(listener_url(simulator_listener)))
    settings = Settings(tenants=(tenant,), upstream=upstream)
    url = listener_url(proxy_listener)
    bin_dir = Path(sys.executable).parent
    install = "" if importlib.util.find_spec("anthropic") else f"{bin_dir / 'pip'} install anthropic, then "
    print(
        f"files-proxy demo: a proxy in front of a local Files API simulator. Nothing is written to disk.\n"
        f"  base URL:  {url}\n"
        f"  proxy key: {proxy_key}\n"
        f"One file is there to list and download: example-output.bin ({file_id}).\n"
        f"Try it with the official SDK ({install}paste this into {bin_dir / 'python'}):\n"
        f"{_DEMO_SNIPPET.format(url=url, key=proxy_key, file_id=file_id)}\n"
        f"Ctrl-C stops it.",
        flush=True,
    )
    if args.log_level != "debug":
        access_logger.setLevel(logging.WARNING)  # a demo's terminal is for the banner, not access lines
    servers: list[tuple[ASGIApp, socket.socket]] = [
        (simulator.app, simulator_listener),
        (create_app(settings), proxy_listener),
    ]
    run_on_server_loop(run_servers(servers, args.log_level, settings.server))
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
