"""Load and soak: several tenants send a mixed Files workload through one proxy for a fixed time, with
Redis killed and restarted in the middle, and the run checks that nothing was lost, mixed or leaked.

    .venv/bin/python -m bench.soak [--duration 60] [--tenants 3] [--concurrency 32]
                                   [--redis-restart-at 0.5] [--redis-down-s 3] [--json] [--workdir DIR]

Everything runs in its own processes on free loopback ports: the Files API simulator (any key is its
own workspace), a real redis-server without persistence, and `files-proxy serve` with a generated
config (`cache.url` on that Redis, one generated proxy key and upstream key per tenant, and a rate
limit too high to bite, so the limiter's Redis path runs on every request).

Guarantees checked (the exit status is 1 if one fails):
- cross-tenant answers: 0. Every file object in an answer carries the asking tenant's filename tag and
  no other tenant's id; other tenants' ids (metadata, download, delete) are 404; downloads match the
  bytes the owner's own key gets straight from the simulator.
- stale answers after a delete through the proxy (metadata 200 or the id in a list page): 0.
- failed requests (a 5xx, a transport error, any status the case does not expect) outside the Redis
  outage window: 0. Failures inside it are reported separately.
- proxy RSS growth from the end of warm-up to the end of the run: under `--rss-bound-mib`.
- no tenant's proxy key or upstream key anywhere in the proxy's stdout (access log), stderr, or
  `/metrics`, nor in any JSON answer.

Upstream requests are counted from the access log (a line with `upstream_ms` made exactly one upstream
request; the proxy never retries), so "saved" is exact: requests sent minus upstream requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import psutil

_BETA = "files-api-2025-04-14"
_VERSION = "2023-06-01"
_MIB = 1024 * 1024
# After Redis answers again the breaker waits out its cooldown (2 s) and the store its timeout (1 s)
# before the first call succeeds; failures this long after the restart still count as "during".
_OUTAGE_GRACE_S = 5.0
_SEEDED_PER_TENANT = 24
_MAX_LIVE_UPLOADS = 40
_EXAMPLES = 10
# Operation mix, per request: read-heavy, as Files traffic is, with enough uploads and deletes to keep
# invalidating list pages. "foreign" cases ask with another tenant's id and must get a 404.
_MIX: dict[str, int] = {
    "metadata": 44,
    "metadata_foreign": 7,
    "metadata_deleted": 4,
    "list": 20,
    "download": 10,
    "download_foreign": 2,
    "upload": 7,
    "delete": 5,
    "delete_foreign": 1,
}


@dataclass(frozen=True, slots=True)
class Options:
    duration_s: float
    tenants: int
    concurrency: int
    redis_restart_at: float
    redis_down_s: float
    rss_bound_mib: float
    upstream_latency_ms: float
    seed: int


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    proxy_key: str
    upstream_key: str

    @property
    def env_name(self) -> str:
        return "SOAK_KEY_" + self.name.upper()


@dataclass(slots=True)
class _WorkerFiles:
    """Files one worker uploaded: only it deletes them, so its expectations never race another's."""

    live: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Tally:
    """What the clients saw, counted as they go (nothing per request is kept but its latency)."""

    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    failed_outside: int = 0
    failed_during: int = 0
    failure_examples: list[str] = field(default_factory=list)
    cross_tenant: int = 0
    cross_tenant_examples: list[str] = field(default_factory=list)
    stale_after_delete: int = 0
    stale_examples: list[str] = field(default_factory=list)
    keys_in_answers: int = 0
    # Ids seen in list pages that were not yet known (an upload of the same tenant still in flight):
    # checked against the owners once every upload has answered.
    unknown_listed: list[tuple[str, str]] = field(default_factory=list)


class _Processes:
    """The simulator, redis-server and the proxy, each in its own process; all stopped on exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.redis_port = _free_port()
        self.simulator_port = _free_port()
        self.proxy_port = _free_port()
        self.simulator_url = f"http://127.0.0.1:{self.simulator_port}"
        self.proxy_url = f"http://127.0.0.1:{self.proxy_port}"
        self.redis: subprocess.Popen[bytes] | None = None
        self.simulator: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.proxy_stdout = folder / "proxy.stdout.log"
        self.proxy_stderr = folder / "proxy.stderr.log"
        self._outputs = contextlib.ExitStack()  # the children's output files, closed in `stop`

    def start(self, teams: list[Team], options: Options) -> None:
        self.start_redis()
        self.simulator = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--log-level", "warning", "simulate"]
            + ["--port", str(self.simulator_port), "--latency-ms", str(options.upstream_latency_ms)],
            stdout=subprocess.DEVNULL,
            stderr=self._output(self.folder / "simulator.log"),
        )
        config = self.folder / "config.toml"
        config.write_text(_config_toml(self.simulator_url, self.redis_port, teams), encoding="utf-8")
        environment = {**os.environ, **{team.env_name: team.upstream_key for team in teams}}
        self.proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(self.proxy_port)],
            stdout=self._output(self.proxy_stdout),
            stderr=self._output(self.proxy_stderr),
            env=environment,
        )
        _wait_http(f"{self.simulator_url}/_simulator/health", self.simulator)
        _wait_http(f"{self.proxy_url}/healthz", self.proxy)

    def _output(self, path: Path) -> BinaryIO:
        return self._outputs.enter_context(path.open("wb"))

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("bench.soak: redis-server is not installed (scripts/ensure-redis-server)")
        self.redis = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            cwd=self.folder,
        )
        deadline = time.monotonic() + 10
        while not _redis_answers(self.redis_port):
            if time.monotonic() > deadline or self.redis.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill_redis(self) -> None:
        if self.redis is not None:
            self.redis.send_signal(signal.SIGKILL)
            self.redis.wait()
            self.redis = None

    def stop_proxy(self) -> None:
        """SIGTERM, so the proxy drains and flushes its access log before exiting."""
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()

    def stop(self) -> None:
        self.stop_proxy()
        if self.simulator is not None and self.simulator.poll() is None:
            self.simulator.send_signal(signal.SIGTERM)
            try:
                self.simulator.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.simulator.kill()
                self.simulator.wait()
        self.kill_redis()
        self._outputs.close()


class Soak:
    def __init__(self, options: Options, processes: _Processes, teams: list[Team]) -> None:
        self.options = options
        self.processes = processes
        self.teams = teams
        self.tally = _Tally()
        # Every id the run knows of, and whose it is; seeded content digests for downloads.
        self.owner: dict[str, str] = {}
        self.seeded: dict[str, list[str]] = {team.name: [] for team in teams}
        self.digests: dict[str, str] = {}
        self.killed_at: float | None = None
        self.back_at: float | None = None
        self.started_at = 0.0
        self.rss_start = self.rss_peak = 0
        self._proxy = psutil.Process(processes.proxy.pid) if processes.proxy else None
        self._secrets = {
            secret: f"{team.name} {kind}"
            for team in teams
            for kind, secret in (("proxy key", team.proxy_key), ("upstream key", team.upstream_key))
        }

    async def seed(self, client: httpx.AsyncClient) -> None:
        """Files per tenant, made in the simulator as the owner, and the bytes the owner downloads."""
        rng = random.Random(self.options.seed)
        for team in self.teams:
            for number in range(_SEEDED_PER_TENANT):
                spec = {
                    "api_key": team.upstream_key,
                    "filename": f"{team.name}-seed-{number}.bin",
                    "size_bytes": rng.randint(256, 32 * 1024),
                    "downloadable": True,
                }
                made = await client.post(f"{self.processes.simulator_url}/_simulator/files", json=spec)
                file_id = made.raise_for_status().json()["id"]
                content = await client.get(
                    f"{self.processes.simulator_url}/v1/files/{file_id}/content",
                    headers={"x-api-key": team.upstream_key, "anthropic-version": _VERSION},
                )
                self.digests[file_id] = hashlib.sha256(content.raise_for_status().content).hexdigest()
                self.owner[file_id] = team.name
                self.seeded[team.name].append(file_id)

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
            max_connections=options.concurrency,
            max_keepalive_connections=options.concurrency,
            keepalive_expiry=1.0,
        )
        async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
            await self.seed(client)
            await client.delete(f"{self.processes.simulator_url}/_simulator/requests")
            self.started_at = time.monotonic()
            cpu_before = self._cpu_seconds()
            deadline = self.started_at + options.duration_s
            workers = [
                asyncio.create_task(
                    self._worker(
                        client, self.teams[i % len(self.teams)], random.Random(options.seed + i), deadline
                    )
                )
                for i in range(options.concurrency)
            ]
            chores = [
                asyncio.create_task(self._restart_redis()),
                asyncio.create_task(self._sample_rss(deadline)),
                asyncio.create_task(self._clear_simulator_log(client, deadline)),
            ]
            await asyncio.gather(*workers)
            elapsed = time.monotonic() - self.started_at
            rss_end = self._rss()
            cpu = {name: (used - cpu_before[name]) / elapsed for name, used in self._cpu_seconds().items()}
            self.rss_peak = max(self.rss_peak, rss_end)
            await asyncio.gather(*chores)
            metrics = (await client.get(f"{self.processes.proxy_url}/metrics")).text
        self.processes.stop_proxy()
        return self._report(elapsed, rss_end, metrics, cpu)

    async def _worker(
        self, client: httpx.AsyncClient, team: Team, rng: random.Random, deadline: float
    ) -> None:
        mine = _WorkerFiles()
        kinds, weights = list(_MIX), list(_MIX.values())
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind == "delete" and not mine.live or len(mine.live) >= _MAX_LIVE_UPLOADS:
                kind = "upload" if not mine.live else "delete"
            if kind == "metadata_deleted" and not mine.deleted:
                kind = "metadata"
            await self._one(client, team, kind, rng, mine)

    async def _one(
        self, client: httpx.AsyncClient, team: Team, kind: str, rng: random.Random, mine: _WorkerFiles
    ) -> None:
        own = self.seeded[team.name]
        foreign = rng.choice([self.seeded[t.name] for t in self.teams if t is not team] or [own])
        beta = rng.random() < 0.3
        method, path, expected = "GET", "/v1/files", 200
        params: dict[str, str] = {}
        upload: dict[str, tuple[str, bytes, str]] | None = None
        file_id = ""
        if kind == "metadata":
            file_id = rng.choice(mine.live) if mine.live and rng.random() < 0.3 else rng.choice(own)
            path = f"/v1/files/{file_id}"
        elif kind == "metadata_foreign":
            file_id, expected = rng.choice(foreign), 404
            path = f"/v1/files/{file_id}"
        elif kind == "metadata_deleted":
            file_id, expected = rng.choice(mine.deleted), 404
            path = f"/v1/files/{file_id}"
        elif kind == "list":
            limit = rng.choice(["", "5", "20", "100"])
            params = {"limit": limit} if limit else {}
        elif kind in ("download", "download_foreign"):
            file_id = rng.choice(own if kind == "download" else foreign)
            path, expected = f"/v1/files/{file_id}/content", 200 if kind == "download" else 404
        elif kind == "upload":
            method = "POST"
            name = f"{team.name}-up-{secrets.token_hex(4)}.txt"
            upload = {"file": (name, b"soak %s\n" % name.encode() * rng.randint(1, 64), "text/plain")}
        elif kind == "delete":
            method, file_id = "DELETE", mine.live.pop(rng.randrange(len(mine.live)))
            path = f"/v1/files/{file_id}"
        else:  # delete_foreign
            method, file_id, expected = "DELETE", rng.choice(foreign), 404
            path = f"/v1/files/{file_id}"
        deleted_before = frozenset(mine.deleted)
        headers = {"anthropic-version": _VERSION}
        if beta:
            headers["anthropic-beta"] = _BETA
        if rng.random() < 0.5:
            headers["x-api-key"] = team.proxy_key
        else:
            headers["authorization"] = f"Bearer {team.proxy_key}"
        started = time.monotonic()
        try:
            response = await client.request(
                method, self.processes.proxy_url + path, params=params, headers=headers, files=upload
            )
            status, body = response.status_code, response.content
        except httpx.HTTPError as exc:
            status, body = None, type(exc).__name__.encode()
        ended = time.monotonic()
        self.tally.latencies_ms.append((ended - started) * 1000)
        label = str(status) if status is not None else body.decode()
        self.tally.by_kind.setdefault(kind, Counter())[label] += 1
        if status == 200 and kind == "upload":
            uploaded = json.loads(body)["id"]
            self.owner.setdefault(uploaded, team.name)
            mine.live.append(uploaded)
        if status in (200, 404) and kind == "delete":
            mine.deleted.append(file_id)
        if status is not None and not kind.startswith("download"):
            self._check_answer(team, kind, file_id, status, body, deleted_before)
        elif status == 200 and kind.startswith("download"):
            if (
                hashlib.sha256(body).hexdigest() != self.digests.get(file_id)
                or self.owner[file_id] != team.name
            ):
                self._cross_tenant(f"{team.name} {kind} {file_id}: bytes are not the owner's content")
        if status != expected:
            self._failed(started, ended, f"{team.name} {method} {kind}: {label} (expected {expected})")

    def _check_answer(
        self, team: Team, kind: str, file_id: str, status: int, body: bytes, deleted_before: frozenset[str]
    ) -> None:
        text = body.decode("utf-8", "replace")
        if any(secret in text for secret in self._secrets):
            self.tally.keys_in_answers += 1
        if status != 200:
            return
        try:
            answer = json.loads(body)
        except ValueError:
            self._failed(0, 0, f"{team.name} {kind}: a 200 that is not JSON")
            return
        objects = answer.get("data", []) if kind == "list" else [answer]
        for item in objects:
            if item.get("type") == "file_deleted":
                continue
            item_id, filename = item.get("id", ""), str(item.get("filename", ""))
            owner = self.owner.get(item_id)
            if not filename.startswith(team.name + "-") or owner not in (None, team.name):
                self._cross_tenant(f"{team.name} {kind}: got {item_id} ({filename}) owned by {owner}")
            elif owner is None:
                self.tally.unknown_listed.append((team.name, item_id))
            if item_id in deleted_before:
                self.tally.stale_after_delete += 1
                if len(self.tally.stale_examples) < _EXAMPLES:
                    self.tally.stale_examples.append(f"{team.name} {kind}: {item_id} after its delete")
        if kind.endswith("foreign"):
            self._cross_tenant(f"{team.name} {kind} {file_id}: answered 200 for another tenant's file")

    def _cross_tenant(self, what: str) -> None:
        self.tally.cross_tenant += 1
        if len(self.tally.cross_tenant_examples) < _EXAMPLES:
            self.tally.cross_tenant_examples.append(what)

    def _failed(self, started: float, ended: float, what: str) -> None:
        during = self.killed_at is not None and ended >= self.killed_at
        during = during and (self.back_at is None or started <= self.back_at + _OUTAGE_GRACE_S)
        if during:
            self.tally.failed_during += 1
        else:
            self.tally.failed_outside += 1
        if len(self.tally.failure_examples) < _EXAMPLES:
            when = time.monotonic() - self.started_at
            self.tally.failure_examples.append(f"t={when:.1f}s{' (outage)' if during else ''} {what}")

    async def _restart_redis(self) -> None:
        options = self.options
        if not 0 < options.redis_restart_at < 1:
            return
        await asyncio.sleep(options.duration_s * options.redis_restart_at)
        self.killed_at = time.monotonic()
        self.processes.kill_redis()
        await asyncio.sleep(options.redis_down_s)
        await asyncio.to_thread(self.processes.start_redis)
        self.back_at = time.monotonic()

    async def _sample_rss(self, deadline: float) -> None:
        warm_up = min(5.0, self.options.duration_s * 0.1)
        await asyncio.sleep(warm_up)
        self.rss_start = self.rss_peak = self._rss()
        while time.monotonic() < deadline:
            self.rss_peak = max(self.rss_peak, self._rss())
            await asyncio.sleep(0.25)

    async def _clear_simulator_log(self, client: httpx.AsyncClient, deadline: float) -> None:
        """The simulator keeps every request it received; drop them now and then to bound its memory."""
        while time.monotonic() < deadline:
            await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            with contextlib.suppress(httpx.HTTPError):
                await client.delete(f"{self.processes.simulator_url}/_simulator/requests")

    def _rss(self) -> int:
        return int(self._proxy.memory_info().rss) if self._proxy is not None else 0

    def _cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by the proxy, the simulator, this client and the whole machine (which
        tells whether something else shared the cores during the run)."""
        used = {"proxy": 0.0, "simulator": 0.0, "soak client": time.process_time()}
        for name, process in (("proxy", self.processes.proxy), ("simulator", self.processes.simulator)):
            if process is not None:
                times = psutil.Process(process.pid).cpu_times()
                used[name] = float(times.user + times.system)
        machine = psutil.cpu_times()
        used["whole machine"] = float(machine.user + machine.system + machine.nice)
        return used

    def _report(self, elapsed: float, rss_end: int, metrics: str, cpu: dict[str, float]) -> dict[str, Any]:
        tally, options = self.tally, self.options
        for team_name, item_id in tally.unknown_listed:
            if self.owner.get(item_id) != team_name:
                self._cross_tenant(f"{team_name} list: {item_id} is not one of its files")
        logged, upstream, hits = _read_access_log(self.processes.proxy_stdout)
        outputs = {
            "stdout": self.processes.proxy_stdout.read_text("utf-8", "replace"),
            "stderr": self.processes.proxy_stderr.read_text("utf-8", "replace"),
            "/metrics": metrics,
        }
        leaked = sorted(
            f"{name} in {where}"
            for secret, name in self._secrets.items()
            for where, text in outputs.items()
            if secret in text
        )
        sent = sum(sum(counts.values()) for counts in tally.by_kind.values())
        growth = (rss_end - self.rss_start) / _MIB
        latencies = sorted(tally.latencies_ms) or [0.0]
        window = None
        if self.killed_at is not None:
            back = self.back_at if self.back_at is not None else self.killed_at
            window = [
                round(self.killed_at - self.started_at, 2),
                round(back - self.started_at + _OUTAGE_GRACE_S, 2),
            ]
        guarantees = {
            "no cross-tenant answer": tally.cross_tenant == 0,
            "no stale answer after a delete": tally.stale_after_delete == 0,
            "no failure outside the Redis outage": tally.failed_outside == 0,
            f"RSS growth under {options.rss_bound_mib:g} MiB": growth < options.rss_bound_mib,
            "no key in the proxy's output": not leaked,
            "no key in any answer": tally.keys_in_answers == 0,
            "upstream requests saved": sent - upstream > 0,
        }
        return {
            "duration_s": round(elapsed, 2),
            "tenants": options.tenants,
            "concurrency": options.concurrency,
            "seed": options.seed,
            "sent": sent,
            "per_second": round(sent / elapsed, 1) if elapsed else 0.0,
            "by_kind": {kind: dict(sorted(counts.items())) for kind, counts in sorted(tally.by_kind.items())},
            "failed": tally.failed_outside + tally.failed_during,
            "failed_outside_outage": tally.failed_outside,
            "failed_during_outage": tally.failed_during,
            "failure_examples": tally.failure_examples,
            "cross_tenant": tally.cross_tenant,
            "cross_tenant_examples": tally.cross_tenant_examples,
            "stale_after_delete": tally.stale_after_delete,
            "stale_examples": tally.stale_examples,
            "keys_leaked": leaked,
            "keys_in_answers": tally.keys_in_answers,
            "redis": {
                "killed_at_s": None if self.killed_at is None else round(self.killed_at - self.started_at, 2),
                "back_at_s": None if self.back_at is None else round(self.back_at - self.started_at, 2),
                "outage_window_s": window,
            },
            "rss_mib": {
                "start": round(self.rss_start / _MIB, 1),
                "end": round(rss_end / _MIB, 1),
                "peak": round(self.rss_peak / _MIB, 1),
                "growth": round(growth, 1),
                "bound": options.rss_bound_mib,
            },
            "upstream": {
                "logged": logged,
                "requests": upstream,
                "saved": sent - upstream,
                "saved_ratio": round((sent - upstream) / sent, 3) if sent else 0.0,
                "cache_hits": hits,
            },
            "latency_ms": {
                "p50": round(latencies[len(latencies) // 2], 2),
                "p99": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
                "max": round(latencies[-1], 2),
            },
            # Cores busy on average: the client is in the same budget, so a slow run says which one was.
            "cpu_cores": {name: round(value, 2) for name, value in cpu.items()},
            "guarantees": guarantees,
            "ok": all(guarantees.values()),
        }


def _read_access_log(path: Path) -> tuple[int, int, int]:
    """Access lines, the ones that made an upstream request (`upstream_ms` set), and cache hits."""
    logged = upstream = hits = 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "request_id" not in record:
                continue
            logged += 1
            upstream += record.get("upstream_ms") is not None
            hits += record.get("cache") == "hit"
    return logged, upstream, hits


def _config_toml(simulator_url: str, redis_port: int, teams: list[Team]) -> str:
    tenants = "".join(
        f'[[tenants]]\nname = "{team.name}"\nworkspace = "{team.name}-ws"\napi_key_env = "{team.env_name}"\n'
        f'client_key_sha256 = ["{hashlib.sha256(team.proxy_key.encode()).hexdigest()}"]\n'
        # High enough never to answer 429, so the limiter's store path runs on every request.
        "rate_limit_per_minute = 60000000\nrate_limit_burst = 1000000\n\n"
        for team in teams
    )
    return (
        f'[upstream]\nbase_url = "{simulator_url}"\nread_timeout_s = 10\n\n'
        f'[cache]\nurl = "redis://127.0.0.1:{redis_port}/0"\n\n'
        "[server]\nshutdown_grace_s = 5\n\n[usage]\nflush_interval_s = 1\n\n" + tenants
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_http(url: str, process: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.05)


def make_teams(count: int) -> list[Team]:
    """Fresh keys for each run, so a key found in the output can only have come from this run."""
    return [
        Team(f"team{i}", "fp-soak-" + secrets.token_urlsafe(18), "sk-ant-soak-" + secrets.token_hex(16))
        for i in range(count)
    ]


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown: a summary table, requests by kind and status, and what failed."""
    rss, upstream, redis = report["rss_mib"], report["upstream"], report["redis"]
    window = report["redis"]["outage_window_s"]
    rows = [
        (
            "duration",
            f"{report['duration_s']} s, {report['tenants']} tenants, concurrency {report['concurrency']}",
        ),
        ("requests sent", f"{report['sent']} ({report['per_second']}/s)"),
        ("failed", str(report["failed"])),
        ("  outside the Redis outage (must be 0)", str(report["failed_outside_outage"])),
        ("  during the Redis outage", str(report["failed_during_outage"])),
        ("cross-tenant answers (must be 0)", str(report["cross_tenant"])),
        ("stale answers after a delete (must be 0)", str(report["stale_after_delete"])),
        (
            "keys in proxy output / in answers (must be none)",
            f"{len(report['keys_leaked'])} / {report['keys_in_answers']}",
        ),
        (
            "Redis killed / back / outage window",
            f"{redis['killed_at_s']} s / {redis['back_at_s']} s / {window} s",
        ),
        ("proxy RSS start / end / peak", f"{rss['start']} / {rss['end']} / {rss['peak']} MiB"),
        ("proxy RSS growth (bound)", f"{rss['growth']} MiB (< {rss['bound']:g} MiB)"),
        ("upstream requests", f"{upstream['requests']} (access lines: {upstream['logged']})"),
        ("upstream requests saved", f"{upstream['saved']} ({upstream['saved_ratio']:.1%} of requests sent)"),
        ("cache hits", str(upstream["cache_hits"])),
        (
            f"CPU cores busy: {' / '.join(report['cpu_cores'])}",
            " / ".join(map(str, report["cpu_cores"].values())),
        ),
        (
            "latency p50 / p99 / max",
            " / ".join(f"{report['latency_ms'][k]} ms" for k in ("p50", "p99", "max")),
        ),
    ]
    lines = ["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    lines += ["", "| kind | answers by status |", "|---|---|"]
    lines += [
        f"| {kind} | {', '.join(f'{status}: {n}' for status, n in counts.items())} |"
        for kind, counts in report["by_kind"].items()
    ]
    lines += ["", "| guarantee | |", "|---|---|"]
    lines += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in report["guarantees"].items()]
    for title, key in (
        ("failures", "failure_examples"),
        ("cross-tenant", "cross_tenant_examples"),
        ("stale after delete", "stale_examples"),
        ("keys found", "keys_leaked"),
    ):
        if report[key]:
            lines += ["", f"First {title}:", *(f"- {line}" for line in report[key])]
    return "\n".join(lines)


def run(options: Options, folder: Path | None = None) -> dict[str, Any]:
    """Start everything, soak, tear everything down (also on Ctrl-C), and return the report.

    The config and the proxy's output go to `folder`, kept afterwards; by default a temporary one."""
    with contextlib.ExitStack() as cleanup:
        if folder is None:
            folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="files-proxy-soak-")))
        folder.mkdir(parents=True, exist_ok=True)
        processes = _Processes(folder)
        teams = make_teams(options.tenants)
        try:
            processes.start(teams, options)
            return asyncio.run(Soak(options, processes, teams).run())
        finally:
            processes.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight, over all tenants")
    parser.add_argument(
        "--redis-restart-at",
        type=float,
        default=0.5,
        help="fraction of the run at which Redis is killed (0: never)",
    )
    parser.add_argument(
        "--redis-down-s", type=float, help="seconds Redis stays down (default: 3, or 15%% of a shorter run)"
    )
    parser.add_argument("--rss-bound-mib", type=float, default=64.0, help="largest accepted RSS growth")
    parser.add_argument(
        "--upstream-latency-ms", type=float, default=0.0, help="simulator latency per request"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, help="keep the config and the proxy's logs here")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


def _options(args: argparse.Namespace) -> Options:
    if args.tenants < 2 or args.concurrency < 1 or args.duration <= 0:
        raise SystemExit("bench.soak: needs --tenants >= 2, --concurrency >= 1 and --duration > 0")
    down = args.redis_down_s if args.redis_down_s is not None else min(3.0, args.duration * 0.15)
    return Options(
        duration_s=args.duration,
        tenants=args.tenants,
        concurrency=args.concurrency,
        redis_restart_at=args.redis_restart_at,
        redis_down_s=down,
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
