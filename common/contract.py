"""The pod contract: what the operator, the chart, ``bench`` and the router agree on with
``llamafleet serve``: ports, the environment's names, the user id, the image and the version.

Kept from the C++ service (``sentiric-llm-llama-service``) so its clients work unchanged.
"""

from __future__ import annotations

HTTP_PORT, GRPC_PORT, METRICS_PORT = 16070, 16071, 16072
ROUTER_PORT = 16073  # llamafleet router (llamafleet.router.settings)

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
    # Scale from zero: read the LLMService and patch its scale subresource.
    {"apiGroups": ("llamafleet.io",), "resources": ("llmservices",), "verbs": ("get",)},
    {"apiGroups": ("llamafleet.io",), "resources": ("llmservices/scale",),
     "verbs": ("get", "patch", "update")},
)
