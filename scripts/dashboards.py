"""Writes the chart's Grafana dashboards (charts/llamafleet/files/dashboards/*.json) from the
series that llamafleet.common.contract names, so a renamed series cannot leave a dashboard
reading nothing: tests/operator/test_dashboards.py checks that the files are this script's
output and that every series a query reads is the contract's, and
tests/operator/test_dashboards_prometheus.py runs every query against a real Prometheus.

    .venv/bin/python scripts/dashboards.py          # rewrite the files
    .venv/bin/python scripts/dashboards.py --check  # exit 1 when they are out of date

Two dashboards: `fleet` (one LLMService, or all, as a whole: pods, router, operator) and
`pod` (the same figures per pod, and the engine's step profile where STEP_PROFILE is on).
Series are selected by `namespace` and `app_kubernetes_io_instance` (the LLMService's name:
the chart's PodMonitor copies it onto every series), the operator's by `namespace` and
`llmservice`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llamafleet.common.contract import INSTANCE_METRIC_LABEL
from llamafleet.common.contract import MetricLabel as L
from llamafleet.common.contract import OperatorMetric as O
from llamafleet.common.contract import PodMetric as P
from llamafleet.common.contract import RouterMetric as R

OUT = Path(__file__).resolve().parents[1] / "charts/llamafleet/files/dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
SEL = f'{L.NAMESPACE}=~"$namespace", {INSTANCE_METRIC_LABEL}=~"$llmservice"'
OP_SEL = f'{L.NAMESPACE}=~"$namespace", {L.LLMSERVICE}=~"$llmservice"'
POD_SEL = SEL + ', pod=~"$pod"'


def rate(series: str, sel: str, by: str = "", extra: str = "") -> str:
    """sum [by (...)] (rate(series{sel, extra}[$__rate_interval]))"""
    inner = ", ".join(x for x in (sel, extra) if x)
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({series}{{{inner}}}{RATE}))"


def quantile(q: float, histogram: str, sel: str, by: str = "") -> str:
    return (f"histogram_quantile({q}, sum by ({', '.join(x for x in (by, 'le') if x)}) "
            f"(rate({histogram}_bucket{{{sel}}}{RATE})))")


def target(expr: str, legend: str, table: bool = False) -> dict[str, Any]:
    """A query; ``table``: one instant value per series, for a table panel."""
    return {"expr": expr, "legendFormat": legend,
            **({"instant": True, "range": False, "format": "table"} if table else {})}


def panel(title: str, description: str, *targets: dict[str, Any], unit: str = "short",
          kind: str = "timeseries") -> dict[str, Any]:
    return {"title": title, "description": description, "type": kind, "datasource": DS,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": targets}


def latency(title: str, histogram: str, sel: str, description: str, by: str = "") -> dict:
    who = f"{{{{{by}}}}} " if by else ""
    return panel(title, description,
                 *(target(quantile(q, histogram, sel, by), f"{who}p{int(q * 100)}")
                   for q in (0.5, 0.9, 0.99)), unit="s")


def variable(name: str, label: str, query: str, hidden: bool = False) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
            "includeAll": True, "multi": True, "allValue": ".*", "current": {},
            "sort": 1, "hide": 2 if hidden else 0}


def layout(rows: list[tuple[str, list[dict]]]) -> list[dict]:
    """Rows of panels, three to a line (Grafana's 24-column grid), refIds A, B, ..."""
    out, y, ident = [], 0, 1
    for title, panels in rows:
        out.append({"type": "row", "title": title, "collapsed": False, "id": ident,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        ident, y = ident + 1, y + 1
        for i, p in enumerate(panels):
            p = {**p, "id": ident, "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)}}
            p["targets"] = [{**t, "datasource": DS, "refId": chr(65 + n)}
                            for n, t in enumerate(p["targets"])]
            out.append(p)
            ident += 1
        y += 8 * ((len(panels) + 2) // 3)
    return out


def dashboard(uid: str, title: str, description: str, variables: list[dict],
              rows: list[tuple[str, list[dict]]]) -> dict[str, Any]:
    datasource = {"name": "datasource", "label": "Prometheus", "type": "datasource",
                  "query": "prometheus", "current": {}, "hide": 0}
    return {"uid": uid, "title": title, "description": description,
            "tags": ["llamafleet"], "timezone": "browser", "schemaVersion": 39, "version": 1,
            "editable": True, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": [datasource, *variables]}, "annotations": {"list": []},
            "panels": layout(rows)}


NAMESPACE = variable("namespace", "Namespace", f"label_values({P.MODEL}_info, {L.NAMESPACE})")
LLMSERVICE = variable("llmservice", "LLMService", f'label_values({P.MODEL}_info{{{L.NAMESPACE}'
                      f'=~"$namespace"}}, {INSTANCE_METRIC_LABEL})')
POD = variable("pod", "Pod", f"label_values({P.MODEL}_info{{{SEL}}}, pod)")


def serving_panels(sel: str, by: str = "") -> list[dict]:
    """The pods' figures, for the fleet as a whole (by "") or per pod (by "pod")."""
    who = f"{{{{{by}}}}} " if by else ""
    return [
        panel("Tokens/s", "Tokens generated and prompt tokens processed per second.",
              target(rate(P.COMPLETION_TOKENS, sel, by), f"{who}generated"),
              target(rate(P.PROMPT_TOKENS, sel, by), f"{who}prompt")),
        panel("Requests/s", "Finished requests per second by outcome (ok, error, cancelled).",
              target(rate(P.REQUESTS, sel, ", ".join(x for x in (by, L.OUTCOME) if x)),
                     f"{who}{{{{{L.OUTCOME}}}}}"), unit="reqps"),
        latency("Time to first token", P.TIME_TO_FIRST_TOKEN, sel,
                "Submit to first token, from the pods' histogram.", by),
        latency("Inter-token latency", P.INTER_TOKEN_LATENCY, sel,
                "Gap between two tokens of one sequence.", by),
        panel("Queue and batch", "Requests waiting for a sequence slot and sequences running.",
              target(f"sum{f' by ({by})' if by else ''} ({P.QUEUE_DEPTH}{{{sel}}})", f"{who}queued"),
              target(f"sum{f' by ({by})' if by else ''} ({P.RUNNING}{{{sel}}})", f"{who}running")),
        panel("KV cache utilisation", "KV cells holding running sequences' tokens over the "
              "context's cells (1 = saturated: new sequences wait).",
              target(f"max{f' by ({by})' if by else ''} ({P.KV_CACHE_UTILIZATION}{{{sel}}})",
                     f"{who}max" if not by else f"{who}"),
              *([] if by else [target(f"avg ({P.KV_CACHE_UTILIZATION}{{{sel}}})", "avg")]),
              unit="percentunit"),
        panel("Prefix reuse", "Share of prompt tokens taken from the prefix cache instead of "
              "being decoded again.",
              target(f"{rate(P.PREFIX_TOKENS_REUSED, sel, by)} / {rate(P.PROMPT_TOKENS, sel, by)}",
                     f"{who}reused"), unit="percentunit"),
        panel("Prompt cache", "The host-RAM prompt cache's states restored into a slot "
              "instead of a prefill, and pushed out to make room: evictions that keep pace with "
              "restores mean it holds fewer prefixes than the load reuses (--prompt-cache-mib).",
              target(rate(P.PROMPT_CACHE_RESTORES, sel, by), f"{who}restored"),
              target(rate(P.PROMPT_CACHE_EVICTIONS, sel, by), f"{who}evicted"), unit="ops"),
        panel("Errors and cancellations", "Requests that did not finish ok, by outcome and "
              "kind (an error's type, or cancelled when the client left).",
              target(rate(P.REQUESTS, sel, ", ".join(x for x in (by, L.OUTCOME, L.FINISH_REASON)
                                                      if x), f'{L.OUTCOME}!="ok"'),
                     f"{who}{{{{{L.OUTCOME}}}}} {{{{{L.FINISH_REASON}}}}}"), unit="reqps"),
    ]


FLEET = dashboard(
    "llamafleet-fleet", "llamafleet / Fleet",
    "One LLMService (or all) as a whole: its pods, its router and the operator's autoscaler.",
    [NAMESPACE, LLMSERVICE],
    [("Serving", serving_panels(SEL)),
     ("Router", [
         panel("Router requests/s", "Proxied attempts by outcome (ok, error, retried, broken, "
               "cancelled).", target(rate(R.REQUESTS, SEL, L.OUTCOME), f"{{{{{L.OUTCOME}}}}}"),
               unit="reqps"),
         panel("Affinity", "Replica choices: hit = the replica that last served the longest "
               "matching prefix; miss = placed by the hash ring or by load.",
               target(rate(R.AFFINITY, SEL, L.RESULT), f"{{{{{L.RESULT}}}}}")),
         panel("Held requests", "Requests the router holds while no replica is ready, and the "
               "replicas ready.",
               target(f"sum ({R.HOLD_QUEUE_DEPTH}{{{SEL}}})", "held"),
               target(f"sum ({R.BACKENDS_READY}{{{SEL}}})", "replicas ready")),
         latency("Router time to first token", R.TIME_TO_FIRST_TOKEN, SEL,
                 "Arrival at the router to the first byte of the answer: holding and retries "
                 "included."),
         panel("Errors by kind", "Attempts that failed by outcome, and requests the router "
               "answered itself by reason (queue_full 429, hold_timeout 503, replica_failed "
               "502, buffer_full 503, client_left).",
               target(rate(R.REQUESTS, SEL, L.OUTCOME, f'{L.OUTCOME}=~"error|broken"'),
                      f"{{{{{L.OUTCOME}}}}}"),
               target(rate(R.REFUSED, SEL, L.REASON), f"{{{{{L.REASON}}}}}"), unit="reqps"),
     ]),
     ("Scaling", [
         panel("Replicas", "Ready pods (their own /ready), what the autoscaler decided and "
               "its maximum.",
               target(f"sum ({P.READY}{{{SEL}}})", "ready"),
               target(f"sum by ({L.LLMSERVICE}) ({O.AUTOSCALER_DESIRED_REPLICAS}{{{OP_SEL}}})",
                      "desired {{llmservice}}"),
               target(f"sum by ({L.LLMSERVICE}) ({O.AUTOSCALER_MAX_REPLICAS}{{{OP_SEL}}})",
                      "max {{llmservice}}")),
         panel("Autoscaler load", "The builtin autoscaler's reading (in-flight plus held "
               "requests) and the moving average it decides on.",
               target(f"sum by ({L.LLMSERVICE}) ({O.AUTOSCALER_LOAD}{{{OP_SEL}}})",
                      "load {{llmservice}}"),
               target(f"sum by ({L.LLMSERVICE}) ({O.AUTOSCALER_AVERAGE_LOAD}{{{OP_SEL}}})",
                      "average {{llmservice}}")),
         panel("Autoscaler decisions", "Rounds by direction (up, down, steady).",
               target(f"sum by ({L.DIRECTION}) (increase({O.AUTOSCALER_DECISIONS}{{{OP_SEL}}}"
                      f"{RATE}))", f"{{{{{L.DIRECTION}}}}}")),
         panel("Cold starts", "From a scale-up from zero until the first pod was Ready: the "
               "operator's (builtin autoscaler) and the router's (scale from zero).",
               target(quantile(0.9, O.COLD_START, OP_SEL), "operator p90"),
               target(quantile(0.9, R.COLD_START, SEL), "router p90"),
               target(f"sum (increase({R.COLD_START}_count{{{SEL}}}{RATE})) + "
                      f"sum (increase({O.COLD_START}_count{{{OP_SEL}}}{RATE}))", "count"),
               unit="s"),
     ]),
     ("Operator", [
         panel("Reconciles", "Reconciles by outcome: ok, retry (waits for the world), invalid "
               "(the spec is wrong), error.",
               target(rate(O.RECONCILES, OP_SEL, L.OUTCOME), f"{{{{{L.OUTCOME}}}}}")),
         panel("Conditions", "Each LLMService's conditions by reason.",
               target(f"sum by ({L.LLMSERVICE}, {L.TYPE}, {L.STATUS}, {L.REASON}) "
                      f"({O.CONDITION}{{{OP_SEL}}})",
                      "{{llmservice}} {{type}}={{status}} {{reason}}", table=True), kind="table"),
         latency("Reconcile duration", O.RECONCILE_DURATION, "",
                 "Time of one reconcile, every LLMService."),
     ])])

POD_DASHBOARD = dashboard(
    "llamafleet-pod", "llamafleet / Pod",
    "The fleet's figures per `llamafleet serve` pod, and where an engine step's time goes "
    "(pods with STEP_PROFILE on).",
    [NAMESPACE, LLMSERVICE, POD],
    [("Serving per pod", serving_panels(POD_SEL, "pod")),
     ("Engine", [
         panel("Step profile", "Engine thread time per step by part (STEP_PROFILE on): batch, "
               "decode, sample, text, deliver, admit, other.",
               target(f"sum by (pod, {L.PART}) (rate({P.ENGINE_STEP_SECONDS}{{{POD_SEL}}}{RATE}))"
                      f" / on (pod) group_left sum by (pod) (rate({P.ENGINE_STEPS}{{{POD_SEL}}}"
                      f"{RATE}))", f"{{{{pod}}}} {{{{{L.PART}}}}}"), unit="s"),
         panel("Steps/s and batch", "llama_decode calls per second and the sequences decoded "
               "together in one step (p50).",
               target(rate(P.ENGINE_STEPS, POD_SEL, "pod"), "{{pod}} steps/s"),
               target(quantile(0.5, P.BATCH_OCCUPANCY, POD_SEL, "pod"), "{{pod}} batch p50")),
         latency("Queue wait", P.QUEUE_WAIT, POD_SEL, "Time waiting for a free sequence.", "pod"),
         panel("Ready", "1 while the pod answers /ready.",
               target(f"max by (pod) ({P.READY}{{{POD_SEL}}})", "{{pod}}")),
     ])])

DASHBOARDS = {"fleet": FLEET, "pod": POD_DASHBOARD}


def rendered() -> dict[str, str]:
    return {f"{name}.json": json.dumps(d, indent=1) + "\n" for name, d in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    files = rendered()
    if "--check" in argv:
        stale = [n for n, text in files.items()
                 if not (OUT / n).exists() or (OUT / n).read_text() != text]
        if stale:
            print("out of date (run scripts/dashboards.py):", " ".join(stale))
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
