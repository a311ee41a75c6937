"""The pod contract (llamafleet.common.contract) is what the images and the distribution say."""

from __future__ import annotations

import ast
import re
import subprocess
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
from llamafleet.common import contract as C

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.cuda"])
def test_images_run_as_the_contracts_user_and_expose_its_ports(dockerfile: str) -> None:
    lines = (ROOT / dockerfile).read_text().splitlines()
    assert f"USER {C.USER_ID}:{C.USER_ID}" in lines
    assert f"EXPOSE {C.HTTP_PORT} {C.GRPC_PORT} {C.METRICS_PORT}" in lines
    assert "COPY common /src/common" in lines  # the image installs llamafleet.common


def test_the_distribution_version_is_the_contracts() -> None:
    assert version("llamafleet") == C.VERSION
    assert C.GPU_IMAGE_TAG == f"{C.VERSION}-cuda"


def test_env_name_follows_the_prefix() -> None:
    assert C.env_name("context_size") == "LLM_LLAMA_SERVICE_CONTEXT_SIZE"


# --- every name that crosses a boundary is written once, in the contract -----------------------

# Where the product's Python lives (the benchmarks are clients of the contract too). Tests are
# not scanned: they pin the names as users see them. The chart, docs/ and docker/ are not
# Python and keep their own literals; the tests below hold them to the contract instead.
PRODUCT = ("common", "inference", "router", "operator", "benchmarks")
GENERATED = ("inference/proto/",)  # protoc's output
PORTS = (C.HTTP_PORT, C.GRPC_PORT, C.METRICS_PORT, C.ROUTER_PORT, C.OPERATOR_METRICS_PORT)
PORT_TEXT = re.compile(r"(?<!\d)(" + "|".join(map(str, PORTS)) + r")(?!\d)")
ENV_TEXT = re.compile(r"\b(" + "|".join(map(re.escape, (C.ENV_PREFIX, C.OPERATOR_ENV_PREFIX))) + ")")
SERIES_TEXT = re.compile(r"\bllamafleet_[a-z0-9_]+")
FINGERPRINT_TEXT = C.SYSTEM_FINGERPRINT.removesuffix(C.VERSION.replace(".", "_"))


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant):
            out.add(id(node.body[0].value))
    return out


def boundary_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) for each metric name, port, env name or fingerprint that ``source``
    writes as a value: a string or number literal, f-strings' text included. Docstrings and
    comments are documentation, not values, and are left out."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    series = C.metric_names()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in docs or isinstance(node.value, bool):
            continue
        value = node.value
        if isinstance(value, int) and value in PORTS:
            found.append((node.lineno, str(value)))
        elif isinstance(value, str) and (
                PORT_TEXT.search(value) or ENV_TEXT.search(value) or FINGERPRINT_TEXT in value
                or any(name.startswith(tuple(series)) for name in SERIES_TEXT.findall(value))):
            found.append((node.lineno, value))
    return sorted(found)


def product_files() -> list[Path]:
    # What git holds or would hold (not ignored build output such as benchmarks/.build/).
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "--", *PRODUCT], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    return sorted(ROOT / f for f in listed if f.endswith(".py") and f != "common/contract.py"
                  and not f.startswith(GENERATED) and (ROOT / f).exists())


def test_no_module_but_the_contract_writes_a_metric_port_env_name_or_fingerprint() -> None:
    files = product_files()
    assert len(files) > 50 and ROOT / "common/capacity.py" in files
    offenders = [f"{p.relative_to(ROOT)}:{line}: {text!r}" for p in files
                 for line, text in boundary_literals(p.read_text())]
    assert not offenders, "write these with llamafleet.common.contract's names:\n" + "\n".join(
        offenders)


def test_the_scan_finds_planted_literals_and_leaves_docs_and_contract_names_alone() -> None:
    planted = textwrap.dedent('''\
        """Docs may name llamafleet_queue_depth, port 16070 and LLM_LLAMA_SERVICE_PORT."""
        from llamafleet.common.contract import HTTP_PORT, PodMetric
        # so may comments: llamafleet_queue_depth on 16070
        queued = Gauge("llamafleet_queue_depth", "Requests waiting.")
        url = f"http://127.0.0.1:16070/v1/{path}"
        port = 16073
        hint = f"set LLM_LLAMA_SERVICE_CONTEXT_SIZE, got {n}"
        operator = "LLAMAFLEET_OPERATOR_RESYNC_SECONDS"
        fingerprint = "fp_llamafleet_0_1_0"
        hits = [x for x in lines if x.startswith("llamafleet_model_info")]
        fine = (PodMetric.QUEUE_DEPTH, f"http://127.0.0.1:{HTTP_PORT}", "llamafleet_tok_s", 160700)
        ''')
    assert [line for line, _ in boundary_literals(planted)] == [4, 5, 6, 7, 8, 9, 10]


def test_the_metric_names_are_the_ones_dashboards_read() -> None:
    # Written out here on purpose: renaming a series breaks users' dashboards and alerts.
    assert C.metric_names() == {
        "llamafleet_requests_total", "llamafleet_prompt_tokens_total",
        "llamafleet_completion_tokens_total", "llamafleet_time_to_first_token_seconds",
        "llamafleet_inter_token_latency_seconds", "llamafleet_request_duration_seconds",
        "llamafleet_queue_wait_seconds", "llamafleet_batch_occupancy",
        "llamafleet_engine_steps_total", "llamafleet_engine_step_seconds_total",
        "llamafleet_running_sequences", "llamafleet_queue_depth",
        "llamafleet_kv_cache_cells_used", "llamafleet_kv_cache_cells_total",
        "llamafleet_kv_cache_utilization", "llamafleet_max_batch_size", "llamafleet_model",
        "llamafleet_lora_requests_info", "llamafleet_ready", "llamafleet_prefix_tokens_reused_total",
        "llamafleet_prompt_cache_bytes", "llamafleet_prompt_cache_limit_bytes",
        "llamafleet_prompt_cache_entries", "llamafleet_prompt_cache_restores_total",
        "llamafleet_prompt_cache_evictions_total",
        "llamafleet_speculative_draft_tokens_total", "llamafleet_speculative_accepted_tokens_total",
        "llamafleet_speculative_acceptance_rate",
        "llamafleet_router_requests_total", "llamafleet_router_refused_total",
        "llamafleet_router_affinity_total", "llamafleet_router_hold_queue_depth",
        "llamafleet_router_in_flight", "llamafleet_router_backends_ready",
        "llamafleet_router_time_to_first_token_seconds", "llamafleet_router_scale_ups_total",
        "llamafleet_router_cold_start_seconds", "llamafleet_inflight",
        "llamafleet_operator_reconciles_total", "llamafleet_operator_reconcile_duration_seconds",
        "llamafleet_operator_condition", "llamafleet_operator_autoscaler_load",
        "llamafleet_operator_autoscaler_average_load", "llamafleet_operator_autoscaler_held_requests",
        "llamafleet_operator_autoscaler_ready_pods", "llamafleet_operator_autoscaler_desired_replicas",
        "llamafleet_operator_autoscaler_max_replicas", "llamafleet_operator_autoscaler_decisions_total",
        "llamafleet_operator_cold_start_seconds",
        "llamafleet_tenant_requests_total", "llamafleet_tenant_tokens_total",
        "llamafleet_tenant_rejected_total", "llamafleet_tenant_queue_wait_seconds",
        "llamafleet_router_tenant_requests_total", "llamafleet_router_tenant_tokens_total",
        "llamafleet_router_tenant_rejected_total", "llamafleet_router_tenant_queue_wait_seconds"}
    assert C.SYSTEM_FINGERPRINT == "fp_llamafleet_0_1_0"
    assert C.router_env_name("max_attempts") == "LLM_LLAMA_SERVICE_ROUTER_MAX_ATTEMPTS"
    assert C.operator_env_name("resync_seconds") == "LLAMAFLEET_OPERATOR_RESYNC_SECONDS"


def _names(group: type) -> set[str]:
    return {v for k, v in vars(group).items() if k.isupper()}


@pytest.mark.parametrize("part", ["pod", "router", "operator"])
def test_the_series_exported_are_exactly_the_contracts(part: str) -> None:
    if part == "pod":
        from llamafleet.inference.metrics import Metrics as Made
        names = _names(C.PodMetric)
    elif part == "operator":
        from llamafleet.operator.metrics import OperatorMetrics as Made
        names = _names(C.OperatorMetric)
    else:
        from llamafleet.router.metrics import RouterMetrics as Made
        names = _names(C.RouterMetric)
    made = Made()
    families = list(made.registry.collect())
    # prometheus_client names a counter's family without its _total (its samples have it).
    assert {f.name + ("_total" if f.type == "counter" else "") for f in families} == names
    labels = {label for series in vars(made).values()
              for label in getattr(series, "_labelnames", ())}
    assert labels and labels <= _names(C.MetricLabel)


def test_the_docs_chart_and_examples_name_only_the_contracts_series() -> None:
    series = C.metric_names()
    suffixes = ("", "_info", "_bucket", "_count", "_sum")
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "charts").rglob("*"),
             *(ROOT / "examples").rglob("*")]
    found = {m for p in files if p.is_file() and p.suffix in (".md", ".yaml", ".txt", ".tpl")
             for m in SERIES_TEXT.findall(p.read_text())}
    assert found and not {m for m in found if not any(m.removesuffix(s) in series
                                                      for s in suffixes if m.endswith(s))}


def test_the_pod_monitor_gives_the_series_the_label_the_keda_query_selects() -> None:
    text = (ROOT / "charts/llamafleet/templates/podmonitor.yaml").read_text()
    labels = re.search(r"podTargetLabels: \[(.*)\]", text).group(1).split(",")
    assert C.INSTANCE_METRIC_LABEL in {re.sub(r"[./-]", "_", s.strip()) for s in labels}


def test_the_images_set_only_pod_settings() -> None:
    from llamafleet.inference.settings import Settings

    for dockerfile in ("docker/Dockerfile", "docker/Dockerfile.cuda"):
        names = set(re.findall(rf"\b{C.ENV_PREFIX}([A-Z0-9_]+)=", (ROOT / dockerfile).read_text()))
        assert names and {n.lower() for n in names} <= set(Settings.model_fields), dockerfile


def test_every_env_name_a_message_gives_is_a_real_setting() -> None:
    from llamafleet.inference.settings import Settings
    from llamafleet.operator.settings import OperatorSettings
    from llamafleet.router.settings import RouterSettings

    fields = {"env_name": Settings.model_fields, "router_env_name": RouterSettings.model_fields,
              "operator_env_name": OperatorSettings.model_fields}
    calls = [(p, node.args[0].value, node.func.id) for p in product_files()
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id in fields and node.args and isinstance(node.args[0], ast.Constant)]
    assert len(calls) >= 10
    unknown = [f"{p.relative_to(ROOT)}: {fn}({name!r})" for p, name, fn in calls
               if name not in fields[fn]]
    assert not unknown
