"""The alerts (charts/llamafleet/files/alerts.yaml): promtool checks the rules and runs their
unit tests (tests/data/alerts_test.yaml); the chart's PrometheusRule carries the file as is;
every series and label the rules read is the contract's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.monitoring import ROOT, queried_labels, queried_series, render, unknown

ALERTS = ROOT / "charts/llamafleet/files/alerts.yaml"
UNIT_TESTS = ROOT / "tests/data/alerts_test.yaml"
ALERT_NAMES = {"LlamafleetPodNotReady", "LlamafleetKVCacheSaturated", "LlamafleetErrorRate",
               "LlamafleetRouterRefusals", "LlamafleetRequestsHeldTooLong",
               "LlamafleetAutoscalerAtMax"}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run scripts/system-deps.sh (Debian's prometheus)")
    return path


def test_promtool_checks_the_rules(promtool: str) -> None:
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_passes_its_promtool_unit_tests(promtool: str) -> None:
    r = subprocess.run([promtool, "test", "rules", str(UNIT_TESTS)], capture_output=True,
                       text=True, cwd=UNIT_TESTS.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_each_alert_has_unit_tests_where_it_fires_and_where_it_does_not() -> None:
    assert {r["alert"] for r in rules()} == ALERT_NAMES
    cases = [c for t in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
             for c in t["alert_rule_test"]]
    for name in ALERT_NAMES:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name} never fires in its tests"
        assert any(not c["exp_alerts"] for c in mine) or name == "LlamafleetRouterRefusals", \
            f"{name} is never shown quiet"


def test_the_promtool_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    """A rule whose threshold changed no longer matches its tests."""
    text = ALERTS.read_text().replace("> 0.05", "> 0.5")
    (tmp_path / "alerts.yaml").write_text(text)
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(tmp_path / "alerts.yaml")]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests))
    r = subprocess.run([promtool, "test", "rules", str(tmp_path / "t.yaml")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "LlamafleetErrorRate" in r.stdout + r.stderr


def test_the_rules_read_only_the_contracts_series_and_labels() -> None:
    exprs = [r["expr"] for r in rules()]
    series = set().union(*map(queried_series, exprs))
    assert "llamafleet_ready" in series and "llamafleet_operator_autoscaler_max_replicas" in series
    assert not unknown(series)
    assert not queried_labels(exprs) - {"severity"}, queried_labels(exprs)
    for r in rules():
        for label in ("summary", "description"):
            assert r["annotations"][label]


def test_the_chart_renders_the_rule_file_as_a_prometheus_rule() -> None:
    assert not [d for d in render() if d["kind"] == "PrometheusRule"]  # off by default
    for flag in ("monitoring.enabled=true", "monitoring.prometheusRule=true"):
        (rule,) = [d for d in render(flag, "monitoring.labels.release=kps")
                   if d["kind"] == "PrometheusRule"]
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
        assert rule["metadata"]["labels"]["release"] == "kps"
