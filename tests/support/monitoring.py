"""What the monitoring tests share: the chart's dashboards and its rendering, and the check
that a PromQL expression reads only the contract's series and labels (queried_series,
queried_labels, unknown). Used by tests/operator/test_dashboards.py, test_alerts.py and
test_dashboards_prometheus.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from llamafleet.common import contract as C

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools/bin/helm"
CHART = ROOT / "charts/llamafleet"
DASHBOARDS = CHART / "files/dashboards"
CUSTOM_KINDS = {"LLMService", "PodMonitor", "PrometheusRule"}  # not in the upstream schemas

# Series from outside llamafleet that a query may read, and why.
EXTERNAL_SERIES = {"up": "Prometheus' own: a serve pod that never answered its metrics port"}
# Labels a query may name besides the contract's: Prometheus' and the PodMonitors' target
# labels, and histograms' `le`.
TARGET_LABELS = {"pod", "job", "endpoint", "le", C.INSTANCE_METRIC_LABEL}
SUFFIXES = ("_bucket", "_count", "_sum", "_info")


def queried_series(expr: str) -> set[str]:
    """The series an expression selects: every llamafleet_* name, and any name a label matcher
    or range follows (`up{...}`)."""
    found = set(re.findall(r"\bllamafleet_\w+", expr))
    found |= {m for m in re.findall(r"([a-zA-Z_:][\w:]*)\s*[{\[]", expr)
              if m not in ("by", "on", "without", "ignoring", "group_left", "group_right")}
    return found


def queried_labels(exprs: list[str]) -> set[str]:
    """Labels the expressions name (matchers, by/on/without clauses, label_values) that are
    neither the contract's nor a target label."""
    names = set()
    for e in exprs:
        names |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)(?!=)", e))
        for clause in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", e):
            names |= {x.strip() for x in clause.split(",") if x.strip()}
        names |= set(re.findall(r"label_values\(.*,\s*(\w+)\)\s*$", e))
    known = {v for k, v in vars(C.MetricLabel).items() if k.isupper()} | TARGET_LABELS
    return names - known


def unknown(series: set[str]) -> set[str]:
    """Series that are neither the contract's (a histogram's or an Info's suffixes allowed)
    nor listed in EXTERNAL_SERIES."""
    names = C.metric_names()

    def known(s: str) -> bool:
        return s in names or s in EXTERNAL_SERIES or any(
            s.endswith(x) and s.removesuffix(x) in names for x in SUFFIXES)

    return {s for s in series if not known(s)}


def dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def targets(dashboard: dict) -> list[tuple[str, dict]]:
    """(panel title, target) for every query of a dashboard."""
    return [(p["title"], t) for p in dashboard["panels"] for t in p.get("targets", ())]


def variable_queries(dashboard: dict) -> list[str]:
    return [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def render(*sets: str) -> list[dict]:
    if not HELM.exists():
        pytest.fail("helm is missing: run scripts/system-deps.sh")
    args = [str(HELM), "template", "rel", str(CHART), "-n", "llm"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]
