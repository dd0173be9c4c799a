"""The processes the soak runs, every one started and stopped through `bench/services.py`: the
simulator, redis-server, the relay in front of it, and two proxy replicas (one config each, naming
the relay as `cache.url` and a journal of their own), plus the CPU each has used."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import time
from pathlib import Path

import psutil

from bench.services import Relay, Service, Services
from bench.soak_workload import Team

# How long a replica answers a hit from its own memory (`cache.local_ttl_s`, written in the config):
# the bound on how late it sees a delete made through the other replica.
LOCAL_TTL_S = 1.0
REPLICAS = ("a", "b")


class Cluster:
    """The simulator, Redis, the relay and the replicas, all started (and stopped) by `Services`."""

    def __init__(self, services: Services, teams: list[Team], upstream_latency_ms: float) -> None:
        self.services = services
        self.teams = teams
        self.upstream_latency_ms = upstream_latency_ms
        self.started: list[str] = []  # every replica process's name, for its logs
        self.simulator: Service
        self.redis: Service
        self.relay: Relay
        self.replicas: list[Service] = []

    def start(self) -> None:
        self.simulator = self.services.simulator(self.upstream_latency_ms, log_level="warning")
        self.redis = self.services.redis()
        self.relay = self.services.relay(self.redis.port)
        self.replicas = [self._start_replica(index, f"replica-{name}") for index, name in enumerate(REPLICAS)]

    def journal(self, index: int) -> Path:
        return self.services.workdir / f"replica-{REPLICAS[index]}.journal"

    def _start_replica(self, index: int, name: str, port: int | None = None) -> Service:
        config = _config_toml(self.simulator.url, self.relay.url, self.teams, self.journal(index))
        secrets = {team.env_name: team.upstream_key for team in self.teams}
        self.started.append(name)
        return self.services.proxy_with_config(name, config, secrets, port=port)

    def kill_redis(self) -> None:
        self.services.stop(self.redis, signal.SIGKILL)

    def start_redis(self) -> None:
        self.redis = self.services.redis(port=self.redis.port)

    def stop_replica(self, index: int) -> tuple[int, int]:
        """SIGTERM: the replica drains, and keeps in its journal what the store has not taken.
        Returns its exit status and the journal's lines."""
        status = self.services.stop(self.replicas[index])
        journal = self.journal(index)
        return status, len(journal.read_bytes().splitlines()) if journal.exists() else 0

    def restart_replica(self, index: int) -> None:
        """The same config and journal, on the same port (clients and routes keep its URL)."""
        old = self.replicas[index]
        self.replicas[index] = self._start_replica(index, f"replica-{REPLICAS[index]}-restarted", old.port)

    def stop_replicas(self) -> None:
        """SIGTERM, so each drains and flushes its access log before exiting."""
        for replica in self.replicas:
            with contextlib.suppress(KeyError):
                self.services.stop(replica)

    def access_logs(self) -> list[Path]:
        return [self.services.workdir / f"{name}.access.log" for name in self.started]

    def outputs(self) -> dict[str, str]:
        """Every replica process's stdout (access log) and stderr, by file name."""
        files = [path for name in self.started for path in self._output_files(name)]
        return {path.name: path.read_text("utf-8", "replace") for path in files if path.exists()}

    def _output_files(self, name: str) -> list[Path]:
        return [self.services.workdir / f"{name}.access.log", self.services.workdir / f"{name}.stderr"]


class Cpu:
    """CPU seconds used by the replicas (a stopped one's counted up to its stop), the simulator, the
    Redis relay, this client and the whole machine (which tells whether something else shared the
    cores)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.retired = 0.0

    def retire(self, service: Service) -> None:
        self.retired += _cpu_of(service.pid)

    def seconds(self) -> dict[str, float]:
        machine = psutil.cpu_times()
        return {
            "proxies": self.retired + sum(_cpu_of(replica.pid) for replica in self.cluster.replicas),
            "simulator": _cpu_of(self.cluster.simulator.pid),
            "relay": _cpu_of(self.cluster.relay.service.pid),
            "soak client": time.process_time(),
            "whole machine": float(machine.user + machine.system + machine.nice),
        }


def _cpu_of(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def _config_toml(simulator_url: str, cache_url: str, teams: list[Team], journal: Path) -> str:
    tenants = "".join(
        f'[[tenants]]\nname = "{team.name}"\nworkspace = "{team.name}-ws"\napi_key_env = "{team.env_name}"\n'
        f'client_key_sha256 = ["{hashlib.sha256(team.proxy_key.encode()).hexdigest()}"]\n'
        # High enough never to answer 429, so the limiter's store path runs on every request.
        "rate_limit_per_minute = 60000000\nrate_limit_burst = 1000000\n\n"
        for team in teams
    )
    return (
        f'[upstream]\nbase_url = "{simulator_url}"\nread_timeout_s = 10\n\n'
        f'[cache]\nurl = "{cache_url}"\nlocal_ttl_s = {LOCAL_TTL_S}\njournal_path = "{journal}"\n\n'
        "[server]\nshutdown_grace_s = 5\n\n[usage]\nflush_interval_s = 1\n\n" + tenants
    )
