"""A short run of the load and soak script (`python -m bench.soak`), as CI runs it, with Redis killed
and restarted halfway: nothing mixed between tenants, nothing failed outside the outage, no key in
the proxy's output, and the cache saved upstream requests."""

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
    command = [sys.executable, "-m", "bench.soak", "--duration", "4", "--tenants", "2", "--concurrency", "6"]
    command += ["--redis-restart-at", "0.4", "--redis-down-s", "0.8", "--json"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert finished.stdout.startswith("{"), finished.stderr[-2000:]
    result: dict[str, Any] = json.loads(finished.stdout)
    print(format_report(result))
    assert finished.returncode == (0 if result["ok"] else 1)
    return result


def test_the_short_soak_keeps_every_guarantee(report: dict[str, Any]) -> None:
    assert report["cross_tenant"] == 0, report["cross_tenant_examples"]
    assert report["stale_after_delete"] == 0, report["stale_examples"]
    assert report["failed_outside_outage"] == 0, report["failure_examples"]
    # A dead Redis is a cache miss, never a failed request, so the outage itself costs nothing either.
    assert report["failed_during_outage"] == 0, report["failure_examples"]
    assert report["keys_leaked"] == []
    assert report["keys_in_answers"] == 0
    assert report["upstream"]["saved"] > 0
    assert report["ok"], report["guarantees"]


def test_the_short_soak_covered_the_mix_and_the_outage(report: dict[str, Any]) -> None:
    assert set(report["by_kind"]) >= {"metadata", "metadata_foreign", "list", "download", "upload", "delete"}
    assert report["by_kind"]["metadata_foreign"] == {"404": report["by_kind"]["metadata_foreign"].get("404")}
    assert report["redis"]["killed_at_s"] is not None and report["redis"]["back_at_s"] is not None
    assert report["upstream"]["logged"] == report["sent"]
    assert report["upstream"]["cache_hits"] > 0
