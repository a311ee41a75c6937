"""The Grafana dashboards (charts/llamafleet/files/dashboards, written by scripts/dashboards.py)
and the chart's monitoring objects: the files are the script's output, every series and label a
query reads is the contract's, and the chart renders them (ConfigMaps for Grafana's sidecar, the
operator's PodMonitor and metrics port). test_dashboards_prometheus.py runs the queries."""

from __future__ import annotations

import json
import subprocess
import sys

import kubernetes_validate
from llamafleet.common import contract as C

from tests.support.monitoring import (
    CHART,
    CUSTOM_KINDS,
    HELM,
    ROOT,
    dashboards,
    queried_labels,
    queried_series,
    render,
    targets,
    unknown,
    variable_queries,
)

# --- the files ---------------------------------------------------------------------------------


def test_the_dashboards_are_the_generators_output() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts/dashboards.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(dashboards()) == {"fleet", "pod"}


def test_every_query_reads_only_the_contracts_series_and_labels() -> None:
    for name, d in dashboards().items():
        exprs = [t["expr"] for _, t in targets(d)] + variable_queries(d)
        series = set().union(*map(queried_series, exprs))
        assert series and not unknown(series), (name, unknown(series))
        assert not queried_labels(exprs), (name, queried_labels(exprs))


def test_the_checks_catch_a_renamed_series_or_label() -> None:
    assert unknown(queried_series('sum(rate(llamafleet_tokens_total{x="1"}[5m])) + up')) \
        == {"llamafleet_tokens_total"}
    assert unknown(queried_series("kube_pod_info{}")) == {"kube_pod_info"}
    assert unknown(queried_series("histogram_quantile(0.9, sum by (le) (rate("
                                  "llamafleet_time_to_first_token_seconds_bucket[1m])))")) == set()
    assert queried_labels(['sum by (podd) (llamafleet_ready{nmespace="x"})']) == {"podd", "nmespace"}


def test_the_fleet_dashboard_shows_what_the_issue_lists() -> None:
    fleet, pod = dashboards()["fleet"], dashboards()["pod"]
    text = json.dumps(fleet)
    for series in (C.PodMetric.COMPLETION_TOKENS, C.PodMetric.REQUESTS,
                   C.PodMetric.TIME_TO_FIRST_TOKEN, C.PodMetric.INTER_TOKEN_LATENCY,
                   C.PodMetric.QUEUE_DEPTH, C.PodMetric.KV_CACHE_UTILIZATION,
                   C.PodMetric.PREFIX_TOKENS_REUSED, C.RouterMetric.AFFINITY,
                   C.RouterMetric.HOLD_QUEUE_DEPTH, C.RouterMetric.REFUSED,
                   C.OperatorMetric.AUTOSCALER_DECISIONS, C.OperatorMetric.AUTOSCALER_DESIRED_REPLICAS,
                   C.OperatorMetric.COLD_START, C.RouterMetric.COLD_START,
                   C.OperatorMetric.RECONCILES, C.OperatorMetric.CONDITION):
        assert series in text, series
    pod_text = json.dumps(pod)
    assert C.PodMetric.ENGINE_STEP_SECONDS in pod_text and '"pod"' in pod_text
    for d in (fleet, pod):
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        assert all(t["datasource"]["uid"] == "${datasource}" for _, t in targets(d))


# --- the chart ---------------------------------------------------------------------------------


def test_lint_strict_with_monitoring_on() -> None:
    r = subprocess.run([str(HELM), "lint", "--strict", str(CHART), "--set", "monitoring.enabled=true",
                        "--set", "sample.enabled=true"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_monitoring_is_off_by_default_and_each_part_has_its_switch() -> None:
    kinds = [d["kind"] for d in render()]
    assert not {"PodMonitor", "PrometheusRule", "ConfigMap"} & set(kinds)
    counts = {flag: [d["kind"] for d in render(flag)] for flag in (
        "monitoring.dashboards=true", "monitoring.operatorPodMonitor=true",
        "monitoring.podMonitor=true", "monitoring.prometheusRule=true")}
    assert counts["monitoring.dashboards=true"].count("ConfigMap") == 2
    assert counts["monitoring.operatorPodMonitor=true"].count("PodMonitor") == 1
    assert counts["monitoring.podMonitor=true"].count("PodMonitor") == 1
    assert counts["monitoring.prometheusRule=true"].count("PrometheusRule") == 1


def test_dashboards_render_as_configmaps_for_grafanas_sidecar() -> None:
    docs = render("monitoring.enabled=true", "monitoring.dashboardNamespace=monitoring")
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert set(maps) == {"rel-llamafleet-dashboard-fleet", "rel-llamafleet-dashboard-pod"}
    for name, d in dashboards().items():
        cm = maps[f"rel-llamafleet-dashboard-{name}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "monitoring"
        assert json.loads(cm["data"][f"{name}.json"]) == d
    for d in docs:
        if d["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(d, "1.33.0", strict=True)


def test_the_operator_serves_metrics_on_the_contracts_port_and_its_pod_monitor_finds_them() -> None:
    from llamafleet.operator.settings import OperatorSettings

    docs = render("monitoring.enabled=true")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports["metrics"] == C.OPERATOR_METRICS_PORT == OperatorSettings().metrics_port
    assert env[C.operator_env_name("metrics_port")] == str(C.OPERATOR_METRICS_PORT)
    monitor = next(d for d in docs if d["kind"] == "PodMonitor"
                   and d["metadata"]["name"] == "rel-llamafleet-operator")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "honorLabels": True}
    # Port 0 turns the operator's metrics and their PodMonitor off.
    docs = render("monitoring.enabled=true", "monitoring.operatorMetricsPort=0")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert "metrics" not in {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PodMonitor"] == ["rel-llamafleet"]
    for d in docs:
        if d["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(d, "1.33.0", strict=True)


def test_the_pods_pod_monitor_sets_the_job_the_alerts_select() -> None:
    monitor = next(d for d in render("monitoring.podMonitor=true") if d["kind"] == "PodMonitor")
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "llamafleet"
    assert 'job="llamafleet"' in (CHART / "files/alerts.yaml").read_text()
