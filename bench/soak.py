"""Load and soak: several tenants send a mixed Files workload through two proxy replicas on one Redis for
a fixed time, with Redis killed and restarted, then the replicas' link to Redis cut while they take
deletes (one replica restarted meanwhile), and the run checks that nothing was lost, mixed or leaked.

    .venv/bin/python -m bench.soak [--duration 60] [--tenants 3] [--concurrency 32]
                                   [--redis-restart-at 0.4] [--redis-down-s 3]
                                   [--partition-at 0.7] [--partition-s 4] [--json] [--workdir DIR]

Every process comes from `bench/services.py`, on free loopback ports: the Files API simulator (any key
is its own workspace), a real redis-server without persistence, a TCP relay in front of it
(`bench/relay.py`, which the soak cuts and restores), and two `files-proxy serve` replicas with one
generated config each (`cache.url` on the relay, a `cache.journal_path` each, one proxy key and
upstream key per tenant, and a rate limit too high to bite, so the limiter's Redis path runs on every
request). The partition lasts until replica 0 has been taken out of the routes, stopped with SIGTERM
(its held invalidations stay in its journal) and started again on its port.

Guarantees checked (the exit status is 1 if one fails; `soak_checks.py` says how):
- cross-tenant answers: 0; stale answers after a delete: 0; keys in any answer or proxy output: none.
- failed requests outside the fault windows (the Redis outage, the partition, each with a grace): 0.
- deleted files served after the partition heals (target 0): no file deleted before the heal is
  answered 200 or listed by either replica afterwards (the workers' reads and a sweep of them all).
- the cache resumes after the heal: every tenant's metadata read is a hit again on both replicas; the
  time from `restore()` is reported.
- proxy RSS growth (of the replica that runs throughout) from warm-up to the end: under `--rss-bound-mib`.

The parts: `soak_cluster.py` (the processes), `soak_workload.py` (what the clients send),
`soak_checks.py` (the invariants, the canaries, the post-heal watch), `soak_report.py` (the report);
this module runs the timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.services import Services
from bench.soak_checks import Canaries, Checks, HealWatch
from bench.soak_cluster import LOCAL_TTL_S, Cluster, Cpu
from bench.soak_report import Measures, Timeline, build, format_report
from bench.soak_workload import Ledger, Routes, Team, Workload, make_teams, seed

__all__ = ["Options", "format_report", "main", "run"]

_RESTARTED = 0  # replica a is restarted during the partition; b runs throughout (its RSS is measured)
# How long after the heal the watch waits for the cache to resume before it reports "never".
_RESUME_LIMIT_S = 30.0


@dataclass(frozen=True, slots=True)
class Options:
    duration_s: float
    tenants: int
    concurrency: int
    redis_restart_at: float
    redis_down_s: float
    partition_at: float
    partition_s: float
    rss_bound_mib: float
    upstream_latency_ms: float
    seed: int


class Soak:
    """The timeline: seed, load until the deadline, and meanwhile the faults; then the report."""

    def __init__(self, options: Options, cluster: Cluster, teams: list[Team]) -> None:
        self.options = options
        self.cluster = cluster
        self.teams = teams
        self.ledger = Ledger()
        self.checks = Checks(teams, self.ledger, LOCAL_TTL_S)
        self.timeline = Timeline()
        self.routes = Routes([replica.url for replica in cluster.replicas])
        self.watch: HealWatch | None = None
        self.canaries: Canaries | None = None
        self.cpu = Cpu(cluster)
        self.rss_start = self.rss_peak = 0
        self._steady = psutil.Process(cluster.replicas[1 - _RESTARTED].pid)

    async def run(self) -> dict[str, Any]:
        options = self.options
        # SIGTERM cancels the run as Ctrl-C does, so that `run` stops every process it started.
        main_task = asyncio.current_task()
        assert main_task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        # The proxy's server closes a connection idle for 5 s (uvicorn's default), and httpx's own
        # default expiry is also 5 s: a request sent on a connection as it is being closed then fails
        # with a reset that the proxy never saw. Clients should expire idle connections first.
        limits = httpx.Limits(
            max_connections=options.concurrency + 8,
            max_keepalive_connections=options.concurrency + 8,
            keepalive_expiry=1.0,
        )
        simulator_url = self.cluster.simulator.url
        async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
            await seed(client, simulator_url, self.teams, self.ledger, options.seed)
            await client.delete(f"{simulator_url}/_simulator/requests")
            started = self.timeline.started_at = self.checks.started_at = time.monotonic()
            cpu_before = self.cpu.seconds()
            deadline = started + options.duration_s
            workload = Workload(
                self.teams,
                self.ledger,
                self.routes,
                self.checks.observe,
                concurrency=options.concurrency,
                seed=options.seed,
            )
            chores = [
                asyncio.create_task(self._restart_redis()),
                asyncio.create_task(self._partition(client)),
                asyncio.create_task(self._sample_rss(deadline)),
                asyncio.create_task(self._clear_simulator_log(client, deadline)),
            ]
            try:
                await workload.run(client, deadline)
                elapsed = time.monotonic() - started
                rss_end = self._steady.memory_info().rss
                cpu = {name: (used - cpu_before[name]) / elapsed for name, used in self.cpu.seconds().items()}
                self.rss_peak = max(self.rss_peak, rss_end)
                await asyncio.gather(*chores)
            finally:
                for chore in chores:
                    chore.cancel()
            metrics = [(await client.get(f"{replica.url}/metrics")).text for replica in self.cluster.replicas]
        self.cluster.stop_replicas()
        outputs = self.cluster.outputs()
        outputs.update({f"/metrics of replica {i}": text for i, text in enumerate(metrics)})
        measures = Measures(
            elapsed_s=elapsed,
            rss_start=self.rss_start,
            rss_end=rss_end,
            rss_peak=self.rss_peak,
            cpu_cores=cpu,
            access_logs=self.cluster.access_logs(),
            outputs=outputs,
        )
        return build(options, self.checks, self.timeline, self.watch, self.canaries, measures)

    async def _restart_redis(self) -> None:
        """Redis killed (SIGKILL: a crash, its data gone) and started again on its port."""
        options = self.options
        if not 0 < options.redis_restart_at < 1:
            return
        await asyncio.sleep(options.duration_s * options.redis_restart_at)
        window = self.checks.open_window("redis outage")
        self.timeline.redis_killed = window.start
        await asyncio.to_thread(self.cluster.kill_redis)
        await asyncio.sleep(options.redis_down_s)
        await asyncio.to_thread(self.cluster.start_redis)
        self.timeline.redis_back = window.end = time.monotonic()

    async def _partition(self, client: httpx.AsyncClient) -> None:
        """Cut the link to Redis while the clients delete; restart replica 0 meanwhile; heal it no
        sooner than `partition_s` after the cut and with the replica back; then watch."""
        options = self.options
        if not 0 < options.partition_at < 1:
            return
        await asyncio.sleep(options.duration_s * options.partition_at)
        self.canaries = Canaries(self.checks, self.routes, client, _RESTARTED)
        await self.canaries.plant()
        window = self.checks.open_window("partition")
        self.timeline.cut = window.start
        await asyncio.to_thread(self.cluster.relay.cut)
        await asyncio.sleep(options.partition_s / 3)
        await self.canaries.delete()
        await self.routes.take_out(_RESTARTED)
        self.cpu.retire(self.cluster.replicas[_RESTARTED])
        self.timeline.replica_out = time.monotonic()
        status, self.timeline.journal_lines = await asyncio.to_thread(self.cluster.stop_replica, _RESTARTED)
        if status != 0:
            self.checks.failed(self.timeline.replica_out, time.monotonic(), f"replica stopped with {status}")
        await asyncio.to_thread(self.cluster.restart_replica, _RESTARTED)
        self.timeline.replica_back = time.monotonic()
        self.routes.put_back(_RESTARTED)
        # The restarted replica takes deletes of its own during the partition too, before the heal.
        await asyncio.sleep(max(0.5, window.start + options.partition_s - time.monotonic()))
        # Heal: from this moment no file deleted so far may be served again.
        self.timeline.restored = window.end = time.monotonic()
        self.checks.healed()
        await asyncio.to_thread(self.cluster.relay.restore)
        self.watch = HealWatch(self.checks, self.routes, client, _RESUME_LIMIT_S)
        await self.watch.run()

    async def _sample_rss(self, deadline: float) -> None:
        warm_up = min(5.0, self.options.duration_s * 0.1)
        await asyncio.sleep(warm_up)
        self.rss_start = self.rss_peak = self._steady.memory_info().rss
        while time.monotonic() < deadline:
            self.rss_peak = max(self.rss_peak, self._steady.memory_info().rss)
            await asyncio.sleep(0.25)

    async def _clear_simulator_log(self, client: httpx.AsyncClient, deadline: float) -> None:
        """The simulator keeps every request it received; drop them now and then to bound its memory."""
        while time.monotonic() < deadline:
            await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(f"{self.cluster.simulator.url}/_simulator/requests")


def run(options: Options, folder: Path | None = None) -> dict[str, Any]:
    """Start everything, soak, tear everything down (also on Ctrl-C), and return the report.

    The configs and the processes' output go to `folder`, kept afterwards; by default a temporary one."""
    with contextlib.ExitStack() as cleanup:
        if folder is None:
            folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="files-proxy-soak-")))
        folder.mkdir(parents=True, exist_ok=True)
        services = cleanup.enter_context(Services(folder))
        teams = make_teams(options.tenants)
        cluster = Cluster(services, teams, options.upstream_latency_ms)
        cluster.start()
        return asyncio.run(Soak(options, cluster, teams).run())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight, over all tenants")
    parser.add_argument(
        "--redis-restart-at",
        type=float,
        default=0.4,
        help="fraction of the run at which Redis is killed (0: never)",
    )
    parser.add_argument(
        "--redis-down-s", type=float, help="seconds Redis stays down (default: 3, or 15%% of a shorter run)"
    )
    parser.add_argument(
        "--partition-at",
        type=float,
        default=0.7,
        help="fraction of the run at which the link to Redis is cut and a replica restarted (0: never)",
    )
    parser.add_argument(
        "--partition-s",
        type=float,
        help=f"seconds the link stays cut, over {LOCAL_TTL_S:g} (default: 4, or 20%% of a shorter run, "
        "at least 1.5); it also lasts until the restarted replica is back",
    )
    parser.add_argument("--rss-bound-mib", type=float, default=64.0, help="largest accepted RSS growth")
    parser.add_argument(
        "--upstream-latency-ms", type=float, default=0.0, help="simulator latency per request"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, help="keep the configs and the processes' logs here")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


def _options(args: argparse.Namespace) -> Options:
    if args.tenants < 2 or args.concurrency < 1 or args.duration <= 0:
        raise SystemExit("bench.soak: needs --tenants >= 2, --concurrency >= 1 and --duration > 0")
    down = args.redis_down_s if args.redis_down_s is not None else min(3.0, args.duration * 0.15)
    cut = args.partition_s if args.partition_s is not None else min(4.0, max(1.5, args.duration * 0.2))
    if 0 < args.partition_at < 1 and cut <= LOCAL_TTL_S:
        # Shorter, and a hit after the heal could be a copy from before the cut, not the store's.
        raise SystemExit(f"bench.soak: --partition-s must be over {LOCAL_TTL_S:g} (cache.local_ttl_s)")
    return Options(
        duration_s=args.duration,
        tenants=args.tenants,
        concurrency=args.concurrency,
        redis_restart_at=args.redis_restart_at,
        redis_down_s=down,
        partition_at=args.partition_at,
        partition_s=cut,
        rss_bound_mib=args.rss_bound_mib,
        upstream_latency_ms=args.upstream_latency_ms,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = _options(args)
    # Before and after the event loop runs, SIGTERM unwinds like Ctrl-C too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run(options, args.workdir)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench.soak: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
