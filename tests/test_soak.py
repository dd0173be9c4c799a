"""A short run of the load and soak script (`python -m bench.soak`), as CI runs it: two replicas on one
Redis, Redis killed and restarted, then the link to Redis cut while files are deleted and one replica
restarted meanwhile. Nothing mixed between tenants, nothing failed, no key in the proxies' output, the
cache saved upstream requests, no deleted file served once the partition healed, and the cache
resumed (hits again on both replicas)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.soak import format_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.soak", "--duration", "8", "--tenants", "2", "--concurrency", "6"]
    command += ["--redis-restart-at", "0.15", "--redis-down-s", "0.8"]
    command += ["--partition-at", "0.45", "--partition-s", "2", "--json"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.stdout.startswith("{"), finished.stderr[-2000:]
    result: dict[str, Any] = json.loads(finished.stdout)
    print(format_report(result))
    assert finished.returncode == (0 if result["ok"] else 1)
    return result


def test_the_short_soak_keeps_every_guarantee(report: dict[str, Any]) -> None:
    assert report["cross_tenant"] == 0, report["cross_tenant_examples"]
    assert report["stale_after_delete"] == 0, report["stale_examples"]
    assert report["failed_outside_outage"] == 0, report["failure_examples"]
    # A dead or unreachable Redis is a cache miss, never a failed request, so the faults cost nothing.
    assert report["failed_during_outage"] == 0, report["failure_examples"]
    assert report["failed_during_partition"] == 0, report["failure_examples"]
    assert report["keys_leaked"] == []
    assert report["keys_in_answers"] == 0
    assert report["upstream"]["saved"] > 0
    assert report["ok"], report["guarantees"]


def test_no_file_deleted_before_the_heal_is_served_after_it(report: dict[str, Any]) -> None:
    partition = report["partition"]
    assert partition["deleted_served_after_heal"] == 0, partition["deleted_served_after_heal_examples"]
    assert partition["deleted_served_after_heal_answers"] == 0


def test_the_cache_resumes_on_both_replicas_after_the_heal(report: dict[str, Any]) -> None:
    partition = report["partition"]
    assert partition["cache_resumed_after_s"] is not None
    assert set(partition["cache_resumed_per_replica_s"]) == {"0", "1"}
    assert None not in partition["cache_resumed_per_replica_s"].values()


def test_the_short_soak_covered_the_mix_and_the_outage(report: dict[str, Any]) -> None:
    assert set(report["by_kind"]) >= {"metadata", "metadata_foreign", "list", "download", "upload", "delete"}
    assert report["by_kind"]["metadata_foreign"] == {"404": report["by_kind"]["metadata_foreign"].get("404")}
    assert report["redis"]["killed_at_s"] is not None and report["redis"]["back_at_s"] is not None
    partition = report["partition"]
    assert partition["cut_at_s"] is not None and partition["restored_at_s"] is not None
    assert None not in partition["replica_restart_s"]
    # Deletes happened during the partition, the canaries among them, cached on both replicas first,
    # and the restarted replica carried held ones across its restart in its journal.
    assert partition["deleted_during_partition"] >= partition["canaries"]["deleted_during_partition"] == 2
    assert partition["canaries"] == {
        "planted": 2,
        "cached_on_every_replica": 2,
        "deleted_during_partition": 2,
    }
    assert partition["journal_lines_at_restart"] > 0
    assert partition["heal_sweeps"] >= 2
    assert report["upstream"]["logged"] == report["sent"] + report["upstream"]["probes"]
    assert report["upstream"]["cache_hits"] > 0
