"""Alert rules and the Grafana dashboard name only metrics (and labels) the gateway exports.

The names are collected from a live registry after traffic through the real app and the fake
backend, so a renamed metric breaks this test, not a night's paging. No promtool binary is
available here: the PromQL is checked for balanced brackets and known names, not parsed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.settings import Settings
from tests.helpers import GatewayServer, create_key

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
_SELECTOR = re.compile(r"\b(gateway_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, fake_backend: Any) -> dict[str, set[str]]:
    """Sample name -> label names, from a live gateway after some traffic."""
    from tests.conftest import make_settings

    settings: Settings = make_settings(tmp_path_factory.mktemp("alerts"), fake_backend.url)
    _, key = create_key(settings, "admin")
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}) as c:
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "Hello there"}]}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert c.post("/v1/chat/completions", json={**chat, "stream": True}).status_code == 200
        metrics = gw.services.metrics
        assert metrics is not None
        names: dict[str, set[str]] = {}
        for family in metrics.registry.collect():
            labels = {k for s in family.samples for k in s.labels}
            for suffix in _SUFFIXES.get(family.type, ("",)):
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        # Families that are empty until something happens (a nightly run) still say their labels.
        names.setdefault("gateway_eval_last_run_regressed", set()).add("kind")
        names.setdefault("gateway_eval_last_run_failed", set()).add("kind")
        names.setdefault("gateway_eval_last_run_timestamp_seconds", set()).add("kind")
        names.setdefault("gateway_eval_metric", set()).update({"kind", "metric"})
        names["gateway_retrieval_index_chunks"].add("collection")
        names["gateway_retrieval_index_info"].update({"collection", "version"})
    return names


def _check_expr(expr: str, exported: dict[str, set[str]], where: str) -> set[str]:
    for pair in ("()", "[]", "{}"):
        assert expr.count(pair[0]) == expr.count(pair[1]), f"{where}: unbalanced {pair} in {expr!r}"
    used = set()
    for name, matchers in _SELECTOR.findall(expr):
        assert name in exported, f"{where}: {name} is not exported (known: {sorted(exported)})"
        used.add(name)
        for label in _MATCHER.findall(matchers or ""):
            assert label in exported[name] | _TARGET_LABELS, f"{where}: {name} has no label {label!r}"
    assert used, f"{where}: names no gateway metric: {expr!r}"
    return used


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_name_exported_metrics(exported: dict[str, set[str]]) -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    used: set[str] = set()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]
        used |= _check_expr(rule["expr"], exported, rule["alert"])
    # What the issue asks alerts for: errors, p99 latency, guard block rate, spool growth, backends, nightly drift.
    for wanted in (
        "GatewayHighErrorRate",
        "GatewayP99LatencyHigh",
        "GatewayGuardBlockRateJump",
        "GatewayAuditSpoolGrowing",
        "GatewayBackendDown",
        "GatewayEvalRegressed",
    ):
        assert wanted in names
    assert {"gateway_requests_total", "gateway_audit_spool_bytes", "gateway_backend_up"} <= used


def test_dashboard_panels_query_exported_metrics(exported: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= _check_expr(target["expr"], exported, panel["title"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            _check_expr(variable["query"], exported, "variable " + variable["name"])
    # Every per-request family is on the dashboard.
    for name in (
        "gateway_requests_total",
        "gateway_request_stage_duration_seconds_bucket",
        "gateway_tokens_total",
        "gateway_stream_tokens_per_second_bucket",
        "gateway_guard_verdicts_total",
        "gateway_guard_score_bucket",
    ):
        assert name in used, name


def test_pod_monitor_scrapes_the_gateways_metrics_port() -> None:
    monitor = yaml.safe_load((DEPLOY / "prometheus" / "podmonitor.yaml").read_text())
    deployment = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [container] = [c for c in pod["spec"]["containers"] if c["name"] == "gateway"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (
        ports[endpoint["port"]]
        == int(env["GATEWAY_METRICS_PORT"])
        == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    )
    assert endpoint["path"] == "/metrics"
