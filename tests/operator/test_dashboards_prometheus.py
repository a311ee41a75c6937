"""The dashboards, the prometheus-adapter rule and the KEDA query against a real Prometheus
(Debian's, tests/support/prometheus.py) that scrapes a real `llamafleet serve` (the embedded
chat model, step profile on), a real `llamafleet router` in front of it, a second router whose
only replica never answers (so requests are held and refused), and the operator's metrics
code in-process, every second, while a short load runs. Then every panel's query runs through
the Prometheus HTTP API and must return data.

Labels: each target gets the ones the chart's PodMonitors give it (namespace, pod,
app_kubernetes_io_instance; the operator's series keep their own namespace: honorLabels)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from llamafleet.common.contract import INSTANCE_METRIC_LABEL, OperatorMetric, PodMetric, RouterMetric
from prometheus_client.parser import text_string_to_metric_families

from tests.support.monitoring import ROOT, dashboards, targets, variable_queries
from tests.support.prometheus import Prometheus, scrape_job, start_prometheus
from tests.support.servers import free_port, serve_process, serve_ready, start_router, wait_until

pytestmark = pytest.mark.integration

NAMESPACE, SERVICE = "test", "chat"
# What Grafana puts in the variables when a user picks this namespace, both LLMServices and
# every pod (values that match only series that have the label, unlike "All"'s `.*`); a window
# that holds the whole load.
VARIABLES = {"$namespace": NAMESPACE, "$llmservice": f"{SERVICE}|cold", "$pod": ".+",
             "$__rate_interval": "5m"}

# Targets that return data but may not have a number in it (NaN: a quantile of no
# observations) outside Kubernetes, and why. Keep it short.
NO_NUMBER_OUTSIDE_KUBERNETES = {
    ("Cold starts", "B"): "the router times a cold start only when it scales an LLMService from "
                          "zero (--llmservice, the Kubernetes scale subresource)",
}

SYSTEM = ("You are a terse assistant for a paint shop. Answer with one word. The shop sells "
          "red, green, blue, yellow, white and black paint in one-litre cans. ") * 4


def fill(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def own_metric(url: str, name: str, unless: tuple[str, str] | None = None) -> float:
    """The sum of a process's own samples of ``name`` (``unless``: but those with that label
    value)."""
    text = httpx.get(url, timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and (unless is None or s.labels.get(unless[0]) != unless[1]))


class Fleet:
    """The processes and the Prometheus that scrapes them."""

    def __init__(self, tmp: Path, model: Path):
        from llamafleet.operator.metrics import OperatorMetrics, serve

        self.metrics_port = free_port()
        self.pod, self.pod_port = serve_process(
            "--model-path", str(model), "--metrics-port", str(self.metrics_port),
            "--step-profile", "--max-batch-size", "4", "--context-size", "2048",
            "--default-max-tokens", "12")
        self.router = self.cold = self.prom = self.operator_server = None
        wait_until(lambda: serve_ready(self.pod, self.pod_port), timeout=300)
        self.pod_url = f"http://127.0.0.1:{self.pod_port}"
        self.router = start_router([self.pod_url])
        # A router whose replica never answers: requests wait, then 503 hold_timeout.
        self.cold = start_router([f"http://127.0.0.1:{free_port()}"], "--hold-timeout", "0.5")
        self.operator = OperatorMetrics()
        self.operator_port = free_port()
        self.operator_server = serve(self.operator, self.operator_port, "127.0.0.1")
        assert self.operator_server is not None

        def labels(pod: str, service: str = SERVICE) -> dict[str, str]:
            return {"namespace": NAMESPACE, "pod": pod, INSTANCE_METRIC_LABEL: service}

        self.prom = start_prometheus(tmp / "prometheus", [
            scrape_job("pod", f"127.0.0.1:{self.metrics_port}", labels("chat-0")),
            scrape_job("router", f"127.0.0.1:{self.router.port}", labels("chat-router-0"),
                       path="/router/metrics"),
            scrape_job("cold-router", f"127.0.0.1:{self.cold.port}",
                       labels("cold-router-0", "cold"), path="/router/metrics"),
            scrape_job("operator", f"127.0.0.1:{self.operator_port}",
                       {"namespace": "llamafleet-system", "pod": "operator-0"}, honor_labels=True),
        ])

    def stop(self) -> None:
        for part in (self.prom, self.router, self.cold):
            if part is not None:
                part.stop()
        if self.operator_server is not None:
            self.operator_server.shutdown()
        self.pod.terminate()
        self.pod.communicate(timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, instruct_model_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"), instruct_model_path)
    try:
        yield f
    finally:
        f.stop()


def operator_round(m, cold_start: float, replicas: int) -> None:
    """What the kopf handlers report for one reconcile and one autoscaler round (the handlers
    wrap reconcile.run and scaling_loop.timer_round the same way)."""
    import kopf

    body = {"metadata": {"namespace": NAMESPACE, "name": SERVICE},
            "spec": {"replicas": replicas, "scaling": {"maxReplicas": 2}},
            "status": {"autoscaling": {"coldStartSeconds": None}}}
    patch = {"status": {"conditions": [
        {"type": "Ready", "status": "True", "reason": "Ready"},
        {"type": "Progressing", "status": "False", "reason": "Stable"}]}}
    with m.reconcile(body, patch):
        pass
    with pytest.raises(kopf.TemporaryError), m.reconcile(body, {}):
        raise kopf.TemporaryError("waiting for a node", delay=1)
    patch = {"status": {"autoscaling": {"observedLoad": 3.0, "averageLoad": 2.5,
                                        "heldRequests": 1.0, "readyPods": replicas,
                                        "desiredReplicas": 2, "coldStartSeconds": cold_start}}}
    with m.autoscale(body, patch):
        pass


def load(fleet: Fleet) -> None:
    model = httpx.get(f"{fleet.router.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def ask(i: int) -> None:
        body = {"model": model, "stream": True, "max_tokens": 12,
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": f"Customer {i}: which colour is the sky?"}]}
        with httpx.stream("POST", f"{fleet.router.url}/v1/chat/completions", json=body,
                          timeout=120) as r:
            assert r.status_code == 200, r.read()
            for _ in r.iter_lines():
                pass

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(ask, range(12)))
    # A client that leaves mid-stream (cancelled), a bad request (the router's outcome
    # error), a request the cold router gives up holding (hold_timeout).
    body = {"model": model, "stream": True, "max_tokens": 200, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count to one hundred."}]}
    with httpx.stream("POST", f"{fleet.router.url}/v1/chat/completions", json=body,
                      timeout=120) as r:
        next(r.iter_lines())
    r = httpx.post(f"{fleet.router.url}/v1/chat/completions", timeout=30,
                   json={"model": model, "messages": [], "bogus": 1})
    assert r.status_code == 400
    r = httpx.post(f"{fleet.cold.url}/v1/chat/completions", timeout=30,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503


@pytest.fixture(scope="module")
def scraped(fleet: Fleet) -> Prometheus:
    """The load ran, and Prometheus holds every scrape up to its end."""
    prom = fleet.prom
    # Every target is up and scraped once before anything counts (so counters rise in
    # Prometheus' eyes), the operator's histograms included.
    prom.wait_for('count(up == 1) == 4')
    prom.wait_for(f"{OperatorMetric.RECONCILE_DURATION}_count")
    operator_round(fleet.operator, 12.5, 0)
    prom.wait_for(f"{OperatorMetric.COLD_START}_count >= 1")
    load(fleet)
    operator_round(fleet.operator, 30.0, 2)
    # Wait until Prometheus has scraped what the load left (the processes' own counts).
    pod_tokens = own_metric(f"http://127.0.0.1:{fleet.metrics_port}/metrics",
                            PodMetric.COMPLETION_TOKENS)
    router_requests = own_metric(f"{fleet.router.url}/router/metrics", RouterMetric.REQUESTS)
    assert pod_tokens > 0 and router_requests >= 13
    # The pod counts the client that left once its engine notices (a step later): wait for
    # that, then for two scrapes of it (a rate needs two samples).
    pod_url = f"http://127.0.0.1:{fleet.metrics_port}/metrics"
    wait_until(lambda: own_metric(pod_url, PodMetric.REQUESTS, ("outcome", "ok")) >= 1)
    prom.wait_for(f'count_over_time({PodMetric.REQUESTS}{{outcome!="ok"}}[5m]) >= 2')
    prom.wait_for(f"sum({PodMetric.COMPLETION_TOKENS}) >= {pod_tokens}")
    prom.wait_for(f"sum({RouterMetric.REQUESTS}) >= {router_requests}")
    prom.wait_for(f'{RouterMetric.REFUSED}{{reason="hold_timeout"}} >= 1')
    prom.wait_for(f"{OperatorMetric.COLD_START}_count >= 2")
    # The ready gauge and the step profile are read at scrape time.
    prom.wait_for(f"{PodMetric.ENGINE_STEP_SECONDS} > 0")
    return prom


def test_the_load_was_served_with_prefix_reuse(scraped: Prometheus) -> None:
    assert scraped.value(f"{PodMetric.PREFIX_TOKENS_REUSED}") > 0
    assert scraped.value(f'{RouterMetric.AFFINITY}{{result="hit"}}') > 0
    assert scraped.value(f"{PodMetric.READY}") == 1


@pytest.mark.parametrize("name", ["fleet", "pod"])
def test_every_panel_query_returns_data(scraped: Prometheus, name: str) -> None:
    board = dashboards()[name]
    empty, no_number = [], []
    for title, target in targets(board):
        result = scraped.query(fill(target["expr"]))
        if not result:
            empty.append(f"{title} [{target['refId']}]: {target['expr']}")
            continue
        values = [float(s["value"][1]) for s in result]
        if not any(math.isfinite(v) for v in values) \
                and (title, target["refId"]) not in NO_NUMBER_OUTSIDE_KUBERNETES:
            no_number.append(f"{title} [{target['refId']}]: {target['expr']} -> {values}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not no_number, "queries without a number:\n" + "\n".join(no_number)


@pytest.mark.parametrize("name", ["fleet", "pod"])
def test_every_variable_lists_the_fleet(scraped: Prometheus, name: str) -> None:
    expected = {"namespace": NAMESPACE, "llmservice": SERVICE, "pod": "chat-0"}
    variables = [v for v in dashboards()[name]["templating"]["list"] if v["type"] == "query"]
    assert [v["query"]["query"] for v in variables] == variable_queries(dashboards()[name])
    for v in variables:
        query = v["query"]["query"]
        series, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query).groups()
        values = scraped.label_values(label, fill(series))
        assert expected[v["name"]] in values, (query, values)


def _doc_blocks() -> list[str]:
    return re.findall(r"```(?:yaml)?\n(.*?)```", (ROOT / "docs/autoscaling.md").read_text(), re.S)


def test_the_prometheus_adapter_rule_in_the_docs_returns_the_inflight_metric(
        scraped: Prometheus) -> None:
    block = next(b for b in _doc_blocks() if "seriesQuery" in b)
    (rule,) = yaml.safe_load(block)["rules"]["custom"]
    assert scraped.query(rule["seriesQuery"])
    # What prometheus-adapter sends for `kubectl get --raw .../pods/*/llamafleet_inflight`.
    query = rule["metricsQuery"].replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~".*"') \
        .replace("<<.GroupBy>>", "pod")
    result = scraped.query(query)
    assert [s["metric"] for s in result] == [{"pod": "chat-0"}]
    assert math.isfinite(float(result[0]["value"][1]))


def test_the_keda_query_in_the_docs_and_the_operators_return_the_load(scraped: Prometheus) -> None:
    from llamafleet.operator import builders as B

    operator = B.keda_query(B.Names(SERVICE, NAMESPACE))
    block = next(b for b in _doc_blocks() if b.lstrip().startswith("(sum(llamafleet_running"))
    first = re.search(r"\{[^}]*\}", block).group(0)
    docs = " ".join(block.replace("NS", NAMESPACE).replace("NAME", SERVICE).split())
    docs = docs.replace("{...}", first.replace("NS", NAMESPACE).replace("NAME", SERVICE))
    assert docs == operator
    # Each term's series exists (without it `or vector(0)` would hide a wrong label).
    for selector in re.findall(r"sum\((\w+\{[^}]*\})\)", operator):
        assert scraped.query(selector), selector
    assert scraped.value(operator) is not None


def test_the_metrics_port_shows_the_prefix_cache_and_http_without_a_key_does_not(
        fleet: Fleet) -> None:
    private = PodMetric.PREFIX_TOKENS_REUSED
    assert private in httpx.get(f"http://127.0.0.1:{fleet.metrics_port}/metrics").text
    open_metrics = httpx.get(f"{fleet.pod_url}/metrics").text
    assert PodMetric.READY in open_metrics and private not in open_metrics


def test_the_dashboards_have_something_to_show_for_each_part(scraped: Prometheus) -> None:
    """Guards the guard: the jobs really are the pod, the routers and the operator."""
    jobs = {s["metric"]["job"] for s in scraped.query("up == 1")}
    assert jobs == {"pod", "router", "cold-router", "operator"}
    names = set(scraped.api("label/__name__/values"))
    assert {PodMetric.TIME_TO_FIRST_TOKEN + "_bucket", RouterMetric.AFFINITY,
            OperatorMetric.CONDITION} <= names
