"""What the soak checks: every answer the clients get is held against what the run knows (which tenant
owns which file, which were deleted, when Redis and the link to it were down), and counted.

- cross-tenant answers: a file object of another tenant, another tenant's id answered 200, or bytes
  that are not the owner's.
- stale answers after a delete: the worker's own deleted file answered 200 or listed, through the
  replica that deleted it, or through the other one once its in-process copy (`local_ttl_s`) is over.
- deleted files served after the partition heals: any file whose delete was answered before
  `restore()` and that an answer to a request sent after it still carries (a worker's or the sweep's).
- failures, each filed under the fault window it fell in (the Redis outage, the partition) or none.
- keys: a tenant's proxy or upstream key in any answer or in the proxies' output.

`Canaries` make the partition case certain rather than likely: files cached on every replica, then
deleted through the replica about to restart while the link is cut. The post-heal watch (`HealWatch`)
sweeps every file deleted before the heal on every replica, and times how long the cache takes to
resume: from `restore()` until a metadata read of every tenant is a hit (`Cache-Status: ...; hit`)
on every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from bench.soak_workload import Exchange, Ledger, Routes, Team, headers_for

EXAMPLES = 10
# After Redis or the link to it is back, a proxy's breaker waits out its cool-down (2 s) and the store
# its timeout (1 s) before the first call succeeds: failures this long after still count as "during".
FAULT_GRACE_S = 5.0


@dataclass(slots=True)
class Window:
    """A fault: from `start` to `end` (None while it lasts), plus the grace after it."""

    name: str
    start: float
    end: float | None = None

    def covers(self, started: float, ended: float) -> bool:
        return ended >= self.start and (self.end is None or started <= self.end + FAULT_GRACE_S)


@dataclass(slots=True)
class Tally:
    """What the clients saw, counted as they go (nothing per request is kept but its latency)."""

    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)  # by fault window, "" for none
    failure_examples: list[str] = field(default_factory=list)
    cross_tenant: int = 0
    cross_tenant_examples: list[str] = field(default_factory=list)
    stale_after_delete: int = 0
    stale_examples: list[str] = field(default_factory=list)
    keys_in_answers: int = 0
    # Ids seen in list pages that were not yet known (an upload of the same tenant still in flight):
    # checked against the owners once every upload has answered.
    unknown_listed: list[tuple[str, str]] = field(default_factory=list)
    served_after_heal: set[str] = field(default_factory=set)
    served_after_heal_answers: int = 0
    served_after_heal_last_s: float | None = None  # the latest such request, seconds after the heal
    served_after_heal_examples: list[str] = field(default_factory=list)


class Checks:
    """Holds each exchange against the ledger and the fault windows, and counts what broke."""

    def __init__(self, teams: list[Team], ledger: Ledger, local_ttl_s: float) -> None:
        self.teams = teams
        self.ledger = ledger
        self.tally = Tally()
        self.local_ttl_s = local_ttl_s
        self.windows: list[Window] = []
        self.started_at = time.monotonic()
        # Set at `restore()`: the files deleted by then, and when it was.
        self.healed_at: float | None = None
        self.deleted_by_heal: dict[str, tuple[int, float]] = {}
        self.secrets = {
            secret: f"{team.name} {kind}"
            for team in teams
            for kind, secret in (("proxy key", team.proxy_key), ("upstream key", team.upstream_key))
        }

    def open_window(self, name: str) -> Window:
        window = Window(name, time.monotonic())
        self.windows.append(window)
        return window

    def healed(self) -> None:
        """The partition is over: from now on no file deleted until now may be served again."""
        self.healed_at = time.monotonic()
        self.deleted_by_heal = dict(self.ledger.deleted)

    def observe(self, exchange: Exchange) -> None:
        """Count one answer a worker got and check it."""
        tally, team, kind = self.tally, exchange.team, exchange.kind
        tally.latencies_ms.append((exchange.ended - exchange.started) * 1000)
        label = str(exchange.status) if exchange.status is not None else exchange.body.decode()
        tally.by_kind.setdefault(kind, Counter())[label] += 1
        if exchange.status is not None and not kind.startswith("download"):
            self._check_answer(exchange)
        elif exchange.status == 200 and kind.startswith("download"):
            digest = self.ledger.digests.get(exchange.file_id)
            if digest != exchange.digest() or self.ledger.owner[exchange.file_id] != team.name:
                self.cross_tenant(f"{team.name} {kind} {exchange.file_id}: bytes are not the owner's content")
        if exchange.status != exchange.expected:
            what = f"{exchange.method} {kind}: {label} (expected {exchange.expected})"
            self.failed(exchange.started, exchange.ended, f"{team.name} replica {exchange.replica} {what}")

    def _check_answer(self, exchange: Exchange) -> None:
        team, kind, body = exchange.team, exchange.kind, exchange.body
        text = body.decode("utf-8", "replace")
        if any(secret in text for secret in self.secrets):
            self.tally.keys_in_answers += 1
        if exchange.status != 200:
            return
        try:
            answer = json.loads(body)
        except ValueError:
            self.failed(exchange.started, exchange.ended, f"{team.name} {kind}: a 200 that is not JSON")
            return
        objects = answer.get("data", []) if kind == "list" else [answer]
        for item in objects:
            if item.get("type") == "file_deleted":
                continue
            item_id, filename = item.get("id", ""), str(item.get("filename", ""))
            owner = self.ledger.owner.get(item_id)
            if not filename.startswith(team.name + "-") or owner not in (None, team.name):
                self.cross_tenant(f"{team.name} {kind}: got {item_id} ({filename}) owned by {owner}")
            elif owner is None:
                self.tally.unknown_listed.append((team.name, item_id))
            if item_id in exchange.deleted_before and self._past_copy_bound(exchange, item_id):
                self.tally.stale_after_delete += 1
                if len(self.tally.stale_examples) < EXAMPLES:
                    self.tally.stale_examples.append(
                        f"{team.name} {kind} on replica {exchange.replica}: {item_id} after its delete"
                    )
            self.served(item_id, exchange.replica, exchange.started, f"{team.name} {kind}")
        if kind.endswith("foreign"):
            self.cross_tenant(
                f"{team.name} {kind} {exchange.file_id}: answered 200 for another tenant's file"
            )

    def _past_copy_bound(self, exchange: Exchange, item_id: str) -> bool:
        """Whether a delete must be seen by now: through its own replica at once; through another once
        that one's in-process copy of the file (at most `local_ttl_s` old) has gone."""
        replica, answered_at = self.ledger.deleted[item_id]
        return replica == exchange.replica or exchange.started - answered_at >= self.local_ttl_s

    def served(self, file_id: str, replica: int, started: float, what: str) -> None:
        """A file answered 200 or listed: a fault if its delete came before the heal and the request
        after it."""
        if self.healed_at is None or started < self.healed_at or file_id not in self.deleted_by_heal:
            return
        tally = self.tally
        tally.served_after_heal.add(file_id)
        tally.served_after_heal_answers += 1
        since = round(started - self.healed_at, 3)
        tally.served_after_heal_last_s = max(since, tally.served_after_heal_last_s or 0.0)
        if len(tally.served_after_heal_examples) < EXAMPLES:
            deleted_on = self.deleted_by_heal[file_id][0]
            tally.served_after_heal_examples.append(
                f"{what} on replica {replica}, {started - self.healed_at:.2f} s after the heal: "
                f"{file_id} (deleted through replica {deleted_on})"
            )

    def cross_tenant(self, what: str) -> None:
        self.tally.cross_tenant += 1
        if len(self.tally.cross_tenant_examples) < EXAMPLES:
            self.tally.cross_tenant_examples.append(what)

    def failed(self, started: float, ended: float, what: str) -> None:
        window = next((w.name for w in self.windows if w.covers(started, ended)), "")
        self.tally.failed[window] += 1
        if len(self.tally.failure_examples) < EXAMPLES:
            when = time.monotonic() - self.started_at
            self.tally.failure_examples.append(f"t={when:.1f}s{f' ({window})' if window else ''} {what}")

    def settle_unknown_listed(self) -> None:
        """Ids listed before their upload answered: each must be the lister's own."""
        for team_name, item_id in self.tally.unknown_listed:
            if self.ledger.owner.get(item_id) != team_name:
                self.cross_tenant(f"{team_name} list: {item_id} is not one of its files")

    def leaked(self, outputs: dict[str, str]) -> list[str]:
        """The keys found in the proxies' output (access logs, stderr, /metrics)."""
        return sorted(
            f"{name} in {where}"
            for secret, name in self.secrets.items()
            for where, text in outputs.items()
            if secret in text
        )


class Canaries:
    """One file per tenant, uploaded through the replica that will be restarted and read through every
    replica (so Redis holds its metadata and list pages), then deleted through that replica while the
    link is cut: a delete it must hold, keep in its journal across the restart and write after the
    heal, and that no replica may serve once healed. The workers' deletes make it likely; this makes
    it certain."""

    def __init__(self, checks: Checks, routes: Routes, client: httpx.AsyncClient, replica: int) -> None:
        self.checks = checks
        self.routes = routes
        self.client = client
        self.replica = replica
        self.files: dict[str, Team] = {}
        self.requests = 0  # sent through the proxies, for the access-log count
        self.cached = 0  # planted ones whose metadata was a hit on every replica before the cut
        self.deleted = 0

    async def plant(self) -> None:
        for team in self.checks.teams:
            name = f"{team.name}-canary-{len(self.files)}.txt"
            answer = await self._send(
                "POST", self.replica, team, "/v1/files", files={"file": (name, b"canary", "text/plain")}
            )
            if answer is None or answer.status_code != 200:
                continue
            file_id = answer.json()["id"]
            self.checks.ledger.owner[file_id] = team.name
            self.files[file_id] = team
            hits = 0
            for replica in range(len(self.routes.urls)):
                await self._send("GET", replica, team, "/v1/files", params={"limit": "100"})
                # A miss that fills, then a hit: a breaker may still be open, and a store just back from
                # an outage is not believed for `caching.RESYNC_S`.
                for _ in range(200):
                    read = await self._send("GET", replica, team, f"/v1/files/{file_id}")
                    if read is not None and "; hit" in read.headers.get("cache-status", ""):
                        hits += 1
                        break
                    await asyncio.sleep(0.05)
            self.cached += hits == len(self.routes.urls)

    async def delete(self) -> None:
        for file_id, team in self.files.items():
            started = time.monotonic()
            answer = await self._send("DELETE", self.replica, team, f"/v1/files/{file_id}")
            if answer is not None and answer.status_code == 200:
                self.checks.ledger.deleted[file_id] = (self.replica, time.monotonic())
                self.deleted += 1
            else:
                status = "no answer" if answer is None else answer.status_code
                self.checks.failed(started, time.monotonic(), f"canary delete of {file_id}: {status}")

    async def _send(
        self,
        method: str,
        replica: int,
        team: Team,
        path: str,
        *,
        params: dict[str, str] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
    ) -> httpx.Response | None:
        url = self.routes.url(replica)
        if url is None:
            return None
        headers = headers_for(team, beta=False)
        with contextlib.suppress(httpx.HTTPError):
            answer = await self.client.request(
                method, url + path, params=params, headers=headers, files=files
            )
            self.requests += 1
            return answer
        return None


@dataclass(slots=True)
class Resume:
    """When each replica answered every tenant's probe from the cache again, seconds after the heal."""

    per_replica: dict[int, float | None] = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        times = list(self.per_replica.values())
        return None if not times or None in times else max(t for t in times if t is not None)


class HealWatch:
    """After `restore()`: probe both replicas for every file deleted by then (metadata and list), and
    for hits, until the cache has resumed everywhere and one more sweep found nothing new."""

    def __init__(self, checks: Checks, routes: Routes, client: httpx.AsyncClient, limit_s: float) -> None:
        self.checks = checks
        self.routes = routes
        self.client = client
        self.limit_s = limit_s
        self.resume = Resume()
        self.sweeps = 0
        self.probes = 0  # requests sent, for the access-log count

    async def run(self) -> None:
        healed_at = self.checks.healed_at
        assert healed_at is not None
        deadline = healed_at + self.limit_s
        resumed = asyncio.gather(
            *(self._until_resumed(replica, healed_at, deadline) for replica in range(len(self.routes.urls)))
        )
        while not resumed.done() and time.monotonic() < deadline:
            await self._sweep()
        await resumed
        await self._sweep()  # the last, after every replica reads the store again

    async def _until_resumed(self, replica: int, healed_at: float, deadline: float) -> None:
        """Each tenant's first seeded file, read until it is a hit."""
        waiting = {team.name: team for team in self.checks.teams}
        self.resume.per_replica[replica] = None
        while waiting and time.monotonic() < deadline:
            for name, team in list(waiting.items()):
                file_id = self.checks.ledger.seeded[name][0]
                answer = await self._get(replica, team, f"/v1/files/{file_id}")
                if answer is not None and "; hit" in answer.headers.get("cache-status", ""):
                    del waiting[name]
            if waiting:
                await asyncio.sleep(0.05)
        if not waiting:
            self.resume.per_replica[replica] = round(time.monotonic() - healed_at, 3)

    async def _sweep(self) -> None:
        """Every file deleted before the heal, on every replica, its owner asking; then each tenant's
        first list page. Those deleted during the partition first: their deletes may still be held."""
        self.sweeps += 1
        cut = next((w.start for w in self.checks.windows if w.name == "partition"), 0.0)
        deleted = sorted(self.checks.deleted_by_heal.items(), key=lambda item: item[1][1] < cut)
        by_team = {team.name: team for team in self.checks.teams}
        gate = asyncio.Semaphore(8)

        async def probe(replica: int, team: Team, path: str) -> None:
            async with gate:
                started = time.monotonic()
                answer = await self._get(
                    replica, team, path, params={"limit": "100"} if path == "/v1/files" else None
                )
            if answer is None or answer.status_code != 200:
                return
            items = answer.json().get("data", []) if path == "/v1/files" else [answer.json()]
            for item in items:
                self.checks.served(str(item.get("id", "")), replica, started, f"sweep {team.name}")

        probes = [
            probe(replica, by_team[self.checks.ledger.owner[file_id]], f"/v1/files/{file_id}")
            for file_id, _ in deleted
            for replica in range(len(self.routes.urls))
        ]
        probes += [
            probe(replica, team, "/v1/files")
            for team in self.checks.teams
            for replica in range(len(self.routes.urls))
        ]
        await asyncio.gather(*probes)

    async def _get(
        self, replica: int, team: Team, path: str, params: dict[str, str] | None = None
    ) -> httpx.Response | None:
        url = self.routes.url(replica)
        if url is None:
            return None
        with contextlib.suppress(httpx.HTTPError):
            answer = await self.client.get(url + path, params=params, headers=headers_for(team, beta=False))
            self.probes += 1
            return answer
        return None
