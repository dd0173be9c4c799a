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
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import HttpUrl
from starlette.types import ASGIApp

from proxy.access import access_logger, start_access_log
from proxy.app import create_app
from proxy.config import ConfigError, ServerConfig, Settings, Tenant, UpstreamConfig, hash_key, load_settings
from proxy.errors import ProxyError
from proxy.ownership import TeamStorage, read_totals, sees_all, storage_rows
from proxy.reconcile import adopt, reconcile
from proxy.server import ListenError, bind_listener, listener_url, run_on_server_loop, run_servers
from proxy.store import CacheUnavailableError, Store, open_store
from proxy.upstream import UpstreamClient
from proxy.usage import COUNTERS, UsageRow, read_usage, usage_report

if TYPE_CHECKING:
    from files_api_simulator import Simulator

_LOG_LEVELS = ("debug", "info", "warning", "error")
_T = TypeVar("_T")
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

    reconcile_cmd = command(
        "reconcile",
        "list every upstream workspace in full, drop the owner records of files gone (deleted"
        " directly, expired), and print each team's files and bytes and the unowned ones",
    )
    reconcile_cmd.add_argument("--config", required=True, type=Path, help="the TOML config file")
    reconcile_cmd.set_defaults(command=_reconcile)

    files = command("files", "manage file ownership")
    files_commands = files.add_subparsers(required=True, metavar="ACTION")
    adopt_cmd = files_commands.add_parser(
        "adopt",
        help="make a team the owner of files uploaded outside the proxy",
        description="make a team the owner of files uploaded outside the proxy (files owned already stay"
        " with their owner)",
    )
    adopt_cmd.add_argument("--config", required=True, type=Path, help="the TOML config file")
    adopt_cmd.add_argument("--tenant", required=True, help="the team that becomes the owner")
    which = adopt_cmd.add_mutually_exclusive_group(required=True)
    which.add_argument("--unowned", action="store_true", help="every unowned file of the team's key")
    which.add_argument("file_ids", nargs="*", default=[], metavar="FILE_ID", help="these files")
    adopt_cmd.set_defaults(command=_adopt)

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
        files = "all" if sees_all(tenant, settings.tenants) else "own"
        print(f"  tenant {tenant.name}: workspace {tenant.workspace}, {keys} proxy key(s), files {files}")
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


def _simulator_class() -> type[Simulator] | None:
    """The simulator's class, or None (with one line said) when its package is not installed: it is
    its own package (`simulator/`), which a production install leaves out."""
    try:
        from files_api_simulator import Simulator
    except ImportError:
        print(
            "files-proxy: the Files API simulator is not installed; install it with"
            f" {Path(sys.executable).parent / 'pip'} install -e ./simulator (from the repository)",
            file=sys.stderr,
        )
        return None
    return Simulator


def _simulate(args: argparse.Namespace) -> int:
    Simulator = _simulator_class()
    if Simulator is None:
        return 2
    listener = bind_listener(args.host, args.port)
    print(f"Files API simulator on {listener_url(listener)} (any API key is accepted)", flush=True)
    run_on_server_loop(
        run_servers([(Simulator(latency_ms=args.latency_ms).app, listener)], args.log_level, ServerConfig())
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    proxy_key = "fp-demo-" + secrets.token_urlsafe(24)
    upstream_key = "sk-ant-demo-" + secrets.token_hex(16)
    Simulator = _simulator_class()
    if Simulator is None:
        return 2
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
    rows, storage = asyncio.run(_read_usage(settings, since, until, args.workspace))
    if args.json:
        print(json.dumps(usage_report(since, until, rows, storage), indent=2))
        return 0
    print(f"Usage from {since} to {until} (UTC days, both included)")
    table = [["workspace", "tenant", *COUNTERS]]
    table += [[r.workspace, r.tenant, *(str(r.counts[c]) for c in COUNTERS)] for r in rows]
    _print_table(table)
    print("\nStorage now (live files; quotas blank when unset)")
    held = [["workspace", "tenant", "files", "bytes", "quota_bytes", "max_files"]]
    held += [
        [s.workspace, s.tenant, str(s.files), str(s.bytes), _blank(s.quota_bytes), _blank(s.max_files)]
        for s in storage
    ]
    _print_table(held)
    return 0


def _print_table(table: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _blank(value: int | None) -> str:
    return "" if value is None else str(value)


async def _read_usage(
    settings: Settings, since: date, until: date, workspace: str | None
) -> tuple[list[UsageRow], list[TeamStorage]]:
    """Usage rows, and storage per team: the store knows every key's scope, so no secret is needed."""
    store = open_store(settings.cache.url, timeout_s=5.0)
    try:
        rows = await read_usage(store, since, until, workspace)
        storage = storage_rows(settings.tenants, await read_totals(store, ()))
    finally:
        await store.aclose()
    return rows, [row for row in storage if workspace in (None, row.workspace)]


def _reconcile(args: argparse.Namespace) -> int:
    settings = _shared_store_settings(args.config, "reconcile")
    if settings is None:
        return 2
    reports = _run_against_upstream(settings, "reconcile", lambda s, u: reconcile(s, u, settings.tenants))
    if reports is None:
        return 1
    for report in reports:
        print(f"workspace {report.workspaces}:")
        for tenant, (count, held) in report.tenants.items():
            print(f"  {tenant}: {count} files, {held} bytes")
        print(f"  unowned: {report.unowned[0]} files, {report.unowned[1]} bytes")
        for file_id, owner, size in report.dropped:
            print(f"  dropped {file_id} ({owner}, {size} bytes): gone upstream or expired")
        if not report.dropped:
            print("  dropped nothing")
    return 0


def _adopt(args: argparse.Namespace) -> int:
    settings = _shared_store_settings(args.config, "files adopt")
    if settings is None:
        return 2
    tenant = next((t for t in settings.tenants if t.name == args.tenant), None)
    if tenant is None:
        print(f"files-proxy: files adopt: no tenant named {args.tenant!r} in the config", file=sys.stderr)
        return 2
    wanted = None if args.unowned else args.file_ids
    owners = _run_against_upstream(settings, "files adopt", lambda s, u: adopt(s, u, tenant, wanted))
    if owners is None:
        return 1
    for file_id, owner in owners.items():
        if owner is None:
            print(f"{file_id}: no such file upstream")
        elif owner == tenant.name:
            print(f"{file_id}: adopted by {owner}")
        else:
            print(f"{file_id}: owned by {owner} (unchanged)")
    return 0


def _shared_store_settings(config: Path, command: str) -> Settings | None:
    """Settings with secrets, if the store is one the proxies share (memory:// is per process)."""
    settings = load_settings(config)
    if settings.cache.url == "memory://":
        print(
            f"files-proxy: {command}: cache.url is memory://, so each proxy keeps its own owner records"
            " (the proxy reconciles them itself every ownership.reconcile_interval_s)",
            file=sys.stderr,
        )
        return None
    return settings


def _run_against_upstream(
    settings: Settings, command: str, work: Callable[[Store, UpstreamClient], Awaitable[_T]]
) -> _T | None:
    """Run `work` with the store and an upstream client; None (and why, on stderr) if either failed."""
    try:
        return asyncio.run(_with_upstream(settings, work))
    except ProxyError as exc:
        print(f"files-proxy: {command}: {exc.message}", file=sys.stderr)
    except CacheUnavailableError:
        print(
            f"files-proxy: {command}: the store at {_without_password(settings.cache.url)} is unavailable",
            file=sys.stderr,
        )
    return None


async def _with_upstream(settings: Settings, work: Callable[[Store, UpstreamClient], Awaitable[_T]]) -> _T:
    store = open_store(settings.cache.url, timeout_s=5.0)
    upstream = UpstreamClient(settings.upstream)
    await upstream.open()
    try:
        return await work(store, upstream)
    finally:
        await upstream.aclose()
        await store.aclose()
