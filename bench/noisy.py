"""The noisy-neighbour scenario of issue 12: one team attacks the shared proxy while another (the
victim) reads a cached file's metadata; does the victim notice?

Two tenants, each with its own proxy key and Anthropic key, on one `files-proxy serve` (shipped
defaults, the simulator upstream, a real redis-server). First a window without attack, then one per
attack (`bench.attacks`), each on a fresh proxy, so that memory one attack leaves is not charged to
the next; the proxy's RSS is sampled throughout. The stalled-stdout attack's proxy has a pipe nobody
reads as its stdout, and is stopped with SIGTERM at the end.

In every window a control runs beside it: an identical proxy on a Redis of its own, with the same
victim load and no attack. The target compares the victim's p99 with the control's in the same
window, so both met the same machine: on this VM the hypervisor's steal changes from 3% to 22%
within a minute, and a p99 measured a minute earlier can be half or twice as large with nothing
else changed. What the attack does to the machine as a whole (the attacking client and the
simulator share its two cores) reaches the control too; what it does to the proxy it is sent to,
its loop, its memory or its Redis, only the victim. The ratio to the window without attack is
reported beside it.

The victim keeps a fixed schedule: 8 kept-alive connections, a request due on each every 10 ms.
Latency is timed from when a request was due, not from when it could be sent, so a stall counts for
every request it delays (no coordinated omission), and a request not answered within 10 s of its time
is an error. The victim and the attacker each run in a process of their own, the attacker at a lower
CPU priority, so the bench's own client work does not delay the victim's clock.

Each proxy starts with the usual open-files soft limit of 1024 (a login shell's or systemd's), not the
bench's raised one: whether it raises its own is part of what is measured. The window is twice
`--duration` (12 s), past the proxy's 10 s header timeout, so that what it closes shows; a shorter
window (the smoke run's) gets the attacks at 1/100 of their counts and sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import httpx
import psutil
import redis

from bench.attacks import (
    MB,
    AttackFunction,
    Target,
    hit_flood,
    huge_header,
    idle_connections,
    list_flood,
    memo_flood,
    read_response,
    request_head,
    slow_headers,
    unfinished_headers,
    websocket_upgrades,
)
from bench.context import Context
from bench.machine import StolenTime
from bench.seed import add_files
from bench.services import Keys, free_port
from bench.table import Row
from bench.transfer import RssSampler
from proxy.config import hash_key

_VICTIM_CONNECTIONS = 8
_VICTIM_INTERVAL_S = 0.01
_VICTIM_TIMEOUT_S = 10.0
_VICTIM_START_S = 0.5  # for the victim's and the attacker's processes to start
# The attacking client's CPU priority: on a small machine its own work (the bench's, not the proxy's)
# must not starve the victim's clock; the proxy still gets every request it can send.
_ATTACKER_NICE = 10
_P99_RATIO = 3.0
_RSS_LIMIT = 300 * 2**20
_HEADER_TIMEOUT_S = 10.0  # the proxy's default `server.header_timeout_s`
_SMOKE_SCALE = 0.01
_NOISY_FILES = 50  # the attacking team's files: 50 cursors x 1,000 limits = 50,000 list queries
_USUAL_SOFT_FDS = 1024
# The stalled-stdout proxy's shutdown grace (the only setting not left at its default), so that a
# shutdown that hangs costs the run seconds, not the default 30 s.
_STALLED_GRACE_S = 5
_SIGTERM_SLACK_S = 5.0
_FILES_PROXY = Path(sys.executable).with_name("files-proxy")
_T = TypeVar("_T")
_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_TEAMS = (("victim", "BENCH_VICTIM_UPSTREAM_KEY"), ("noisy", "BENCH_NOISY_UPSTREAM_KEY"))


@dataclass(frozen=True)
class Attack:
    label: str  # at full size
    run: AttackFunction
    stalled_stdout: bool = False


ATTACKS = (
    Attack("one 96 MB header section, sent as fast as the socket takes it", huge_header),
    Attack("six unfinished 64 MB header sections", unfinished_headers),
    Attack("5,000 idle connections", idle_connections),
    Attack("300 slow header sections, a byte every 4 s each", slow_headers),
    Attack(
        "a 24 MB anthropic-beta, then 256 distinct large anthropic-beta/version values and 4,096 "
        "large query strings, valid key",
        memo_flood,
    ),
    Attack("50,000 distinct valid list queries (limit, after_id), 4 conns", list_flood),
    Attack("2,000 WebSocket upgrade requests, half with a valid key", websocket_upgrades),
    Attack(
        "stdout a pipe nobody reads (a proxy of its own, SIGTERM after), the team's hits on 4 conns",
        hit_flood,
        stalled_stdout=True,
    ),
)


@dataclass(frozen=True)
class VictimPlan:
    host: str
    port: int
    head: bytes
    start_at: float  # time.monotonic(): one clock for every process on the machine
    warmup_s: float
    window_s: float


@dataclass(frozen=True)
class VictimResult:
    answered: int
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass(frozen=True)
class Window:
    victim: VictimResult
    peak_rss: int
    redis_growth: int
    control: VictimResult  # the same load, in the same window, on an identical proxy not attacked
    attack: str  # what the attack did, in its own words
    exit_code: int | None  # the proxy's, if it died during the window
    sigterm_s: float | None = None  # how long SIGTERM took to end the stalled-stdout proxy (None: it did not)
    stolen: float = 0.0  # the hypervisor's share of the machine's CPU time over the window

    @property
    def p99_ratio(self) -> float:
        """The victim's p99 against the control's: the target's measure."""
        return self.victim.p99_ms / self.control.p99_ms


def noisy_neighbour(ctx: Context) -> list[Row]:
    """The victim alone, then under each attack: a row each."""
    window_s = 2 * ctx.options.duration_s
    scale = 1.0 if window_s > _HEADER_TIMEOUT_S else _SMOKE_SCALE
    noisy = Keys("fp-noisy-" + secrets.token_urlsafe(24), "sk-ant-noisy-" + secrets.token_hex(16))
    files = asyncio.run(add_files(ctx.simulator.url, noisy.upstream_key, _NOISY_FILES))
    control_redis = ctx.services.redis()
    run = _Run(ctx, noisy, tuple(files), window_s, ctx.options.warmup_s / 2, scale, control_redis.url)
    size = "" if scale == 1 else f" (at 1/{1 / scale:g} size)"
    alone = run.window(None)
    rows = [_baseline_row(alone)]
    for attack in ATTACKS:
        print(f"bench: noisy-neighbour: {attack.run.__name__} ...", file=sys.stderr, flush=True)
        rows.append(_row(f"noisy neighbour: {attack.label}{size}", attack, run.window(attack), alone))
    return rows


def _run_victim(plan: VictimPlan) -> VictimResult:
    """The victim team's window (in its own process)."""
    return asyncio.run(_victim(plan))


def _run_attack(attack: AttackFunction, target: Target, start_at: float, deadline: float) -> str:
    """One attack, from `start_at` to `deadline` (in the attacker's own process)."""
    time.sleep(max(0.0, start_at - time.monotonic()))
    return asyncio.run(attack(target, deadline))


class _Child(Generic[_T]):
    """`function(*args)` in a forked process, its result read back through a pipe. Forked, not
    spawned: nothing to import again, and no multiprocessing helper process left behind. Each is
    forked before the window's sampling thread starts, so never beside a thread that could hold a lock."""

    def __init__(self, function: Callable[..., _T], *args: Any, nice: int = 0) -> None:
        fork = multiprocessing.get_context("fork")
        self._results, sender = fork.Pipe(duplex=False)
        self._process = fork.Process(target=_child_main, args=(sender, nice, function, args), daemon=True)
        self._process.start()
        sender.close()

    def __enter__(self) -> _Child[_T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Ended whatever happened: SIGTERM, then SIGKILL if it lingers."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
        self._process.join()
        self._process.close()
        self._results.close()

    def result(self, timeout_s: float) -> _T:
        if not self._results.poll(max(0.0, timeout_s)):
            raise RuntimeError(f"the noisy-neighbour child gave no result within {timeout_s:.0f} s")
        ok, value = self._results.recv()
        if not ok:
            raise RuntimeError(f"the noisy-neighbour child failed:\n{value}")
        return cast(_T, value)


def _child_main(
    results: Connection, nice: int, function: Callable[..., object], args: tuple[Any, ...]
) -> None:
    os.nice(nice)
    try:
        results.send((True, function(*args)))
    except Exception:
        results.send((False, traceback.format_exc()))
    finally:
        results.close()


class _Run:
    def __init__(
        self,
        ctx: Context,
        noisy: Keys,
        files: tuple[str, ...],
        window_s: float,
        warmup_s: float,
        scale: float,
        control_redis_url: str,
    ) -> None:
        self.ctx, self.noisy, self.files, self.scale = ctx, noisy, files, scale
        self.control_redis_url = control_redis_url
        self.window_s, self.warmup_s = window_s, warmup_s
        self.victim_path = f"/v1/files/{ctx.hit_file}"
        self.count = 0

    def window(self, attack: Attack | None) -> Window:
        """A fresh proxy and a fresh control; the victim's warm-up on each, then its measured window
        on both, the attack running on the first."""
        self.count += 1
        stalled = attack is not None and attack.stalled_stdout
        name = f"noisy-{self.count}"
        with (
            self._proxy(name, self.ctx.redis.url, stalled_stdout=stalled) as (port, process),
            self._proxy(f"{name}-control", self.control_redis_url, stalled_stdout=False) as (control_port, _),
        ):
            for warmed in (port, control_port):
                _warm(f"http://127.0.0.1:{warmed}", self.ctx.proxy_headers(), self.victim_path)
            start_at = time.monotonic() + _VICTIM_START_S
            plan, control_plan = (self._victim_plan(at, start_at) for at in (port, control_port))
            attack_from = start_at + self.warmup_s
            deadline = attack_from + self.window_s
            target = Target("127.0.0.1", port, self.noisy.proxy_key, self.files, self.scale)
            redis_before = self._redis_used()
            with contextlib.ExitStack() as children, StolenTime() as steal:
                victim = children.enter_context(_Child(_run_victim, plan))
                control = children.enter_context(_Child(_run_victim, control_plan))
                attacker = None
                if attack is not None:
                    run = (_run_attack, attack.run, target, attack_from, deadline)
                    attacker = children.enter_context(_Child(*run, nice=_ATTACKER_NICE))
                with _PeakRss(process.pid) as rss:
                    did = "" if attacker is None else attacker.result(deadline - time.monotonic() + 60)
                    result = victim.result(deadline - time.monotonic() + _VICTIM_TIMEOUT_S + 60)
                    control_result = control.result(deadline - time.monotonic() + _VICTIM_TIMEOUT_S + 60)
            exit_code = process.poll()
            sigterm_s = _stop(process, _STALLED_GRACE_S + _SIGTERM_SLACK_S) if stalled else None
        growth = self._redis_used() - redis_before
        self.ctx.forget_requests()
        return Window(result, rss.peak_rss, growth, control_result, did, exit_code, sigterm_s, steal.share)

    def _victim_plan(self, port: int, start_at: float) -> VictimPlan:
        head = request_head(f"127.0.0.1:{port}", self.victim_path, self.ctx.proxy_headers())
        return VictimPlan("127.0.0.1", port, head, start_at, self.warmup_s, self.window_s)

    @contextlib.contextmanager
    def _proxy(
        self, name: str, cache_url: str, *, stalled_stdout: bool
    ) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
        """`files-proxy serve` for both teams, stopped on the way out whatever happens."""
        workdir, port = self.ctx.workdir, free_port()
        config = workdir / f"{name}.toml"
        config.write_text(self._config(cache_url, _STALLED_GRACE_S if stalled_stdout else None))
        soft = min(_USUAL_SOFT_FDS, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        serve = [str(_FILES_PROXY), "serve", "--config", str(config), "--port", str(port)]
        command = ["/bin/sh", "-c", f'ulimit -Sn {soft} && exec "$@"', "sh", *serve]
        env = {
            **os.environ,
            _TEAMS[0][1]: self.ctx.keys.upstream_key,
            _TEAMS[1][1]: self.noisy.upstream_key,
        }
        stderr_path = workdir / f"{name}.stderr"
        with contextlib.ExitStack() as files:
            stdout = (
                subprocess.PIPE
                if stalled_stdout
                else files.enter_context((workdir / f"{name}.access.log").open("wb"))
            )
            stderr = files.enter_context(stderr_path.open("wb"))
            process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
        try:
            _wait_ready(f"http://127.0.0.1:{port}/healthz", process, stderr_path)
            yield port, process
        finally:
            _stop(process, 10)
            if process.stdout is not None:
                process.stdout.close()

    def _config(self, cache_url: str, grace_s: int | None) -> str:
        server = "" if grace_s is None else f"[server]\nshutdown_grace_s = {grace_s}\n\n"
        tenants = "".join(
            f'[[tenants]]\nname = "{name}"\nworkspace = "{name}"\napi_key_env = "{env}"\n'
            f'client_key_sha256 = ["{hash_key(keys.proxy_key)}"]\n\n'
            for (name, env), keys in zip(_TEAMS, (self.ctx.keys, self.noisy), strict=True)
        )
        return (
            f'[upstream]\nbase_url = "{self.ctx.simulator.url}"\n\n'
            f'[cache]\nurl = "{cache_url}"\n\n{server}{tenants}'
        )

    def _redis_used(self) -> int:
        client = redis.Redis.from_url(self.ctx.redis.url)
        try:
            return int(client.info("memory")["used_memory"])
        finally:
            client.close()


class _PeakRss(RssSampler):
    """An RSS sampler that outlives its process: a proxy an attack kills keeps the peak it reached."""

    def _run(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            super()._run()


async def _victim(plan: VictimPlan) -> VictimResult:
    runs = await asyncio.gather(*(_victim_connection(plan, index) for index in range(_VICTIM_CONNECTIONS)))
    latencies = sorted(latency for answered, _ in runs for latency in answered)
    errors = sum((errors for _, errors in runs), Counter[str]())
    return VictimResult(len(latencies), _percentile(latencies, 50), _percentile(latencies, 99), dict(errors))


async def _victim_connection(plan: VictimPlan, index: int) -> tuple[list[float], Counter[str]]:
    """One connection's schedule: a request due every interval (the connections staggered); what
    was due in the measured window is timed from its due time, or counted as an error."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    measured_from = plan.start_at + plan.warmup_s
    end = measured_from + plan.window_s
    due = plan.start_at + index * _VICTIM_INTERVAL_S / _VICTIM_CONNECTIONS
    connection: _Connection | None = None
    try:
        while due < end:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if time.monotonic() - due >= _VICTIM_TIMEOUT_S:
                error: str | None = "timeout"  # a client would have given up before it could send it
            else:
                error, connection = await _victim_request(plan, connection, due)
            if due >= measured_from:
                if error is None:
                    latencies.append((time.monotonic() - due) * 1000)
                else:
                    errors[error] += 1
            due += _VICTIM_INTERVAL_S
    finally:
        if connection is not None:
            connection[1].transport.abort()
    return latencies, errors


async def _victim_request(
    plan: VictimPlan, connection: _Connection | None, due: float
) -> tuple[str | None, _Connection | None]:
    """One request, answered within the timeout of its due time or not: the error (None if 200),
    and the connection if it stays open."""
    try:
        async with asyncio.timeout(due + _VICTIM_TIMEOUT_S - time.monotonic()):
            connection = connection or await asyncio.open_connection(plan.host, plan.port)
            connection[1].write(plan.head)
            status, keep_alive = await read_response(connection[0])
        error = None if status == 200 else f"status {status}"
    except TimeoutError:
        error, keep_alive = "timeout", False
    except (OSError, asyncio.IncompleteReadError) as exc:
        error, keep_alive = type(exc).__name__, False
    if keep_alive or connection is None:
        return error, connection
    connection[1].transport.abort()
    return error, None


def _percentile(sorted_values: list[float], percent: float) -> float:
    """Nearest rank; with no answer at all, the timeout (no answer came sooner)."""
    if not sorted_values:
        return _VICTIM_TIMEOUT_S * 1000
    rank = math.ceil(percent / 100 * len(sorted_values))
    return sorted_values[max(0, rank - 1)]


def _warm(url: str, headers: dict[str, str], path: str) -> None:
    """The victim's file into the fresh proxy's caches (Redis has it after the first window)."""
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for _ in range(2):
            client.get(path).raise_for_status()


def _wait_ready(url: str, process: subprocess.Popen[bytes], stderr_path: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            detail = stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the noisy-neighbour proxy did not start:\n{detail}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes], wait_s: float) -> float | None:
    """SIGTERM to the proxy, SIGKILL if it has not ended within `wait_s`: the seconds SIGTERM took,
    or None if it did not end it."""
    if process.poll() is not None:
        return 0.0
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=wait_s)
        return time.monotonic() - started
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def _victim_text(window: Window) -> str:
    return f"victim {_latency_text(window.victim)}; control {_latency_text(window.control)}"


def _latency_text(result: VictimResult) -> str:
    errors = ", ".join(f"{n:,} {kind}" for kind, n in sorted(result.errors.items()))
    return (
        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, {result.error_count:,} errors"
        + (f" ({errors})" if errors else "")
        + f" of {result.answered + result.error_count:,}"
    )


def _proxy_text(window: Window) -> str:
    growth = round(window.redis_growth / MB, 1) + 0.0  # never "-0.0"
    text = f"proxy peak RSS {window.peak_rss / 2**20:,.0f} MB, Redis {growth:+,.1f} MB"
    text += f"; hypervisor steal {window.stolen:.0%}"
    if window.exit_code is not None:
        text += f"; THE PROXY EXITED ({window.exit_code})"
    return text


def _numbers(window: Window) -> dict[str, float]:
    return {
        "p50_ms": window.victim.p50_ms,
        "p99_ms": window.victim.p99_ms,
        "errors": window.victim.error_count,
        "requests": window.victim.answered + window.victim.error_count,
        "peak_rss_mb": window.peak_rss / 2**20,
        "redis_growth_mb": window.redis_growth / MB,
        "steal_share": window.stolen,
        "control_p50_ms": window.control.p50_ms,
        "control_p99_ms": window.control.p99_ms,
        "control_errors": window.control.error_count,
        "p99_ratio": window.p99_ratio,
    }


def _baseline_row(alone: Window) -> Row:
    scenario = (
        f"noisy neighbour: no attack (victim: cached metadata hits, {_VICTIM_CONNECTIONS} conns, "
        f"{_VICTIM_CONNECTIONS / _VICTIM_INTERVAL_S:,.0f} req/s)"
    )
    measured = f"{_victim_text(alone)}, victim p99 {alone.p99_ratio:.1f} x control; {_proxy_text(alone)}"
    return Row(scenario, "proxy (redis)", "baseline", measured, None, _numbers(alone))


def _row(scenario: str, attack: Attack, window: Window, alone: Window) -> Row:
    alone_ratio = window.victim.p99_ms / alone.victim.p99_ms
    target = (
        f"victim p99 <= {_P99_RATIO:g} x the control's (same window, no attack); 0 errors; "
        f"peak RSS < {_RSS_LIMIT // 2**20} MB"
    )
    measured = (
        f"{_victim_text(window)}, victim p99 {window.p99_ratio:.1f} x control ({alone_ratio:.1f} x the "
        f"window without attack); {_proxy_text(window)}; attack: {window.attack}"
    )
    met = (
        window.p99_ratio <= _P99_RATIO
        and window.victim.error_count == 0
        and window.peak_rss < _RSS_LIMIT
        and window.exit_code is None
    )
    numbers = {**_numbers(window), "p99_ratio_alone": alone_ratio}
    if attack.stalled_stdout:
        limit = _STALLED_GRACE_S + _SIGTERM_SLACK_S
        target += f"; SIGTERM ends it within shutdown_grace_s + {_SIGTERM_SLACK_S:g} s"
        if window.sigterm_s is None:
            measured += f"; SIGTERM DID NOT END IT within {limit:g} s (killed)"
        else:
            measured += f"; SIGTERM ended it in {window.sigterm_s:.1f} s"
            numbers["sigterm_s"] = window.sigterm_s
        met = met and window.sigterm_s is not None
    return Row(scenario, "proxy (redis)", target, measured, met, numbers)
