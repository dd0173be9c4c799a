"""What the soak's clients send: several tenants' mixed Files traffic, spread over the proxy replicas.

Each worker is one tenant's client, at home on one replica (worker i on replica i mod n) as a sticky
load balancer would place it, and sent to another while its own is out for a restart. A worker
deletes only the files it uploaded, so what it expects of them never races another worker. Every
answer goes, with what the worker knew when it asked, to the `observe` callback (`soak_checks`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

BETA = "files-api-2025-04-14"
VERSION = "2023-06-01"
SEEDED_PER_TENANT = 24
MAX_LIVE_UPLOADS = 40
# Operation mix, per request: read-heavy, as Files traffic is, with enough uploads and deletes to keep
# invalidating list pages. "foreign" cases ask with another tenant's id and must get a 404.
MIX: dict[str, int] = {
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
class Team:
    name: str
    proxy_key: str
    upstream_key: str

    @property
    def env_name(self) -> str:
        return "SOAK_KEY_" + self.name.upper()


def make_teams(count: int) -> list[Team]:
    """Fresh keys for each run, so a key found in the output can only have come from this run."""
    return [
        Team(f"team{i}", "fp-soak-" + secrets.token_urlsafe(18), "sk-ant-soak-" + secrets.token_hex(16))
        for i in range(count)
    ]


def headers_for(team: Team, *, beta: bool, bearer: bool = False) -> dict[str, str]:
    """A client's headers: the tenant's proxy key as `x-api-key` or a bearer token, as SDKs send it."""
    headers = {"anthropic-version": VERSION}
    if beta:
        headers["anthropic-beta"] = BETA
    if bearer:
        headers["authorization"] = f"Bearer {team.proxy_key}"
    else:
        headers["x-api-key"] = team.proxy_key
    return headers


@dataclass(slots=True)
class Ledger:
    """What the run knows of the files: whose each is, the owner's bytes, and every delete answered."""

    owner: dict[str, str] = field(default_factory=dict)
    seeded: dict[str, list[str]] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    # Each delete answered 200 or 404: through which replica, and when the answer came.
    deleted: dict[str, tuple[int, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request a worker sent and what came back (`status` None: a transport error, named in body)."""

    team: Team
    kind: str
    method: str
    file_id: str
    replica: int
    expected: int
    started: float
    ended: float
    status: int | None
    body: bytes
    # The worker's own files deleted before it asked: none may be in the answer.
    deleted_before: frozenset[str]

    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


class Routes:
    """The replicas' URLs, which are in service, and the requests in flight on each."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._out: set[int] = set()
        self._in_flight = [0] * len(urls)

    def url(self, replica: int) -> str | None:
        return None if replica in self._out else self.urls[replica]

    def pick(self, home: int) -> int:
        """The worker's own replica, or the next one in service while it is out."""
        for step in range(len(self.urls)):
            replica = (home + step) % len(self.urls)
            if replica not in self._out:
                return replica
        raise RuntimeError("no replica in service")

    async def take_out(self, replica: int) -> None:
        """No new requests to it, and return once those in flight have answered (as a load balancer
        takes a pod out of its endpoints before it gets SIGTERM)."""
        self._out.add(replica)
        while self._in_flight[replica]:
            await asyncio.sleep(0.01)

    def put_back(self, replica: int) -> None:
        self._out.discard(replica)

    def begin(self, replica: int) -> None:
        self._in_flight[replica] += 1

    def end(self, replica: int) -> None:
        self._in_flight[replica] -= 1


async def seed(
    client: httpx.AsyncClient, simulator_url: str, teams: list[Team], ledger: Ledger, rng_seed: int
) -> None:
    """Files per tenant, made in the simulator as the owner, and the bytes the owner downloads."""
    rng = random.Random(rng_seed)
    for team in teams:
        ledger.seeded[team.name] = []
        for number in range(SEEDED_PER_TENANT):
            spec = {
                "api_key": team.upstream_key,
                "filename": f"{team.name}-seed-{number}.bin",
                "size_bytes": rng.randint(256, 32 * 1024),
                "downloadable": True,
            }
            made = await client.post(f"{simulator_url}/_simulator/files", json=spec)
            file_id = made.raise_for_status().json()["id"]
            content = await client.get(
                f"{simulator_url}/v1/files/{file_id}/content",
                headers={"x-api-key": team.upstream_key, "anthropic-version": VERSION},
            )
            ledger.digests[file_id] = hashlib.sha256(content.raise_for_status().content).hexdigest()
            ledger.owner[file_id] = team.name
            ledger.seeded[team.name].append(file_id)


@dataclass(slots=True)
class _WorkerFiles:
    """Files one worker uploaded: only it deletes them, so its expectations never race another's."""

    live: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Request:
    kind: str
    method: str
    path: str
    expected: int
    file_id: str = ""
    params: dict[str, str] = field(default_factory=dict)
    upload: dict[str, tuple[str, bytes, str]] | None = None


class Workload:
    """`concurrency` workers, tenants in turn, until the deadline."""

    def __init__(
        self,
        teams: list[Team],
        ledger: Ledger,
        routes: Routes,
        observe: Callable[[Exchange], None],
        *,
        concurrency: int,
        seed: int,
    ) -> None:
        self.teams = teams
        self.ledger = ledger
        self.routes = routes
        self.observe = observe
        self.concurrency = concurrency
        self.seed = seed

    async def run(self, client: httpx.AsyncClient, deadline: float) -> None:
        await asyncio.gather(
            *(
                self._worker(client, i, random.Random(self.seed + i), deadline)
                for i in range(self.concurrency)
            )
        )

    async def _worker(
        self, client: httpx.AsyncClient, number: int, rng: random.Random, deadline: float
    ) -> None:
        team, home = self.teams[number % len(self.teams)], number % len(self.routes.urls)
        mine = _WorkerFiles()
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind == "delete" and not mine.live or len(mine.live) >= MAX_LIVE_UPLOADS:
                kind = "upload" if not mine.live else "delete"
            if kind == "metadata_deleted" and not mine.deleted:
                kind = "metadata"
            await self._one(client, team, home, self._request(team, kind, rng, mine), rng, mine)

    def _request(self, team: Team, kind: str, rng: random.Random, mine: _WorkerFiles) -> _Request:
        own = self.ledger.seeded[team.name]
        foreign = rng.choice([self.ledger.seeded[t.name] for t in self.teams if t is not team] or [own])
        if kind == "metadata":
            file_id = rng.choice(mine.live) if mine.live and rng.random() < 0.3 else rng.choice(own)
            return _Request(kind, "GET", f"/v1/files/{file_id}", 200, file_id)
        if kind in ("metadata_foreign", "metadata_deleted"):
            file_id = rng.choice(foreign if kind == "metadata_foreign" else mine.deleted)
            return _Request(kind, "GET", f"/v1/files/{file_id}", 404, file_id)
        if kind == "list":
            limit = rng.choice(["", "5", "20", "100"])
            return _Request(kind, "GET", "/v1/files", 200, params={"limit": limit} if limit else {})
        if kind in ("download", "download_foreign"):
            file_id = rng.choice(own if kind == "download" else foreign)
            return _Request(
                kind, "GET", f"/v1/files/{file_id}/content", 200 if kind == "download" else 404, file_id
            )
        if kind == "upload":
            name = f"{team.name}-up-{secrets.token_hex(4)}.txt"
            upload = {"file": (name, b"soak %s\n" % name.encode() * rng.randint(1, 64), "text/plain")}
            return _Request(kind, "POST", "/v1/files", 200, upload=upload)
        if kind == "delete":
            file_id = mine.live.pop(rng.randrange(len(mine.live)))
            return _Request(kind, "DELETE", f"/v1/files/{file_id}", 200, file_id)
        file_id = rng.choice(foreign)  # delete_foreign
        return _Request(kind, "DELETE", f"/v1/files/{file_id}", 404, file_id)

    async def _one(
        self,
        client: httpx.AsyncClient,
        team: Team,
        home: int,
        request: _Request,
        rng: random.Random,
        mine: _WorkerFiles,
    ) -> None:
        deleted_before = frozenset(mine.deleted)
        headers = headers_for(team, beta=rng.random() < 0.3, bearer=rng.random() < 0.5)
        replica = self.routes.pick(home)
        self.routes.begin(replica)
        started = time.monotonic()
        try:
            response = await client.request(
                request.method,
                self.routes.urls[replica] + request.path,
                params=request.params,
                headers=headers,
                files=request.upload,
            )
            status, body = response.status_code, response.content
        except httpx.HTTPError as exc:
            status, body = None, type(exc).__name__.encode()
        finally:
            self.routes.end(replica)
        ended = time.monotonic()
        if status == 200 and request.kind == "upload":
            uploaded = json.loads(body)["id"]
            self.ledger.owner.setdefault(uploaded, team.name)
            mine.live.append(uploaded)
        if status in (200, 404) and request.kind == "delete":
            mine.deleted.append(request.file_id)
            self.ledger.deleted[request.file_id] = (replica, ended)
        self.observe(
            Exchange(
                team=team,
                kind=request.kind,
                method=request.method,
                file_id=request.file_id,
                replica=replica,
                expected=request.expected,
                started=started,
                ended=ended,
                status=status,
                body=body,
                deleted_before=deleted_before,
            )
        )
