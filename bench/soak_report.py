"""The soak's report: the numbers as one JSON-able dict (`build`), each guarantee with its target, and
the same as markdown tables (`format_report`). It reads what the checks counted, what happened when
(`Timeline`), and the proxies' access logs; it judges nothing itself but the targets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.soak_checks import FAULT_GRACE_S, Canaries, Checks, HealWatch

MIB = 1024 * 1024


class RunOptions(Protocol):
    """What the report shows of `bench.soak.Options` (which imports this module, not the reverse)."""

    @property
    def tenants(self) -> int: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def rss_bound_mib(self) -> float: ...


@dataclass(slots=True)
class Timeline:
    """When each fault began and ended, in `time.monotonic()` seconds (None: it did not happen)."""

    started_at: float = 0.0
    redis_killed: float | None = None
    redis_back: float | None = None
    cut: float | None = None
    restored: float | None = None
    replica_out: float | None = None  # SIGTERM to the restarted replica
    replica_back: float | None = None  # its successor answers /healthz
    # Invalidations the stopped replica left in its journal (lines), replayed by its successor.
    journal_lines: int | None = None

    def at(self, moment: float | None) -> float | None:
        return None if moment is None else round(moment - self.started_at, 2)


@dataclass(slots=True)
class Measures:
    """What the orchestration measured around the clients: memory, CPU, and the proxies' output."""

    elapsed_s: float
    rss_start: int
    rss_end: int
    rss_peak: int
    cpu_cores: dict[str, float]
    access_logs: list[Path]
    outputs: dict[str, str] = field(default_factory=dict)


def read_access_logs(paths: list[Path]) -> tuple[int, int, int]:
    """Access lines, the ones that made an upstream request (`upstream_ms` set; the proxy never
    retries, so one each), and cache hits, over every replica's log."""
    logged = upstream = hits = 0
    for path in paths:
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


def build(
    options: RunOptions,
    checks: Checks,
    timeline: Timeline,
    watch: HealWatch | None,
    canaries: Canaries | None,
    measures: Measures,
) -> dict[str, Any]:
    """The report, with a pass or fail for each guarantee (`ok`: all pass)."""
    tally = checks.tally
    checks.settle_unknown_listed()
    logged, upstream, hits = read_access_logs(measures.access_logs)
    leaked = checks.leaked(measures.outputs)
    sent = sum(sum(counts.values()) for counts in tally.by_kind.values())
    # Requests the soak itself sent through the proxies, beside the workers': canaries and heal probes.
    probes = (watch.probes if watch is not None else 0) + (canaries.requests if canaries is not None else 0)
    growth = (measures.rss_end - measures.rss_start) / MIB
    latencies = sorted(tally.latencies_ms) or [0.0]
    elapsed = measures.elapsed_s
    resume = watch.resume.seconds if watch is not None else None
    partitioned = timeline.cut is not None
    deleted_during = [
        file_id
        for file_id, (_, answered_at) in checks.ledger.deleted.items()
        if timeline.cut is not None
        and answered_at >= timeline.cut
        and (timeline.restored is None or answered_at < timeline.restored)
    ]
    guarantees = {
        "no cross-tenant answer": tally.cross_tenant == 0,
        "no stale answer after a delete": tally.stale_after_delete == 0,
        "no failure outside the faults": tally.failed[""] == 0,
        f"RSS growth under {options.rss_bound_mib:g} MiB": growth < options.rss_bound_mib,
        "no key in the proxy's output": not leaked,
        "no key in any answer": tally.keys_in_answers == 0,
        "upstream requests saved": sent + probes - upstream > 0,
    }
    if partitioned:
        guarantees["no deleted file served after the heal"] = not tally.served_after_heal
        guarantees["the cache resumed after the heal"] = resume is not None
    return {
        "duration_s": round(elapsed, 2),
        "tenants": options.tenants,
        "concurrency": options.concurrency,
        "replicas": 2,
        "seed": options.seed,
        "sent": sent,
        "per_second": round(sent / elapsed, 1) if elapsed else 0.0,
        "by_kind": {kind: dict(sorted(counts.items())) for kind, counts in sorted(tally.by_kind.items())},
        "failed": sum(tally.failed.values()),
        "failed_outside_outage": tally.failed[""],
        "failed_during_outage": tally.failed["redis outage"],
        "failed_during_partition": tally.failed["partition"],
        "failure_examples": tally.failure_examples,
        "cross_tenant": tally.cross_tenant,
        "cross_tenant_examples": tally.cross_tenant_examples,
        "stale_after_delete": tally.stale_after_delete,
        "stale_examples": tally.stale_examples,
        "keys_leaked": leaked,
        "keys_in_answers": tally.keys_in_answers,
        "redis": {
            "killed_at_s": timeline.at(timeline.redis_killed),
            "back_at_s": timeline.at(timeline.redis_back),
            "outage_window_s": _window(checks, timeline, "redis outage"),
        },
        "partition": {
            "cut_at_s": timeline.at(timeline.cut),
            "restored_at_s": timeline.at(timeline.restored),
            "replica_restart_s": [timeline.at(timeline.replica_out), timeline.at(timeline.replica_back)],
            "journal_lines_at_restart": timeline.journal_lines,
            # Canaries: one file per tenant, cached on every replica, deleted through the restarted
            # one during the partition (before its restart).
            "canaries": {
                "planted": len(canaries.files) if canaries is not None else 0,
                "cached_on_every_replica": canaries.cached if canaries is not None else 0,
                "deleted_during_partition": canaries.deleted if canaries is not None else 0,
            },
            "deleted_before_heal": len(checks.deleted_by_heal),
            "deleted_during_partition": len(deleted_during),
            # Target 0: files whose delete was answered before the heal, answered 200 or listed after it.
            "deleted_served_after_heal": len(tally.served_after_heal),
            "deleted_served_after_heal_answers": tally.served_after_heal_answers,
            "deleted_served_until_s_after_heal": tally.served_after_heal_last_s,
            "deleted_served_after_heal_examples": tally.served_after_heal_examples,
            # From restore() until every tenant's metadata read is a hit on every replica.
            "cache_resumed_after_s": resume,
            "cache_resumed_per_replica_s": (
                {str(k): v for k, v in watch.resume.per_replica.items()} if watch is not None else {}
            ),
            "heal_sweeps": watch.sweeps if watch is not None else 0,
        },
        "rss_mib": {
            "start": round(measures.rss_start / MIB, 1),
            "end": round(measures.rss_end / MIB, 1),
            "peak": round(measures.rss_peak / MIB, 1),
            "growth": round(growth, 1),
            "bound": options.rss_bound_mib,
        },
        "upstream": {
            "logged": logged,
            "probes": probes,
            "requests": upstream,
            "saved": sent + probes - upstream,
            "saved_ratio": round((sent + probes - upstream) / (sent + probes), 3) if sent else 0.0,
            "cache_hits": hits,
        },
        "latency_ms": {
            "p50": round(latencies[len(latencies) // 2], 2),
            "p99": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
            "max": round(latencies[-1], 2),
        },
        # Cores busy on average: the client is in the same budget, so a slow run says which one was.
        "cpu_cores": {name: round(value, 2) for name, value in measures.cpu_cores.items()},
        "guarantees": guarantees,
        "ok": all(guarantees.values()),
    }


def _window(checks: Checks, timeline: Timeline, name: str) -> list[float | None] | None:
    """The fault window failures are filed under, grace included, in seconds from the start."""
    window = next((w for w in checks.windows if w.name == name), None)
    if window is None:
        return None
    end = window.end if window.end is not None else window.start
    return [timeline.at(window.start), timeline.at(end + FAULT_GRACE_S)]


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown: a summary table, requests by kind and status, and what failed."""
    rss, upstream, redis = report["rss_mib"], report["upstream"], report["redis"]
    partition = report.get("partition", {})
    rows = [
        (
            "duration",
            f"{report['duration_s']} s, {report['tenants']} tenants, concurrency {report['concurrency']}, "
            f"{report.get('replicas', 1)} replicas on one Redis",
        ),
        ("requests sent", f"{report['sent']} ({report['per_second']}/s)"),
        ("failed", str(report["failed"])),
        ("  outside the faults (must be 0)", str(report["failed_outside_outage"])),
        ("  during the Redis outage", str(report["failed_during_outage"])),
        ("  during the partition", str(report.get("failed_during_partition", 0))),
        ("cross-tenant answers (must be 0)", str(report["cross_tenant"])),
        ("stale answers after a delete (must be 0)", str(report["stale_after_delete"])),
        (
            "keys in proxy output / in answers (must be none)",
            f"{len(report['keys_leaked'])} / {report['keys_in_answers']}",
        ),
        (
            "Redis killed / back / outage window",
            f"{redis['killed_at_s']} s / {redis['back_at_s']} s / {redis['outage_window_s']} s",
        ),
    ]
    if partition.get("cut_at_s") is not None:
        restart = partition["replica_restart_s"]
        rows += [
            (
                "Redis partition cut / healed; replica restarted (out / back)",
                f"{partition['cut_at_s']} s / {partition['restored_at_s']} s; "
                f"{restart[0]} s / {restart[1]} s",
            ),
            (
                "deletes before the heal (during the partition); journal lines at the restart",
                f"{partition['deleted_before_heal']} ({partition['deleted_during_partition']}); "
                f"{partition['journal_lines_at_restart']}",
            ),
            (
                "canaries planted / cached on both replicas / deleted during the partition",
                " / ".join(str(n) for n in partition["canaries"].values()),
            ),
            (
                "deleted files served after the heal (target 0)",
                _served_after_heal(partition),
            ),
            (
                "time for the cache to resume after the heal (target: hits again)",
                "never"
                if partition["cache_resumed_after_s"] is None
                else f"{partition['cache_resumed_after_s']} s (per replica: "
                + ", ".join(f"{k}: {v} s" for k, v in partition["cache_resumed_per_replica_s"].items())
                + ")",
            ),
        ]
    rows += [
        ("proxy RSS start / end / peak", f"{rss['start']} / {rss['end']} / {rss['peak']} MiB"),
        ("proxy RSS growth (bound)", f"{rss['growth']} MiB (< {rss['bound']:g} MiB)"),
        (
            "upstream requests",
            f"{upstream['requests']} (access lines: {upstream['logged']}, "
            f"of which canaries and heal probes: {upstream.get('probes', 0)})",
        ),
        (
            "upstream requests saved",
            f"{upstream['saved']} ({upstream['saved_ratio']:.1%} of requests through the proxies)",
        ),
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
    examples = {**report, "heal_examples": partition.get("deleted_served_after_heal_examples", [])}
    for title, key in (
        ("failures", "failure_examples"),
        ("cross-tenant", "cross_tenant_examples"),
        ("stale after delete", "stale_examples"),
        ("deleted files served after the heal", "heal_examples"),
        ("keys found", "keys_leaked"),
    ):
        if examples[key]:
            lines += ["", f"First {title}:", *(f"- {line}" for line in examples[key])]
    return "\n".join(lines)


def _served_after_heal(partition: dict[str, Any]) -> str:
    answers = partition["deleted_served_after_heal_answers"]
    last = partition["deleted_served_until_s_after_heal"]
    when = f", the last sent {last} s after the heal" if answers else ""
    return (
        f"{partition['deleted_served_after_heal']} ({answers} answers{when}; "
        f"{partition['heal_sweeps']} sweeps of every deleted file)"
    )
