"""The monitoring files under deploy/ parse, and their PromQL only names metrics the proxy exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "files-proxy.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
JOB = "files-proxy"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"inf", "nan", "atan2"}
)
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)")
_DURATION = re.compile(r"(?:\d+(?:ms|s|m|h|d|w|y))+")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: what is left once strings, Grafana variables, label
    matchers, ranges and grouping clauses are removed, less functions, aggregations and keywords."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def exposed_names() -> frozenset[str]:
    """Every series name the proxy's own registry exposes, and `up`, which Prometheus adds."""
    metrics = Metrics(cache_available=lambda: True)
    names = {"up"}
    for family in metrics.registry.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif family.type == "gauge":
            names.add(family.name)
        else:
            raise AssertionError(
                f"metric {family.name} has type {family.type}: teach exposed_names() about it"
            )
    return frozenset(names)


def family_names() -> set[str]:
    return {family.name for family in Metrics(cache_available=lambda: True).registry.collect()}


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def exprs_in(node: Any) -> Iterator[str]:
    """Every `expr` of the dashboard, panels nested in rows included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from exprs_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from exprs_in(item)


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text())
    assert isinstance(loaded, dict) and isinstance(loaded.get("groups"), list) and loaded["groups"]
    rules: list[dict[str, Any]] = []
    for group in loaded["groups"]:
        assert isinstance(group.get("name"), str) and group["name"]
        assert isinstance(group.get("rules"), list) and group["rules"], f"group {group['name']} has no rules"
        rules.extend(group["rules"])
    return rules


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in alert_rules() if "alert" in rule]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        ('up{job="files-proxy"} == 0', {"up"}),
        (
            'histogram_quantile(0.99, sum by (le) (rate(a_bucket{cache="hit"}[5m]))) > 0.05',
            {"a_bucket"},
        ),
        (
            'sum without (instance) (rate(a_total{x=~"$ws", y="{}"}[$__rate_interval])) / sum(b_total)',
            {"a_total", "b_total"},
        ),
        ("rate(a_total[5m] offset 1h) and on (job) b", {"a_total", "b"}),
        ("sum(a) by (route) > bool 1e3", {"a"}),
        ("max_over_time(a[${__range}])", {"a"}),
    ],
)
def test_metric_names_finds_selected_metrics_only(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_exposed_names_follow_the_exposition_format() -> None:
    names = exposed_names()
    assert {
        "up",
        "files_proxy_requests_total",
        "files_proxy_request_duration_seconds_bucket",
        "files_proxy_request_duration_seconds_count",
        "files_proxy_in_flight_requests",
    } <= names
    assert "files_proxy_requests" not in names


def test_dashboard_parses_and_has_its_variables() -> None:
    board = dashboard()
    assert board["title"] and board["uid"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    workspace = variables["workspace"]
    query = workspace["query"]["query"] if isinstance(workspace["query"], dict) else workspace["query"]
    assert query == "label_values(files_proxy_requests_total, workspace)"


def test_every_dashboard_panel_has_a_title_a_unit_and_queries() -> None:
    panels = [panel for panel in dashboard()["panels"] if panel["type"] != "row"]
    assert len(panels) >= 8
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["title"].strip()
        assert panel["fieldConfig"]["defaults"]["unit"], f"panel {panel['title']!r} has no unit"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]


def test_dashboard_queries_only_name_exposed_metrics() -> None:
    exposed = exposed_names()
    board = dashboard()
    exprs = list(exprs_in(board["panels"]))
    assert len(exprs) >= 10
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= exposed, f"{sorted(names - exposed)} in {expr!r} are not exposed"
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.fullmatch(query)
        assert match, f"variable {variable['name']} query {query!r}"
        assert match.group(1) in exposed


def test_dashboard_shows_every_metric() -> None:
    used = {name for expr in exprs_in(dashboard()["panels"]) for name in metric_names(expr)}
    for family in family_names():
        assert any(name.startswith(family) for name in used), f"{family} is on no dashboard panel"


def test_alerts_are_complete_and_only_name_exposed_metrics() -> None:
    exposed = exposed_names()
    rules = alerts()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules:
        name = rule["alert"]
        assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), f"{name}: no expr"
        assert isinstance(rule.get("for"), str) and _DURATION.fullmatch(rule["for"]), f"{name}: for"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, f"{name}: severity"
        assert str(rule.get("annotations", {}).get("summary", "")).strip(), f"{name}: no summary"
        selected = metric_names(rule["expr"])
        assert selected, f"{name}: no metric found in {rule['expr']!r}"
        assert selected <= exposed, f"{name}: {sorted(selected - exposed)} are not exposed"


def test_recording_rules_only_name_exposed_metrics() -> None:
    exposed = exposed_names()
    for rule in alert_rules():
        if "record" in rule:
            assert metric_names(rule["expr"]) <= exposed, rule["record"]


def test_alerts_cover_the_failure_modes() -> None:
    by_name = {rule["alert"]: rule for rule in alerts()}
    assert set(by_name) >= {
        "FilesProxyUpstreamErrors",
        "FilesProxyCacheDown",
        "FilesProxyCacheHitLatencyHigh",
        "FilesProxyLatencyHigh",
        "FilesProxyUsageFlushFailing",
        "FilesProxyDown",
    }
    assert f'up{{job="{JOB}"}}' in by_name["FilesProxyDown"]["expr"]
    assert 'status_class="5xx"' in by_name["FilesProxyUpstreamErrors"]["expr"]
    assert "files_proxy_cache_available" in by_name["FilesProxyCacheDown"]["expr"]


def test_prometheus_scrapes_the_proxy_and_loads_the_alerts() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert isinstance(config, dict)
    for path in config["rule_files"]:
        assert (PROMETHEUS.parent / path).is_file(), f"rule file {path} is missing"
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs[JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config.get("global", {}).get("scrape_interval")) == "15s"
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == ["files-proxy:8080"]
