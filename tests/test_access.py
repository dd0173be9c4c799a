"""Access lines, /metrics and usage for a mix of requests from two tenants, through a real socket."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from files_api_simulator import Simulator
from proxy.access import BatchedStdout, _timestamp, access_line, access_logger, log_access, start_access_log
from proxy.cache import CacheOutcome
from proxy.config import AdminConfig, RateLimit, Settings, UsageConfig
from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.routes import Operation
from tests.constants import ADMIN_KEY, ALL_SECRETS, ALPHA, BRAVO, GA_HEADERS, VERSION
from tests.support import (
    FILES_PROXY,
    WATCH,
    ProxyProcess,
    RedisServer,
    config_toml,
    free_port,
    served_proxy,
    team_environment,
    team_settings,
    wait_for,
    wait_until_up,
)

FIELDS = {
    "ts",
    "request_id",
    "upstream_request_id",
    "client_request_id",
    "tenant",
    "workspace",
    "method",
    "route",
    "file_id",
    "status",
    "cache",
    "bytes_in",
    "bytes_out",
    "upload_size_bytes",
    "duration_ms",
    "upstream_ms",
    "user_agent",
}


def _headers(team_key: str = ALPHA.proxy_key) -> dict[str, str]:
    return {"x-api-key": team_key, "anthropic-version": VERSION, "user-agent": "test-agent/1"}


def _settings(simulator_url: str, redis_url: str, **tenant_changes: Any) -> Settings:
    return team_settings(
        simulator_url,
        tenants=(dataclasses.replace(ALPHA.tenant(), **tenant_changes), BRAVO.tenant()),
        cache={"url": redis_url},
        admin=AdminConfig(key_sha256=hashlib.sha256(ADMIN_KEY.encode()).hexdigest()),
        usage=UsageConfig(flush_interval_s=0.1),
    )


def _config_file(tmp_path: Path, simulator_url: str, redis_url: str) -> Path:
    """The same proxy as a TOML file, for `files-proxy serve` and `files-proxy usage`."""
    admin_hash = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    sections = (
        f'[cache]\nurl = "{redis_url}"\n\n[usage]\nflush_interval_s = 0.1\n\n'
        f'[admin]\nkey_sha256 = "{admin_hash}"\n'
    )
    path = tmp_path / "proxy.toml"
    path.write_text(config_toml(simulator_url, sections))
    return path


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> Callable[[int], list[dict[str, Any]]]:
    """Wait for n access lines (they are written just after the last byte is sent) and parse them."""
    caplog.set_level(logging.INFO, logger="files_proxy.access")

    def lines(count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5
        while True:
            found = [json.loads(r.getMessage()) for r in caplog.records if r.name == "files_proxy.access"]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    return lines


def _usage_cli(config: Path, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [FILES_PROXY, "usage", "--config", str(config), "--json", *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    WATCH.feed(result.stdout + result.stderr)
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def _rows_by_workspace(usage: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["workspace"]: row for row in usage["rows"]}


def test_a_mix_of_requests_is_logged_counted_in_metrics_and_in_usage(
    simulator: Simulator,
    simulator_url: str,
    redis_server: RedisServer,
    access_lines: Callable[[int], list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    generated = simulator.add_file(ALPHA.upstream_key, filename="out.bin", size_bytes=5000)
    with (
        served_proxy(_settings(simulator_url, redis_server.url)) as served,
        httpx.Client(base_url=served.url) as client,
    ):
        upload = client.post(
            "/v1/files", headers=_headers(), files={"file": ("a.txt", b"x" * 300, "text/plain")}
        )
        uploaded_id = upload.json()["id"]
        responses = [
            upload,
            client.get("/v1/files", headers={**_headers(), "x-request-id": "trace-77"}),  # miss
            client.get("/v1/files", headers=_headers()),  # hit
            client.get(f"/v1/files/{uploaded_id}", headers=_headers()),  # hit: filled by the upload
            client.get(f"/v1/files/{generated}/content", headers=_headers()),
            client.delete(f"/v1/files/{uploaded_id}", headers=_headers()),
            client.get("/v1/files", headers=_headers(BRAVO.proxy_key)),
            client.get(f"/v1/files/{generated}", headers=_headers(BRAVO.proxy_key)),  # 404 for bravo
            client.get("/v1/files", headers={"authorization": "Bearer fp-nobody"}),  # 401
            client.get("/v1/messages", headers=_headers()),  # 404 from the proxy
        ]
        lines = access_lines(len(responses))
        metrics_text = client.get("/metrics").text
        time.sleep(0.3)  # two flush intervals
        config = _config_file(tmp_path, simulator_url, redis_server.url)
        usage = _usage_cli(config)

    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 200, 200, 404, 401, 404]
    assert len(lines) == len(responses)
    for line, response in zip(lines, responses, strict=True):
        assert set(line) == FIELDS
        assert line["status"] == response.status_code
        assert line["bytes_out"] == len(response.content)
        assert line["method"] == response.request.method
        assert line["user_agent"] == "test-agent/1" or line["tenant"] is None
        assert response.headers["request-id"] in (line["request_id"], line["upstream_request_id"])
    expected = [
        ("alpha", "alpha-prod", "/v1/files", "none", None),
        ("alpha", "alpha-prod", "/v1/files", "miss", None),
        ("alpha", "alpha-prod", "/v1/files", "hit", None),
        ("alpha", "alpha-prod", "/v1/files/{file_id}", "hit", uploaded_id),
        ("alpha", "alpha-prod", "/v1/files/{file_id}/content", "none", generated),
        ("alpha", "alpha-prod", "/v1/files/{file_id}", "none", uploaded_id),
        ("bravo", "bravo-prod", "/v1/files", "miss", None),
        ("bravo", "bravo-prod", "/v1/files/{file_id}", "miss", generated),
        (None, None, None, "none", None),
        ("alpha", "alpha-prod", None, "none", None),
    ]
    assert [(x["tenant"], x["workspace"], x["route"], x["cache"], x["file_id"]) for x in lines] == expected
    assert lines[0]["bytes_in"] == int(upload.request.headers["content-length"])  # the multipart body
    assert lines[0]["upload_size_bytes"] == upload.json()["size_bytes"] < lines[0]["bytes_in"]  # the file
    assert lines[4]["bytes_out"] == 5000
    assert lines[1]["client_request_id"] == "trace-77"
    assert lines[1]["upstream_ms"] is not None and lines[2]["upstream_ms"] is None
    assert lines[8]["request_id"] == responses[8].headers["request-id"]  # the proxy's own id

    samples = [s for family in text_string_to_metric_families(metrics_text) for s in family.samples]
    requests = Counter[tuple[str, str]]()
    for sample in samples:
        if sample.name == "files_proxy_requests_total":
            requests[(sample.labels["workspace"], sample.labels["cache"])] += int(sample.value)
    logged = Counter((x["workspace"] or "none", x["cache"]) for x in lines)
    assert requests == logged
    [bytes_out] = [
        s.value
        for s in samples
        if s.name == "files_proxy_bytes_out_total" and s.labels["workspace"] == "alpha-prod"
    ]
    assert bytes_out == sum(x["bytes_out"] for x in lines if x["workspace"] == "alpha-prod")

    rows = _rows_by_workspace(usage)
    assert set(rows) == {"alpha-prod", "bravo-prod"}
    assert rows["alpha-prod"] | {"workspace": "alpha-prod"} == {
        "workspace": "alpha-prod",
        "tenant": "alpha",
        "requests": 7,
        "uploads": 1,
        "upload_bytes": lines[0]["upload_size_bytes"],
        "downloads": 1,
        "download_bytes": 5000,
        "deletes": 1,
        "cache_hits": 2,
        "errors": 1,
    }
    assert (rows["bravo-prod"]["requests"], rows["bravo-prod"]["errors"]) == (2, 1)


def test_no_key_reaches_a_log_line(
    simulator_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with served_proxy(_settings(simulator_url, redis_server.url)) as served:
        for headers in (
            _headers(),
            {"authorization": f"Bearer {ALPHA.proxy_key}", "x-api-key": BRAVO.proxy_key},
            {"authorization": f"Basic {ALPHA.proxy_key}"},
            {"x-api-key": ALPHA.upstream_key},
        ):
            httpx.get(f"{served.url}/v1/files", headers=headers)
            httpx.get(f"{served.url}/v1/files/..%2Fx", headers=headers)
        time.sleep(0.2)
    output = caplog.text
    assert "files_proxy.access" in output or '"request_id"' in output
    assert not [secret for secret in ALL_SECRETS if secret in output]


@pytest.fixture
def two_proxies(
    simulator_url: str, redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[list[str], Path]]:
    """Two `files-proxy serve` processes sharing one redis-server, as two replicas would."""
    config = _config_file(tmp_path, simulator_url, redis_server.url)
    env = {**team_environment(), "PATH": "/usr/bin:/bin"}
    with (
        ProxyProcess(config, tmp_path / "replica0.out", env) as one,
        ProxyProcess(config, tmp_path / "replica1.out", env) as two,
    ):
        yield [one.url, two.url], config


def test_usage_is_summed_across_two_replicas_sharing_redis(two_proxies: tuple[list[str], Path]) -> None:
    (first, second), config = two_proxies
    for _ in range(3):
        assert httpx.get(f"{first}/v1/files", headers=_headers()).status_code == 200
    for _ in range(5):
        assert httpx.get(f"{second}/v1/files", headers=_headers()).status_code == 200
    assert httpx.get(f"{second}/v1/files", headers=_headers(BRAVO.proxy_key)).status_code == 200

    admin = httpx.get(f"{first}/admin/usage", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    time.sleep(0.3)
    usage = _usage_cli(config)

    rows = _rows_by_workspace(usage)
    assert (rows["alpha-prod"]["requests"], rows["bravo-prod"]["requests"]) == (8, 1)
    # Only the very first list was a miss: the page it stored is a hit on both replicas.
    assert rows["alpha-prod"]["cache_hits"] == 7
    assert admin.status_code == 200
    assert set(admin.json()["counters"]) <= set(rows["alpha-prod"])
    assert _rows_by_workspace(_usage_cli(config, "--workspace", "bravo-prod")).keys() == {"bravo-prod"}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-key"),
        pytest.param({"authorization": f"Bearer {ALPHA.proxy_key}"}, id="a-team-key"),
        pytest.param({"x-api-key": "fp-admin-wrong"}, id="wrong-key"),
    ],
)
def test_admin_usage_needs_the_admin_key(
    simulator_url: str, redis_server: RedisServer, headers: dict[str, str]
) -> None:
    with served_proxy(_settings(simulator_url, redis_server.url)) as served:
        response = httpx.get(f"{served.url}/admin/usage", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_rate_limit_answers_429_before_upstream_and_spares_the_other_tenant(
    simulator: Simulator, simulator_url: str, redis_server: RedisServer
) -> None:
    settings = _settings(simulator_url, redis_server.url, rate_limit=RateLimit(per_minute=60, burst=3))
    with served_proxy(settings) as served:
        alpha = [httpx.get(f"{served.url}/v1/files", headers=_headers()) for _ in range(5)]
        bravo = [httpx.get(f"{served.url}/v1/files", headers=_headers(BRAVO.proxy_key)) for _ in range(5)]

        redis_server.stop()  # the shared limiter is gone: each process limits on its own
        limited = [httpx.get(f"{served.url}/v1/files/file_x", headers=_headers()) for _ in range(5)]

    assert [r.status_code for r in alpha] == [200, 200, 200, 429, 429]
    assert alpha[3].json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(alpha[3].headers["retry-after"]) <= 60
    assert [r.status_code for r in bravo] == [200] * 5
    assert 429 in {r.status_code for r in limited}
    # Nothing refused with 429 reached upstream: only the admitted misses did.
    alpha_upstream = [r for r in simulator.received if r.header("x-api-key") == ALPHA.upstream_key]
    misses = [r for r in alpha + limited if r.status_code != 429 and "hit" not in r.headers["cache-status"]]
    assert len(alpha_upstream) == len(misses)


def _exchange(**changes: Any) -> Exchange:
    """A metadata hit of ALPHA's, as the edge would hand it to the access log."""
    exchange = Exchange(
        "req_1",
        "GET",
        started_at=1_764_504_000.123,
        started=0.0,
        user_agent='a "quoted" agent',
        tenant=ALPHA.tenant(),
        operation=Operation.METADATA,
        file_id="file_1",
        cache=CacheOutcome.hit(ttl=60, age=1),
        status=200,
        bytes_out=203,
        duration_ms=0.4,
    )
    return dataclasses.replace(exchange, **changes)


def _line(exchange: Exchange) -> dict[str, Any]:
    """The access line the README documents for this exchange."""
    return {
        "ts": _timestamp(exchange.started_at),
        "request_id": exchange.request_id,
        "upstream_request_id": None,
        "client_request_id": None,
        "tenant": "alpha",
        "workspace": ALPHA.workspace,
        "method": "GET",
        "route": "/v1/files/{file_id}",
        "file_id": "file_1",
        "status": 200,
        "cache": "hit",
        "bytes_in": 0,
        "bytes_out": 203,
        "upload_size_bytes": None,
        "duration_ms": 0.4,
        "upstream_ms": None,
        "user_agent": 'a "quoted" agent',
    }


def test_served_access_lines_reach_stdout_whole_and_in_order(capfd: pytest.CaptureFixture[str]) -> None:
    """`serve`'s setup: the batch writer alone on the access logger, writing every line whole."""
    exchanges = [_exchange(request_id=f"req_{n}") for n in range(3)]
    access_logger.setLevel(logging.INFO)
    handler = start_access_log()
    try:
        for exchange in exchanges:
            log_access(exchange)
    finally:
        handler.stop()
        access_logger.removeHandler(handler)
        access_logger.propagate = True
        access_logger.setLevel(logging.NOTSET)

    lines = capfd.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [_line(exchange) for exchange in exchanges]


@pytest.mark.parametrize("now", [0.0, 1_764_504_000.0, 1_764_504_000.5, 1_764_504_059.999, 1_764_590_399.25])
def test_timestamps_are_iso_utc_milliseconds(now: float) -> None:
    expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert _timestamp(now) == expected


def test_in_flight_requests_are_read_when_scraped() -> None:
    metrics = Metrics(cache_available=lambda: True)
    metrics.request_started()
    metrics.request_started()
    metrics.request_ended()

    families = {
        family.name: family for family in text_string_to_metric_families(metrics.exposition().decode())
    }
    [sample] = families["files_proxy_in_flight_requests"].samples
    assert sample.value == 1


def test_a_stdout_nobody_reads_drops_and_counts_lines_and_never_blocks() -> None:
    """Lines wait up to the bound, then are dropped and counted; `stop` still returns."""
    read_end, write_end = os.pipe()
    try:
        handler = BatchedStdout(write_end, interval_s=0.01, max_pending=100, drain_s=0.2)
        line = access_line(_exchange())
        for _ in range(5_000):  # about 2 MB: far more than a pipe and the bound hold
            handler.add(line)
        wait_for(lambda: handler.dropped > 0, what="dropped lines")
        stopper = threading.Thread(target=handler.stop)
        stopper.start()
        stopper.join(timeout=10)
        assert not stopper.is_alive()
        written = os.read(read_end, 1 << 20).count(b"\n")
        assert written > 0
        assert written + handler.dropped <= 5_000  # every line is written or counted, none twice
        assert handler.dropped >= 5_000 - 100 - written
    finally:
        os.close(read_end)
        os.close(write_end)


def test_dropped_access_lines_are_a_metric() -> None:
    metrics = Metrics(cache_available=lambda: True, access_lines_dropped=lambda: 7)
    families = {
        family.name: family for family in text_string_to_metric_families(metrics.exposition().decode())
    }
    [sample] = families["files_proxy_access_lines_dropped"].samples
    assert (sample.name, sample.value) == ("files_proxy_access_lines_dropped_total", 7)


def test_serve_with_a_stalled_stdout_keeps_answering_and_stops_on_sigterm(
    simulator_url: str, tmp_path: Path
) -> None:
    """`files-proxy serve` whose stdout pipe nobody reads: requests are answered, the dropped lines
    are counted, and SIGTERM still ends it within the grace period plus the log's drain time."""
    config = tmp_path / "proxy.toml"
    config.write_text(config_toml(simulator_url, "[server]\nshutdown_grace_s = 2\n"))
    port = free_port()
    # Not ProxyProcess, which writes the output to a file: here stdout is a pipe that nobody reads.
    command = [FILES_PROXY, "serve", "--config", str(config), "--port", str(port)]
    env = {**os.environ, **team_environment()}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env) as proxy:
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url)
            with httpx.Client(base_url=url, headers=GA_HEADERS) as client:
                statuses = {client.get("/v1/files").status_code for _ in range(12_000)}
                metrics = client.get("/metrics").text
            assert statuses == {200}
            dropped = [
                line for line in metrics.splitlines() if line.startswith("files_proxy_access_lines_dropped")
            ]
            assert dropped and float(dropped[0].split()[-1]) > 0
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(timeout=2 + 10) == 0
        finally:
            if proxy.poll() is None:
                proxy.kill()
