"""What the scenarios share: options, keys, and the servers, each started on first use only, so
`--only metadata-hit` starts what that scenario measures and nothing else."""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import httpx

from bench.seed import HEADERS, add_files, upstream_bodies
from bench.services import Keys, Service, Services


@dataclass(frozen=True)
class Options:
    duration_s: float = 6.0
    warmup_s: float = 2.0
    files: int = 10_000
    miss_files: int = 1_000
    zipf_s: float = 1.0
    list_share: float = 0.1
    mix_latency_ms: float = 150.0
    mix_rate: float = 1_000.0
    flight_requests: int = 1_000
    transfer_bytes: int = 500_000_000
    verify_transfers: bool = False


class Context:
    def __init__(self, services: Services, options: Options) -> None:
        self.services = services
        self.options = options
        self.workdir = services.workdir
        self.keys = Keys(
            "fp-bench-" + secrets.token_urlsafe(24),
            "sk-ant-bench-" + secrets.token_hex(16),
            "fp-bench-own-" + secrets.token_urlsafe(24),
        )

    def proxy_headers(self) -> dict[str, str]:
        return {**HEADERS, "x-api-key": self.keys.proxy_key}

    def upstream_headers(self) -> dict[str, str]:
        return {**HEADERS, "x-api-key": self.keys.upstream_key}

    @cached_property
    def simulator(self) -> Service:
        return self.services.simulator(latency_ms=0)

    @cached_property
    def redis(self) -> Service:
        return self.services.redis()

    @cached_property
    def proxy_redis(self) -> Service:
        return self.services.proxy("proxy-redis", self.simulator.url, self.redis.url, self.keys)

    @cached_property
    def proxy_memory(self) -> Service:
        return self.services.proxy("proxy-memory", self.simulator.url, "memory://", self.keys)

    @cached_property
    def bare(self) -> Service:
        return self.services.bare(self._hit_bodies)

    @cached_property
    def server_alone(self) -> Service:
        return self.services.bare(self._hit_bodies, framework=False)

    @cached_property
    def _hit_bodies(self) -> Path:
        """The hit file's metadata and the first list page as the simulator answers them, in a file."""
        metadata, listing = upstream_bodies(self.simulator.url, self.keys.upstream_key, self.hit_file)
        bodies = self.workdir / "bodies.json"
        bodies.write_text(json.dumps({"metadata": metadata.decode(), "list": listing.decode()}))
        return bodies

    @cached_property
    def lean(self) -> Service:
        return self.services.lean(self.simulator.url, self.redis.url, self.keys)

    @cached_property
    def nginx(self) -> Service:
        return self.services.nginx(self.simulator.port)

    @cached_property
    def hit_file(self) -> str:
        return self.add_files(1)[0]

    @cached_property
    def miss_ids_file(self) -> Path:
        return self._ids_file("miss-ids.txt", self.add_files(self.options.miss_files))

    @cached_property
    def mix_files(self) -> tuple[Path, Path]:
        """Metadata paths' ids, and list-page paths, each most popular first. List pages are read as
        the SDK pages through them: the first page most often, then each next page (cursor: the last
        id of the page before, in the API's newest-first order) less often."""
        ids = self.add_files(self.options.files)
        newest_first = ids[::-1]
        pages = ["/v1/files?limit=20"]
        pages += [f"/v1/files?limit=20&after_id={newest_first[i - 1]}" for i in range(20, len(ids), 20)]
        return self._ids_file("mix-ids.txt", ids), self._ids_file("mix-lists.txt", pages)

    def add_files(self, count: int, *, size_bytes: int = 1024) -> list[str]:
        return asyncio.run(
            add_files(self.simulator.url, self.keys.upstream_key, count, size_bytes=size_bytes)
        )

    def set_latency(self, latency_ms: float) -> None:
        response = httpx.put(f"{self.simulator.url}/_simulator/latency", json={"latency_ms": latency_ms})
        response.raise_for_status()

    def forget_requests(self) -> None:
        """The simulator keeps a record of every request; drop them so a long run stays small."""
        httpx.delete(f"{self.simulator.url}/_simulator/requests").raise_for_status()

    def _ids_file(self, name: str, lines: list[str]) -> Path:
        path = self.workdir / name
        path.write_text("\n".join(lines) + "\n")
        return path
