"""The scenarios of issue 6 (with issue 13's targets and its miss over TLS), each returning its table
rows: the proxy next to its baselines, measured one after the other in one run, so their ratios are
what counts on a noisy machine.

A miss is made with `Cache-Control: no-cache`, which the proxy honours by looking up the store,
fetching upstream and storing the answer: the full miss path, at any rate and for as long as wanted,
which a supply of never-seen file ids would not give. Each connection's requests walk through
`miss_files` files in turn, so no two requests in flight share a key (concurrent requests for one key
would measure single-flight instead) and the store writes spread over many keys as real misses do.
Its CPU is read against the lean stand-in of `bench/lean.py` serving the same misses in the same run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.context import Context
from bench.flight import concurrent_misses
from bench.load import LoadResult, run_wrk
from bench.noisy import noisy_neighbour
from bench.seed import add_files
from bench.services import Service
from bench.table import Row, load_text
from bench.transfer import RssSampler, Transfer, download, upload

_HIT_CONNECTIONS = 64
_OWN_FILES = 10
_MISS_CONNECTIONS = (1, 8, 64)
# One connection (latency) and 8 (throughput) give production's path its figure; 64 would only add time.
_TLS_MISS_CONNECTIONS = (1, 8)
# Issue 13: a proxied miss costs at most 0.55 ms of server CPU, at every connection count, where a lean
# stand-in took 0.49-0.51 ms: 1.1 x the stand-in's, measured in the same run.
_MISS_CPU_RATIO = 1.1
_MISS_CPU_TARGET = "server CPU per request <= 1.1 x the lean stand-in's (issue 13: 0.55 ms against 0.50)"
_RSS_LIMIT = 64 * 1024 * 1024
_TRANSFER_ROUNDS = 3
# Label values may hold braces (route="/v1/files/{file_id}"), so the label set is matched greedily.
_METRIC_LINE = re.compile(r'^files_proxy_requests_total\{.*\bcache="(\w+)".*\} ([0-9.e+]+)$', re.M)


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Context], list[Row]]
    tools: tuple[str, ...]


def metadata_hit(ctx: Context) -> list[Row]:
    path = f"/v1/files/{ctx.hit_file}"
    scenario = f"metadata hit, {_HIT_CONNECTIONS} conns"
    alone, bare = _load(ctx, ctx.server_alone, path), _load(ctx, ctx.bare, path)
    rows = _floor_rows(scenario, alone, bare)
    for name, service in (("proxy (redis)", ctx.proxy_redis), ("proxy (memory)", ctx.proxy_memory)):
        rows.append(_hit_row(scenario, name, _load(ctx, service, path), bare, alone))
    for name, service in (("nginx proxy_cache", ctx.nginx), ("simulator direct", ctx.simulator)):
        result = _load(ctx, service, path, direct=True)
        rows.append(_baseline(scenario, name, result, f"{result.rps / bare.rps:.2f} x bare"))
    return rows


def list_hit(ctx: Context) -> list[Row]:
    path = "/v1/files?limit=20"
    scenario = f"list-page hit, {_HIT_CONNECTIONS} conns"
    alone, bare = _load(ctx, ctx.server_alone, path), _load(ctx, ctx.bare, path)
    rows = _floor_rows(scenario, alone, bare)
    plain: dict[str, LoadResult] = {}
    for name, service in (("proxy (redis)", ctx.proxy_redis), ("proxy (memory)", ctx.proxy_memory)):
        plain[name] = _load(ctx, service, path)
        rows.append(_hit_row(scenario, name, plain[name], bare, alone))
    # Issue 16: a team that sees only its own files, on a key it shares: the same cached page,
    # filtered (one more store read, for the page's owners). Half of the first page is its own.
    _upload_small(ctx.proxy_redis, ctx.keys.own_proxy_key, _OWN_FILES)
    own = _load(ctx, ctx.proxy_redis, path, extra={"key": ctx.keys.own_proxy_key})
    ratio = own.rps / plain["proxy (redis)"].rps
    versus = f"{ratio:.2f} x plain list hits"
    target = ">= 0.8 x the proxy's plain list-hit req/s"
    rows.append(
        _compared(scenario, "proxy (redis), `own` team", own, target, versus, ratio >= 0.8, ratio=ratio)
    )
    return rows


def _upload_small(service: Service, proxy_key: str, count: int) -> None:
    headers = {"x-api-key": proxy_key, "anthropic-version": "2023-06-01"}
    with httpx.Client(base_url=service.url, headers=headers, timeout=30) as client:
        for n in range(count):
            client.post("/v1/files", files={"file": (f"own-{n}.txt", b"x" * 100)}).raise_for_status()


def miss(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    proxy_rps: dict[int, float] = {}
    for connections in _MISS_CONNECTIONS:
        scenario = f"miss (0 ms upstream), {connections} conns"
        ctx.forget_requests()
        direct, proxied = _misses(ctx, ctx.simulator, ctx.proxy_redis, ctx.miss_ids_file, connections)
        lean = _load(ctx, ctx.lean, None, connections=connections, extra=_miss_options(ctx.miss_ids_file))
        proxy_rps[connections] = proxied.rps
        rows.append(_baseline(scenario, "simulator direct", direct))
        rows.append(_baseline(scenario, "lean stand-in (aiohttp)", lean, _over_direct(lean, direct)))
        cpu_ratio = _cpu_ratio(proxied, lean)
        added = f"{cpu_ratio:.1f} x the stand-in's CPU; {_over_direct(proxied, direct)}"
        cpu_met = cpu_ratio <= _MISS_CPU_RATIO
        numbers: dict[str, float] = {"cpu_ratio": cpu_ratio}
        if connections == 1:
            target, versus = f"p50 <= direct + 0.5 ms; {_MISS_CPU_TARGET}", added
            met = proxied.p50_ms - direct.p50_ms <= 0.5 and cpu_met
        elif connections < max(_MISS_CONNECTIONS):
            target, versus, met = _MISS_CPU_TARGET, added, cpu_met
        else:
            numbers["ratio"] = ratio = proxied.rps / proxy_rps[8]
            target = f">= 0.9 x the proxy's 8-conn req/s; {_MISS_CPU_TARGET}"
            versus, met = f"{ratio:.2f} x 8 conns; {added}", ratio >= 0.9 and cpu_met
        rows.append(_compared(scenario, "proxy (redis)", proxied, target, versus, met, **numbers))
    return rows


def miss_tls(ctx: Context) -> list[Row]:
    """The miss as production takes it: the upstream over HTTPS, its certificate verified against a
    CA made for the run (`upstream.ca_file`). A figure, not a target (met stays None, so the summary
    counts issue 13's targets only): it is read against the plain-HTTP miss rows of the same run."""
    upstream = ctx.services.tls_simulator()
    proxy = ctx.services.proxy(
        "proxy-tls", upstream.service.url, ctx.redis.url, ctx.keys, ca_file=upstream.ca_file
    )
    ids = asyncio.run(add_files(upstream.control_url, ctx.keys.upstream_key, ctx.options.miss_files))
    ids_file = ctx.workdir / "miss-tls-ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    rows: list[Row] = []
    for connections in _TLS_MISS_CONNECTIONS:
        scenario = f"miss over TLS (0 ms upstream), {connections} conns"
        httpx.delete(f"{upstream.control_url}/_simulator/requests").raise_for_status()
        direct, proxied = _misses(ctx, upstream.service, proxy, ids_file, connections)
        measured = f"{load_text(proxied)}; {_over_direct(proxied, direct)}"
        rows += [
            _baseline(scenario, "simulator direct (TLS)", direct),
            Row(scenario, "proxy (redis)", "figure only (no target)", measured, None, _numbers(proxied)),
        ]
    return rows


def single_flight(ctx: Context) -> list[Row]:
    count = ctx.options.flight_requests
    file_id = ctx.add_files(1)[0]
    proxy = ctx.proxy_redis
    result = asyncio.run(concurrent_misses(proxy.url, ctx.simulator.url, ctx.proxy_headers(), file_id, count))
    kinds = ", ".join(f"{n} {kind or 'other'}" for kind, n in sorted(result.cache_statuses.items()))
    measured = (
        f"{result.upstream_requests} upstream request(s); {result.ok}/{count} answered 200 ({kinds}) "
        f"in {result.seconds:.2f} s"
    )
    return [
        Row(
            f"{count} concurrent GETs of one uncached file",
            "proxy (redis)",
            "exactly 1 upstream request",
            measured,
            result.upstream_requests == 1 and result.ok == count,
            {"upstream_requests": result.upstream_requests, "ok": result.ok, "requests": count},
        )
    ]


def zipf_mix(ctx: Context) -> list[Row]:
    """The cache as a running service has it: the warm-up replays the same mix with a fast upstream
    and no pauses (so it sees many requests in little bench time); then the upstream takes 150 ms and
    a steady offered load (`mix_rate`, far below saturation, so p50 is the service time and not a
    queue's) is measured, its hits and misses counted by the proxy's own metrics."""
    options = ctx.options
    ids, lists = ctx.mix_files
    extra = {
        "mode": "zipf",
        "ids": str(ids),
        "lists": str(lists),
        "zipf": str(options.zipf_s),
        "list_share": str(options.list_share),
    }
    proxy = ctx.proxy_redis
    listed = _walk_listing(proxy, ctx.proxy_headers())
    warmup = _wrk(ctx, proxy, _HIT_CONNECTIONS, 2 * options.duration_s, extra)
    ctx.forget_requests()
    ctx.set_latency(options.mix_latency_ms)
    try:
        before = _cache_counts(proxy)
        paced = {**extra, "delay_ms": str(_HIT_CONNECTIONS * 1000 / options.mix_rate)}
        result = _wrk(ctx, proxy, _HIT_CONNECTIONS, options.duration_s, paced)
        after = _cache_counts(proxy)
    finally:
        ctx.set_latency(0)
    served = {kind: after.get(kind, 0) - before.get(kind, 0) for kind in after}
    hit_pct = 100 * served.get("hit", 0) / max(1, sum(served.values()))
    scenario = (
        f"Zipf(s={options.zipf_s}) mix over {options.files:,} files, {options.list_share:.0%} list reads, "
        f"{options.mix_latency_ms:.0f} ms upstream, {options.mix_rate:,.0f} req/s offered "
        f"on {_HIT_CONNECTIONS} conns"
    )
    measured = (
        f"{hit_pct:.1f}% from cache after a warm-up of one full listing ({listed:,} files) "
        f"and {warmup.requests:,} requests; "
    ) + load_text(result)
    met = hit_pct >= 90 and result.p50_ms < 2 and result.errors == 0
    numbers = {**_numbers(result), "hit_pct": hit_pct}
    return [Row(scenario, "proxy (redis)", ">= 90% from cache; p50 < 2 ms", measured, met, numbers)]


@dataclass(frozen=True)
class _Round:
    """One transfer straight to the upstream, then the same through the proxy, with the proxy's RSS
    growth during the second."""

    direct: Transfer
    proxied: Transfer
    rss_growth: int

    @property
    def ratio(self) -> float:
        return self.proxied.mb_per_s / self.direct.mb_per_s


def transfer(ctx: Context) -> list[Row]:
    """Each transfer, direct then proxied, in `_TRANSFER_ROUNDS` rounds; the median round's ratio is
    the figure (a 500 MB transfer takes a fraction of a second here, and its speed moves by a third
    either way from one to the next)."""
    size = ctx.options.transfer_bytes
    file_id = ctx.add_files(1, size_bytes=size)[0]
    path = f"/v1/files/{file_id}/content"
    proxy, verify = ctx.proxy_redis, ctx.options.verify_transfers
    mb = f"{size / 1e6:,.0f} MB" if size >= 1e6 else f"{size / 1e3:,.0f} kB"

    def down(url: str, headers: dict[str, str]) -> Transfer:
        return download(url, path, headers, verify=verify)

    def up(url: str, headers: dict[str, str]) -> Transfer:
        return upload(url, headers, size)

    def round_of(send: Callable[[str, dict[str, str]], Transfer]) -> _Round:
        direct = send(ctx.simulator.url, ctx.upstream_headers())
        with RssSampler(proxy.pid) as rss:
            proxied = send(proxy.url, ctx.proxy_headers())
        return _Round(direct, proxied, rss.growth)

    rows = []
    # Issue 13's floors of the proxied rate, as a share of the direct one.
    for kind, send, floor in (("download", down, 0.6), ("upload", up, 0.8)):
        rounds = sorted((round_of(send) for _ in range(_TRANSFER_ROUNDS)), key=lambda r: r.ratio)
        median, growth = rounds[len(rounds) // 2], max(r.rss_growth for r in rounds)
        scenario = f"{mb} {kind}"
        rows.append(
            Row(
                scenario,
                "simulator direct",
                "baseline",
                _transfer_text(median.direct, size),
                None,
                _mb(median.direct),
            )
        )
        complete = all(t.status == 200 and t.size == size for r in rounds for t in (r.direct, r.proxied))
        same = all(r.direct.sha256 == r.proxied.sha256 for r in rounds)  # None == None unless verified
        all_ratios = ", ".join(f"{r.ratio:.2f}" for r in rounds)
        measured = (
            f"{_transfer_text(median.proxied, size)}; {median.ratio:.2f} x direct (median of {len(rounds)}"
            f" rounds: {all_ratios}); RSS +{growth / 2**20:.1f} MB"
        )
        if not same:
            measured += "; BYTES DIFFER"
        met = complete and same and median.ratio >= floor and growth < _RSS_LIMIT
        numbers = {**_mb(median.proxied), "ratio": median.ratio, "rss_growth_mb": growth / 2**20}
        target = f">= {floor} x direct MB/s; RSS growth < 64 MB"
        rows.append(Row(scenario, "proxy (redis)", target, measured, met, numbers))
    return rows


SCENARIOS: dict[str, Scenario] = {
    "metadata-hit": Scenario(metadata_hit, ("wrk", "nginx")),
    "list-hit": Scenario(list_hit, ("wrk",)),
    "miss": Scenario(miss, ("wrk",)),
    "miss-tls": Scenario(miss_tls, ("wrk",)),
    "single-flight": Scenario(single_flight, ()),
    "zipf-mix": Scenario(zipf_mix, ("wrk",)),
    "transfer": Scenario(transfer, ()),
    "noisy-neighbour": Scenario(noisy_neighbour, ()),
}
# What a smoke run (and the test) exercises: the scenarios that need neither wrk nor nginx.
SMOKE_SCENARIOS = ("single-flight", "transfer", "noisy-neighbour")


def _load(
    ctx: Context,
    service: Service,
    path: str | None,
    *,
    connections: int = _HIT_CONNECTIONS,
    direct: bool = False,
    extra: dict[str, str] | None = None,
) -> LoadResult:
    """A warm-up run (fills the cache, opens connections), then the measured one."""
    options = {**({"path": path} if path else {}), **(extra or {})}
    if direct:
        options["key"] = ctx.keys.upstream_key
    _wrk(ctx, service, connections, ctx.options.warmup_s, options)
    return _wrk(ctx, service, connections, ctx.options.duration_s, options)


def _misses(
    ctx: Context, upstream: Service, proxy: Service, ids_file: Path, connections: int
) -> tuple[LoadResult, LoadResult]:
    """The same misses straight to the upstream, then through the proxy: each connection walks its
    own run of `ids_file`, with `Cache-Control: no-cache`."""
    options = _miss_options(ids_file)
    direct = _load(ctx, upstream, None, connections=connections, direct=True, extra=options)
    return direct, _load(ctx, proxy, None, connections=connections, extra=options)


def _miss_options(ids_file: Path) -> dict[str, str]:
    return {"mode": "cycle", "ids": str(ids_file), "nocache": "1"}


def _over_direct(proxied: LoadResult, direct: LoadResult) -> str:
    added_p50, added_p99 = proxied.p50_ms - direct.p50_ms, proxied.p99_ms - direct.p99_ms
    return f"p50 {added_p50:+.2f} ms, p99 {added_p99:+.2f} ms over direct"


def _cpu_ratio(result: LoadResult, baseline: LoadResult) -> float:
    cpu, baseline_cpu = result.server_cpu_us, baseline.server_cpu_us
    return cpu / baseline_cpu if cpu is not None and baseline_cpu else math.inf


def _wrk(
    ctx: Context, service: Service, connections: int, seconds: float, options: dict[str, str]
) -> LoadResult:
    arguments = {"key": ctx.keys.proxy_key, **options}
    cpu_before = _cpu_seconds(service.pid)
    result = run_wrk(service.url, connections=connections, duration_s=seconds, options=arguments)
    cpu_us = (_cpu_seconds(service.pid) - cpu_before) / max(result.requests, 1) * 1e6
    return dataclasses.replace(result, server_cpu_us=cpu_us)


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a server and its children (nginx's workers), so far."""
    parent = psutil.Process(pid)
    times = [process.cpu_times() for process in (parent, *parent.children(recursive=True))]
    return sum(t.user + t.system for t in times)


def _baseline(scenario: str, server: str, result: LoadResult, note: str = "") -> Row:
    measured = load_text(result)
    return Row(scenario, server, "baseline", measured + (f"; {note}" if note else ""), None, _numbers(result))


def _floor_rows(scenario: str, alone: LoadResult, bare: LoadResult) -> list[Row]:
    """The server alone, and bare Starlette with what the framework adds to it."""
    added = f"{_added_cpu_us(bare, alone):.0f} µs of CPU per request over it"
    return [
        _baseline(scenario, "server alone (no framework)", alone),
        _baseline(
            scenario, "bare Starlette", bare, f"{bare.rps / alone.rps:.2f} x the server alone, {added}"
        ),
    ]


def _hit_row(scenario: str, server: str, result: LoadResult, bare: LoadResult, alone: LoadResult) -> Row:
    """A cache hit against the bare framework on the same server: as many requests per second, for no
    more server CPU each (issue 14). What the proxy adds over the server alone is set beside what the
    framework adds: the target holds only where the first is no more than the second."""
    ratio, cpu_ratio = result.rps / bare.rps, _cpu_ratio(result, bare)
    added, framework_added = _added_cpu_us(result, alone), _added_cpu_us(bare, alone)
    return _compared(
        scenario,
        server,
        result,
        ">= 1.0 x bare req/s; server CPU per hit <= bare's",
        f"{ratio:.2f} x bare req/s, {cpu_ratio:.1f} x bare's CPU per hit; {added:.0f} µs over the server"
        f" alone, where Starlette adds {framework_added:.0f}",
        ratio >= 1.0 and cpu_ratio <= 1.0,
        ratio=ratio,
        cpu_ratio=cpu_ratio,
        added_cpu_us=added,
    )


def _added_cpu_us(result: LoadResult, alone: LoadResult) -> float:
    """Server CPU per request above what the server alone took for the same answers."""
    cpu, floor = result.server_cpu_us, alone.server_cpu_us
    return cpu - floor if cpu is not None and floor is not None else math.nan


def _compared(
    scenario: str, server: str, result: LoadResult, target: str, versus: str, met: bool, **numbers: float
) -> Row:
    measured = load_text(result) + f"; {versus}"
    return Row(
        scenario, server, target, measured, met and result.errors == 0, {**_numbers(result), **numbers}
    )


def _numbers(result: LoadResult) -> dict[str, float]:
    numbers = {"rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "errors": result.errors}
    if result.server_cpu_us is not None:
        numbers["server_cpu_us"] = result.server_cpu_us
    return numbers


def _mb(result: Transfer) -> dict[str, float]:
    return {"mb_per_s": result.mb_per_s, "seconds": result.seconds}


def _transfer_text(result: Transfer, size: int) -> str:
    status = (
        "" if result.status == 200 and result.size == size else f" (status {result.status}, {result.size} B)"
    )
    return f"{result.mb_per_s:,.0f} MB/s{status}"


def _walk_listing(proxy: Service, headers: dict[str, str]) -> int:
    """Page through every file once, as `client.files.list()` auto-pagination does: the proxy fills
    its metadata cache from list answers, which is how a running service's cache gets warm."""
    listed, after_id = 0, None
    with httpx.Client(base_url=proxy.url, headers=headers, timeout=60) as client:
        while True:
            params = {"limit": "1000", **({"after_id": after_id} if after_id else {})}
            page = client.get("/v1/files", params=params).raise_for_status().json()
            listed += len(page["data"])
            if not page.get("has_more") or not page["data"]:
                return listed
            after_id = page["last_id"]


def _cache_counts(proxy: Service) -> dict[str, float]:
    """files_proxy_requests_total summed by its `cache` label."""
    counts: dict[str, float] = {}
    for kind, value in _METRIC_LINE.findall(httpx.get(f"{proxy.url}/metrics").text):
        counts[kind] = counts.get(kind, 0) + float(value)
    return counts
