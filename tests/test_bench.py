"""The bench's smoke run, end to end: real simulator, redis-server and proxy processes, no wrk or nginx.

It checks the results, not only that the harness ran: one upstream request for many concurrent misses,
a download through the proxy byte for byte the direct one, an upload stored whole, a noisy-neighbour
row per attack with the victim's whole schedule accounted for, and the table, JSON and PNG written.
Then no process of the run may be left.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import psutil
import pytest

from bench.__main__ import main
from bench.load import parse_wrk_output
from bench.noisy import ATTACKS
from bench.scenarios import _METRIC_LINE
from bench.services import Services
from bench.table import Row, markdown_table


def _descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_smoke_run_measures_single_flight_streaming_and_noisy_neighbours(tmp_path: Path) -> None:
    before = _descendants()

    assert main(["--smoke", "--out", str(tmp_path)]) == 0

    assert _descendants() <= before, "the bench left a process running"
    rows = json.loads((tmp_path / "latest.json").read_text())["rows"]
    flight = next(row for row in rows if "concurrent GETs" in row["scenario"])
    assert flight["numbers"]["upstream_requests"] == 1
    assert flight["numbers"]["ok"] == flight["numbers"]["requests"] == 100
    transfers = [
        row
        for row in rows
        if row["server"] == "proxy (redis)" and row["scenario"].endswith(("download", "upload"))
    ]
    assert [row["scenario"] for row in transfers] == ["4 MB download", "4 MB upload"]
    for row in transfers:
        assert "BYTES DIFFER" not in row["measured"] and "status" not in row["measured"]
        assert row["numbers"]["mb_per_s"] > 0
    alone, *attacked = [row for row in rows if row["scenario"].startswith("noisy neighbour: ")]
    assert alone["target"] == "baseline" and alone["numbers"]["errors"] == 0
    assert len(attacked) == len(ATTACKS)
    for row in (alone, *attacked):
        # 8 connections, a request due every 10 ms each, for the smoke run's 2 s window: all answered or counted.
        assert row["numbers"]["requests"] == pytest.approx(1600, abs=8)
        assert 0 < row["numbers"]["p50_ms"] <= row["numbers"]["p99_ms"]
        assert row["numbers"]["peak_rss_mb"] > 0
        assert 0 <= row["numbers"]["steal_share"] < 1 and "hypervisor steal " in row["measured"]
        # The control: the same victim load on an identical proxy, in the same window, not attacked.
        assert 0 < row["numbers"]["control_p50_ms"] <= row["numbers"]["control_p99_ms"]
        assert row["numbers"]["p99_ratio"] == row["numbers"]["p99_ms"] / row["numbers"]["control_p99_ms"]
        assert "; control p50 " in row["measured"] and " x control" in row["measured"]
    for row, attack in zip(attacked, ATTACKS, strict=True):
        assert row["scenario"].startswith(f"noisy neighbour: {attack.label}")
        assert "attack: " in row["measured"] and row["numbers"]["p99_ratio_alone"] > 0
        assert row["target"].startswith("victim p99 <= 3 x the control's (same window, no attack)")
    assert "SIGTERM" in attacked[-1]["measured"]
    table = (tmp_path / "latest.md").read_text()
    assert "| 100 concurrent GETs of one uncached file | proxy (redis) |" in table
    assert "machine: " in table and "command: `python -m bench" in table
    assert "(steal) during each scenario: single-flight " in table
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")


def test_wrk_summary_line_is_parsed() -> None:
    stdout = (
        "Running 1s test @ http://127.0.0.1:1\n"
        'BENCH_JSON {"requests":1200,"duration_s":1.002,"rps":1197.6,"p50_ms":0.812,"p99_ms":3.5,'
        '"status_errors":1,"socket_errors":2,"errors":3}\n'
    )
    result = parse_wrk_output(stdout)
    assert (result.requests, result.rps, result.p50_ms, result.p99_ms, result.errors) == (
        1200,
        1197.6,
        0.812,
        3.5,
        3,
    )


def test_wrk_output_without_summary_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="BENCH_JSON"):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_table_marks_baselines_and_misses() -> None:
    rows = [
        Row("metadata hit", "bare Starlette", "baseline", "9,000 req/s", None),
        Row("metadata hit", "proxy (redis)", ">= 0.8 x bare", "0.9 x bare", True),
        Row("list-page hit", "proxy (redis)", ">= 0.7 x bare", "0.5 x bare", False),
    ]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| scenario | server | target | measured | met |"
    assert lines[2:] == [
        "| metadata hit | bare Starlette | baseline | 9,000 req/s | — |",
        "| metadata hit | proxy (redis) | >= 0.8 x bare | 0.9 x bare | yes |",
        "| list-page hit | proxy (redis) | >= 0.7 x bare | 0.5 x bare | **no** |",
    ]


def test_cache_counts_read_every_route_including_templates_with_braces() -> None:
    exposition = "\n".join(
        [
            'files_proxy_requests_total{cache="hit",method="GET",route="/v1/files/{file_id}",status_class="2xx"} 900.0',
            'files_proxy_requests_total{cache="miss",method="GET",route="/v1/files",status_class="2xx"} 100.0',
            'files_proxy_requests_created{cache="hit",method="GET",route="/v1/files",status_class="2xx"} 1.7e+09',
        ]
    )
    assert _METRIC_LINE.findall(exposition) == [("hit", "900.0"), ("miss", "100.0")]


def test_the_server_alone_answers_the_bytes_bare_starlette_answers(tmp_path: Path) -> None:
    """The hit rows' floor and ceiling serve the same answers, so their CPU differs by the framework."""
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps({"metadata": '{"id":"file_a"}', "list": '{"data":[]}'}))
    with Services(tmp_path) as services:
        answers = [
            [
                (response.status_code, response.headers["content-type"], response.content)
                for response in (
                    httpx.get(f"{service.url}{path}") for path in ("/v1/files/file_a", "/v1/files")
                )
            ]
            for service in (services.bare(bodies), services.bare(bodies, framework=False))
        ]
    assert (
        answers[0]
        == answers[1]
        == [
            (200, "application/json", b'{"id":"file_a"}'),
            (200, "application/json", b'{"data":[]}'),
        ]
    )
