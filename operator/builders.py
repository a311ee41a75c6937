"""Pure manifest builders: (spec, plan, settings) -> Kubernetes object dicts.

No API calls here, so unit tests cover every field and validate the output against the
Kubernetes schemas.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from llamafleet.common.contract import (
    DRAIN_TIMEOUT_S,
    ENGINE_TYPE,
    ENGINE_TYPE_LABEL,
    ENV_PREFIX,
    GRPC_PORT,
    HTTP_PORT,
    INFLIGHT_METRIC,
    INSTANCE_METRIC_LABEL,
    METRICS_PORT,
    ROUTER_ENV_PREFIX,
    ROUTER_PORT,
    ROUTER_RBAC_RULES,
    TENANTS_MOUNT_DIR,
    USER_ID,
    PodMetric,
    RouterMetric,
    cache_file_name,
    pod_service_name,
    termination_grace_seconds,
)

from .planning import MEMORY_LABEL, ServicePlan
from .spec import AdapterSpec, LLMServiceSpec, URLSource

TLS_DIR = "/etc/llamafleet/tls"
MODEL_DIR = "/models"
DRAFT_MODEL_DIR = "/draft-model"  # the draft model's volume (speculative mode draft)
HASH_ANNOTATION = "llamafleet.io/spec-hash"
API_KEY_KEY = "api-key"
CLIENT_LABEL = "llamafleet.io/client"


@dataclass(frozen=True)
class Names:
    name: str
    namespace: str

    @property
    def ca_secret(self) -> str:
        return f"{self.name}-ca"

    @property
    def server_secret(self) -> str:
        return f"{self.name}-server-tls"

    @property
    def client_secret(self) -> str:
        return f"{self.name}-client-tls"

    @property
    def api_key_secret(self) -> str:
        return f"{self.name}-api-key"

    @property
    def pod_service(self) -> str:
        return pod_service_name(self.name)

    @property
    def router(self) -> str:
        """The router's Deployment, ServiceAccount, Role and RoleBinding."""
        return f"{self.name}-router"

    def dns_names(self, cluster_domain: str) -> list[str]:
        """The server certificate's names: both Services reach the pods' gRPC port."""
        ns = self.namespace
        return [dns for n in (self.name, self.pod_service)
                for dns in (n, f"{n}.{ns}", f"{n}.{ns}.svc", f"{n}.{ns}.svc.{cluster_domain}")
                ] + ["localhost"]


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "llamafleet", "app.kubernetes.io/instance": name}


def labels(name: str, component: str = "inference") -> dict[str, str]:
    return {**selector_labels(name), "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "llamafleet-operator",
            "app.kubernetes.io/part-of": "llamafleet"}


# The serve pods and the router pods both carry selector_labels(name) (the serve
# Deployment's selector, which is immutable, is that alone); every other selector of the
# serve pods adds their component, so that it never picks a router pod.
def pod_selector_labels(name: str) -> dict[str, str]:
    """The ``llamafleet serve`` pods of one LLMService."""
    return {**selector_labels(name), "app.kubernetes.io/component": "inference"}


def router_selector_labels(name: str) -> dict[str, str]:
    """The ``llamafleet router`` pods of one LLMService."""
    return {**selector_labels(name), "app.kubernetes.io/component": "router"}


def selector_string(name: str) -> str:
    """status.selector, which the scale subresource gives HPA: the serve pods only."""
    return ",".join(f"{k}={v}" for k, v in pod_selector_labels(name).items())


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _meta(names: Names, name: str | None = None, component: str = "inference") -> dict:
    return {"name": name or names.name, "namespace": names.namespace,
            "labels": labels(names.name, component)}


def with_hash(obj: dict) -> dict:
    obj["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = content_hash(
        {k: v for k, v in obj.items() if k != "status"})
    return obj


def model_env(spec: LLMServiceSpec, model_cache: str | None = None) -> dict[str, str]:
    """Where the pod finds its GGUF: a file path, or an embedded model's name (the image
    holds every embedded model; LLM_LLAMA_SERVICE_EMBEDDED_MODEL_DIR is set there). A URL
    model is the cache's ``<sha256>.gguf`` when ``model_cache`` (the cache claim) is given,
    else the file its pod's init container downloaded."""
    src = spec.model.source
    if src.pvc:
        return {"MODEL_PATH": f"{MODEL_DIR}/{src.pvc.path.lstrip('/')}"}
    if src.url and model_cache:
        return {"MODEL_PATH": f"{MODEL_DIR}/{cache_file_name(src.url.sha256)}"}
    if src.url:
        return {"MODEL_PATH": f"{MODEL_DIR}/model.gguf"}
    assert src.embedded is not None
    return {"EMBEDDED_MODEL": src.embedded.name}


def draft_model_value(spec: LLMServiceSpec) -> str | None:
    """The pod's DRAFT_MODEL (speculative mode draft; None otherwise): an embedded model's
    name, the file its init container downloaded, or its file on a claim (the model's volume
    when it is the model's claim)."""
    draft = spec.speculative.draftModel
    if spec.speculative.mode != "draft" or draft is None:
        return None
    src = draft.source
    if src.embedded:
        return src.embedded.name
    if src.url:
        return f"{DRAFT_MODEL_DIR}/model.gguf"
    assert src.pvc is not None
    inside = str(PurePosixPath(src.pvc.path.lstrip("/")))
    model = spec.model.source.pvc
    if model and model.claimName == src.pvc.claimName:
        return f"{MODEL_DIR}/{inside}"
    return f"{DRAFT_MODEL_DIR}/{inside}"


def api_key_ref(names: Names, spec: LLMServiceSpec) -> tuple[str, str]:
    """(Secret name, key) that holds the pods' API key: the user's, or the generated one."""
    if spec.auth.apiKeySecret:
        return spec.auth.apiKeySecret, spec.auth.apiKeySecretKey
    return names.api_key_secret, API_KEY_KEY


def image_for(spec: LLMServiceSpec, settings: Any) -> str:
    """The spec's image, else the operator's CUDA image for GPU pods and CPU image otherwise."""
    gpu = spec.resources.gpus > 0
    repository = spec.image.repository or (
        settings.gpu_image_repository if gpu else settings.image_repository)
    tag = spec.image.tag or (settings.gpu_image_tag if gpu else settings.image_tag)
    return f"{repository}:{tag}"


def tenants_volume(spec: LLMServiceSpec) -> tuple[list[dict], list[dict]]:
    """The tenants Secret (spec.tenants) as a volume and its mount: the whole Secret, never
    a subPath, so that the kubelet's updates reach the file and it is reloaded in place."""
    if spec.tenants is None:
        return [], []
    return ([{"name": "tenants", "secret": {"secretName": spec.tenants.secretName,
                                            "defaultMode": 0o440}}],
            [{"name": "tenants", "mountPath": TENANTS_MOUNT_DIR, "readOnly": True}])


def tenants_file(spec: LLMServiceSpec) -> str | None:
    return f"{TENANTS_MOUNT_DIR}/{spec.tenants.secretKey}" if spec.tenants is not None else None


def tracing_env(names: Names, spec: LLMServiceSpec) -> list[dict]:
    """The standard OTEL_* variables (common/tracing.py reads them) for spec.tracing: the
    collector, a parent-based ratio sampler (a sampled client's trace stays whole), and
    resource attributes that name this LLMService. None when tracing is off."""
    t = spec.tracing
    if t.otlpEndpoint is None:
        return []
    values = {"OTEL_EXPORTER_OTLP_ENDPOINT": t.otlpEndpoint,
              "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
              "OTEL_TRACES_SAMPLER_ARG": str(t.sampleRatio),
              "OTEL_RESOURCE_ATTRIBUTES": f"service.namespace={names.namespace},"
                                          f"llamafleet.llmservice={names.name}"}
    return [{"name": k, "value": v} for k, v in values.items()]


def pod_env(names: Names, spec: LLMServiceSpec, plan: ServicePlan,
            model_cache: str | None = None) -> list[dict]:
    values: dict[str, Any] = {
        **model_env(spec, model_cache),
        "CONTEXT_SIZE": spec.model.contextSize,
        "GPU_LAYERS": spec.gpuLayers if spec.resources.gpus else 0,
        "MAX_BATCH_SIZE": plan.max_batch_size,
        "QUEUE_SIZE": spec.batching.queueSize,
        "SPECULATIVE": spec.speculative.mode,
        "SPECULATIVE_K": spec.speculative.k,
        "HOST": "0.0.0.0",
        "HTTP_PORT": HTTP_PORT,
        "GRPC_PORT": GRPC_PORT,
        "METRICS_PORT": METRICS_PORT,
        "ENV": "production",
        "DRAIN_TIMEOUT_S": DRAIN_TIMEOUT_S,  # stated, so the grace period above matches it
        "LOG_FORMAT": spec.logging.format,
        "LOG_LEVEL": spec.logging.level,
    }
    if (draft := draft_model_value(spec)) is not None:
        values["DRAFT_MODEL"] = draft
    if spec.tenants is not None:
        values["TENANTS_FILE"] = tenants_file(spec)
    if spec.tls.enabled:
        values.update(GRPC_CA_PATH=f"{TLS_DIR}/ca.crt", GRPC_CERT_PATH=f"{TLS_DIR}/tls.crt",
                      GRPC_KEY_PATH=f"{TLS_DIR}/tls.key")
    s = spec.sampling
    for key, value in (("DEFAULT_TEMPERATURE", s.temperature), ("DEFAULT_TOP_K", s.topK),
                       ("DEFAULT_TOP_P", s.topP), ("DEFAULT_REPEAT_PENALTY", s.repeatPenalty),
                       ("DEFAULT_MAX_TOKENS", s.maxTokens), ("SYSTEM_PROMPT", spec.systemPrompt)):
        if value is not None:
            values[key] = value
    env = [{"name": ENV_PREFIX + k, "value": str(v)} for k, v in values.items()]
    env.append({"name": ENV_PREFIX + "THREADS", "valueFrom": {"resourceFieldRef": {
        "containerName": "server", "resource": "requests.cpu", "divisor": "1"}}})
    secret, key = api_key_ref(names, spec)
    env.append({"name": ENV_PREFIX + "API_KEY", "valueFrom": {"secretKeyRef": {
        "name": secret, "key": key}}})
    return env + tracing_env(names, spec)


def _affinity(spec: LLMServiceSpec, plan: ServicePlan) -> dict | None:
    affinity = json.loads(json.dumps(spec.scheduling.affinity or {}))
    if plan.pin_above_mib is None:
        return affinity or None
    term = {"matchExpressions": [{"key": MEMORY_LABEL, "operator": "Gt",
                                  "values": [str(plan.pin_above_mib)]}]}
    node = affinity.setdefault("nodeAffinity", {})
    required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution",
                               {"nodeSelectorTerms": []})
    terms = required.setdefault("nodeSelectorTerms", [])
    if terms:  # AND our expression into every user term
        for t in terms:
            t.setdefault("matchExpressions", []).extend(term["matchExpressions"])
    else:
        terms.append(term)
    return affinity


def build_deployment(names: Names, spec: LLMServiceSpec, plan: ServicePlan, image: str,
                     model_cache: str | None = None) -> dict:
    """The serve pods. ``model_cache``: the model cache's claim, which holds a URL model
    (llamafleet.operator.model_cache); None: a URL model is downloaded by each pod."""
    gpus = spec.resources.gpus
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": spec.resources.cpu, "memory": spec.resources.memory},
        "limits": {"memory": spec.resources.memory},
    }
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus
        resources["requests"]["nvidia.com/gpu"] = gpus
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict] = [{"name": "tmp", "emptyDir": {}}]
    if spec.tls.enabled:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": names.server_secret,
                                                  "defaultMode": 0o440}})
    tenant_volumes, tenant_mounts = tenants_volume(spec)
    volumes += tenant_volumes
    mounts += tenant_mounts
    init: list[dict] = []
    src = spec.model.source
    if src.pvc:
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
        volumes.append({"name": "model", "persistentVolumeClaim": {
            "claimName": src.pvc.claimName, "readOnly": True}})
    elif src.url and model_cache:  # the cache's Job downloaded it: nothing to fetch here
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
        volumes.append({"name": "model", "persistentVolumeClaim": {
            "claimName": model_cache, "readOnly": True}})
    elif src.url:  # no model cache: each pod downloads its copy
        mounts.append({"name": "model", "mountPath": MODEL_DIR, "readOnly": True})
        volumes.append({"name": "model", "emptyDir": {}})
        init.append(_fetch("fetch-model", image, spec, src.url, f"{MODEL_DIR}/model.gguf",
                           "model", MODEL_DIR))
    probe = {"httpGet": {"path": "/ready", "port": "http"}}
    container = {
        "name": "server", "image": image, "imagePullPolicy": spec.image.pullPolicy,
        "command": ["llamafleet"], "args": ["serve"],
        "env": pod_env(names, spec, plan, model_cache),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 180},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": _container_security(),
    }
    pod_spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                            "fsGroup": USER_ID, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
        # Longer than the pod's drain, so scale-down never cuts a stream short.
        "terminationGracePeriodSeconds": termination_grace_seconds(DRAIN_TIMEOUT_S),
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": pod_selector_labels(names.name)}}],
    }
    if init:
        pod_spec["initContainers"] = init
    if spec.imagePullSecrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.imagePullSecrets]
    if spec.scheduling.nodeSelector:
        pod_spec["nodeSelector"] = dict(spec.scheduling.nodeSelector)
    tolerations = [t.model_dump(exclude_none=True) for t in spec.scheduling.tolerations]
    if gpus:
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if (affinity := _affinity(spec, plan)):
        pod_spec["affinity"] = affinity
    template_annotations = {"prometheus.io/scrape": "true",
                            "prometheus.io/port": str(METRICS_PORT)}
    if spec.adapters:
        add_adapters(names, spec, image, pod_spec, template_annotations)
    if draft_model_value(spec) is not None:
        add_draft_model(spec, image, pod_spec)
    # Pod labels beyond the selector: llm-d's endpoint picker reads the engine type.
    template_labels = {**labels(names.name), ENGINE_TYPE_LABEL: ENGINE_TYPE}
    dep = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(names),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(names.name)},
            # GPUs are scarce: replace pods one by one instead of surging.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                "maxSurge": 0 if gpus else 1, "maxUnavailable": 1 if gpus else 0}},
            "template": {"metadata": {"labels": template_labels,
                                      "annotations": template_annotations},
                         "spec": pod_spec},
        },
    }
    return with_hash(dep)


# --- LoRA adapters (spec.adapters) ---------------------------------------------------------------

ADAPTER_DIR = "/adapters"  # the URL adapters' files, fetched before the server starts
ADAPTER_CLAIMS_DIR = "/adapter-claims"  # each PVC of an adapter (other than the model's)
ADAPTER_SOURCES_ANNOTATION = "llamafleet.io/adapter-sources"
ADAPTERS_KEY = "adapters"


def adapter_source(adapter: AdapterSpec) -> str:
    """Where a pod gets an adapter's file, as one key: ``url:<hash>`` (a file that an init
    container downloads) or ``pvc:<claim>`` (a mounted claim). A pod can load an adapter at
    run time when its template had the adapter's key (the template annotation lists them)."""
    src = adapter.source
    if src.url:
        return "url:" + content_hash({"url": src.url.url, "sha256": src.url.sha256})
    assert src.pvc is not None
    return "pvc:" + src.pvc.claimName


def adapter_sources(spec: LLMServiceSpec) -> list[str]:
    return sorted({adapter_source(a) for a in spec.adapters})


def adapter_path(spec: LLMServiceSpec, adapter: AdapterSpec) -> str:
    """The adapter's GGUF on the pod."""
    src = adapter.source
    if src.url:
        return f"{ADAPTER_DIR}/{adapter_source(adapter).removeprefix('url:')}.gguf"
    assert src.pvc is not None
    model = spec.model.source.pvc
    # As the pod writes it back (its card's root): a/./b and a//b are a/b.
    inside = str(PurePosixPath(src.pvc.path.lstrip("/")))
    if model and model.claimName == src.pvc.claimName:  # the model's volume has it
        return f"{MODEL_DIR}/{inside}"
    return f"{ADAPTER_CLAIMS_DIR}/{src.pvc.claimName}/{inside}"


def adapters_value(spec: LLMServiceSpec, skip: Collection[str] = ()) -> str:
    """The pod's start-up adapters (its LORA_ADAPTERS setting): NAME=PATH:SCALE, comma-joined,
    without the names in ``skip``."""
    return ",".join(f"{a.name}={adapter_path(spec, a)}:{a.scale!r}" for a in spec.adapters
                    if a.name not in skip)


def adapters_config_map_name(names: Names) -> str:
    return f"{names.name}-adapters"


def build_adapters_config_map(names: Names, spec: LLMServiceSpec,
                              refused: Collection[str] = ()) -> dict:
    """The adapter list that pods read when they start (env ``LORA_ADAPTERS`` from this
    ConfigMap): a changed list reaches new and restarted pods without a rollout, and the
    operator loads and unloads it on the running ones (llamafleet.operator.adapters).

    A pod stops when a start-up adapter fails to load, so the adapters that a running pod
    ``refused`` (no such file, or a file llama.cpp refuses) are left out until one loads it."""
    return with_hash({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": _meta(names, adapters_config_map_name(names)),
        "data": {ADAPTERS_KEY: adapters_value(spec, refused)},
    })


def _claim_volume(claim: str) -> str:
    return "adapter-pvc-" + hashlib.sha256(claim.encode()).hexdigest()[:12]


def add_adapters(names: Names, spec: LLMServiceSpec, image: str, pod_spec: dict,
                 annotations: dict[str, str]) -> None:
    """The adapters' files on the pod spec: an emptyDir with one ``llamafleet fetch`` init
    container per URL adapter, each PVC mounted read-only, the start-up list from the
    ConfigMap, and the annotation that lists the sources the pods have. Only the files shape
    the template: a name, scale or path (on a mounted claim) changes no pod."""
    server = pod_spec["containers"][0]
    server["env"].append({"name": ENV_PREFIX + "LORA_ADAPTERS", "valueFrom": {"configMapKeyRef": {
        # optional: a pod of an older template that restarts after the last adapter was
        # removed (and the ConfigMap deleted) still starts.
        "name": adapters_config_map_name(names), "key": ADAPTERS_KEY, "optional": True}}})
    fetched = {}
    claims = set()
    for a in spec.adapters:
        if a.source.url:
            fetched[adapter_path(spec, a)] = a.source.url
        elif adapter_path(spec, a).startswith(ADAPTER_CLAIMS_DIR):
            assert a.source.pvc is not None
            claims.add(a.source.pvc.claimName)
    if fetched:
        pod_spec["volumes"].append({"name": "adapters", "emptyDir": {}})
        server["volumeMounts"].append({"name": "adapters", "mountPath": ADAPTER_DIR,
                                       "readOnly": True})
        init = pod_spec.setdefault("initContainers", [])
        for out, url in sorted(fetched.items()):
            init.append(_fetch("fetch-adapter-" + out.rsplit("/", 1)[-1].removesuffix(".gguf"),
                               image, spec, url, out, "adapters", ADAPTER_DIR))
    for claim in sorted(claims):
        volume = _claim_volume(claim)
        pod_spec["volumes"].append({"name": volume, "persistentVolumeClaim": {
            "claimName": claim, "readOnly": True}})
        server["volumeMounts"].append({"name": volume, "readOnly": True,
                                       "mountPath": f"{ADAPTER_CLAIMS_DIR}/{claim}"})
    annotations[ADAPTER_SOURCES_ANNOTATION] = json.dumps(adapter_sources(spec))


def add_draft_model(spec: LLMServiceSpec, image: str, pod_spec: dict) -> None:
    """The draft model's file on the pod spec (speculative mode draft): a URL one is downloaded
    and verified by an init container into a volume of its own (by each pod: a draft model is
    small, and the model cache holds the model only), a claim other than the model's is
    mounted read-only; an embedded one is in the image, and one on the model's claim is
    mounted already."""
    assert spec.speculative.draftModel is not None
    src = spec.speculative.draftModel.source
    server = pod_spec["containers"][0]
    mount = {"name": "draft-model", "mountPath": DRAFT_MODEL_DIR, "readOnly": True}
    if src.url:
        pod_spec["volumes"].append({"name": "draft-model", "emptyDir": {}})
        server["volumeMounts"].append(mount)
        pod_spec.setdefault("initContainers", []).append(_fetch(
            "fetch-draft-model", image, spec, src.url, f"{DRAFT_MODEL_DIR}/model.gguf",
            "draft-model", DRAFT_MODEL_DIR))
    elif src.pvc and str(draft_model_value(spec)).startswith(DRAFT_MODEL_DIR):
        pod_spec["volumes"].append({"name": "draft-model", "persistentVolumeClaim": {
            "claimName": src.pvc.claimName, "readOnly": True}})
        server["volumeMounts"].append(mount)


def _fetch(name: str, image: str, spec: LLMServiceSpec, url: URLSource, out: str, volume: str,
           mount_dir: str) -> dict:
    """An init container that downloads ``url`` to ``out`` and checks its sha256."""
    return {
        "name": name, "image": image, "imagePullPolicy": spec.image.pullPolicy,
        "command": ["llamafleet", "fetch", "--url", url.url, "--sha256", url.sha256,
                    "--out", out],
        "volumeMounts": [{"name": volume, "mountPath": mount_dir},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _container_security(),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": "512Mi"}},
    }


def _container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def build_service(names: Names, routed: bool = False) -> dict:
    """The Service clients use, ``<name>``: the pods' HTTP, gRPC and metrics ports, or,
    once ``routed``, HTTP only, to the router (which proxies HTTP, not gRPC: gRPC clients
    then use the pod Service)."""
    if routed:
        return with_hash({
            "apiVersion": "v1", "kind": "Service", "metadata": _meta(names, component="router"),
            "spec": {"type": "ClusterIP", "selector": router_selector_labels(names.name),
                     "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "router",
                                "protocol": "TCP"}]},
        })
    return _pods_service(names, names.name)


def build_pod_service(names: Names) -> dict:
    """``<name>-pods``: always the serve pods; the router watches its EndpointSlices."""
    return _pods_service(names, names.pod_service)


def _pods_service(names: Names, name: str) -> dict:
    return with_hash({
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(names, name),
        "spec": {"type": "ClusterIP", "selector": pod_selector_labels(names.name), "ports": [
            {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
             "appProtocol": "grpc"},
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
        ]},
    })


def _tcp(*ports: int) -> list[dict]:
    return [{"port": p, "protocol": "TCP"} for p in ports]


def build_network_policy(names: Names, spec: LLMServiceSpec, routed_only: bool = False,
                         operator_peer: dict | None = None) -> dict:
    """Ingress to every pod of the LLMService, serve and router pods alike (each pod type
    listens only on its own ports, so one port-based policy fits both).

    Clients reach gRPC, and HTTP on the pods or, with the router, on the router. The pods'
    HTTP port stays open to clients until ``routed_only``: the handler sets it one resync
    after the Service moved to the router, so that no connection is refused meanwhile.
    Egress is not restricted: the router reaches the API server and the pods. With the
    builtin autoscaler, ``operator_peer`` (the operator's pods) reads the pods' and the
    routers' metrics on their HTTP ports; with spec.adapters it reaches the pods' HTTP port
    to load and unload adapters.
    """
    peers = []
    for c in spec.networkPolicy.allowedClients:
        peer = {}
        if c.podSelector is not None:
            peer["podSelector"] = {"matchLabels": c.podSelector}
        if c.namespaceSelector is not None:
            peer["namespaceSelector"] = {"matchLabels": c.namespaceSelector}
        peers.append(peer)
    if not peers:
        peers = [{"podSelector": {"matchLabels": {CLIENT_LABEL: "true"}}}]
    router = spec.router_enabled
    client_ports = ([] if router and routed_only else [HTTP_PORT]) + [GRPC_PORT] + \
        ([ROUTER_PORT] if router else [])
    ingress = [{"from": peers, "ports": _tcp(*client_ports)}]
    if router:  # the router proxies to the pods and polls their /ready and /metrics
        ingress.append({"from": [{"podSelector": {"matchLabels": router_selector_labels(
            names.name)}}], "ports": _tcp(HTTP_PORT)})
    autoscaled = spec.scaling is not None and spec.scaling.mode == "builtin"
    if operator_peer and (autoscaled or spec.adapters):  # it loads adapters on the pods too
        ingress.append({"from": [operator_peer],
                        "ports": _tcp(HTTP_PORT, *([ROUTER_PORT] if router and autoscaled
                                                   else []))})
    monitoring = spec.networkPolicy.monitoringNamespaces
    if monitoring:  # otherwise the metrics ports admit no one
        ingress.append({"from": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": ns}}} for ns in monitoring],
            # the router's own metrics are /router/metrics on its port
            "ports": _tcp(METRICS_PORT, *([ROUTER_PORT] if router else []))})
    return with_hash({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(names),
        "spec": {"podSelector": {"matchLabels": selector_labels(names.name)},
                 "policyTypes": ["Ingress"], "ingress": ingress},
    })


def build_pdb(names: Names, spec: LLMServiceSpec) -> dict:
    return with_hash({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(names),
        "spec": {"minAvailable": spec.podDisruptionBudget.minAvailable,
                 "selector": {"matchLabels": pod_selector_labels(names.name)}},
    })


INFERENCE_POOL_API = "inference.networking.k8s.io/v1"


def build_inference_pool(names: Names, spec: LLMServiceSpec) -> dict:
    """A Gateway API Inference Extension InferencePool over the pods' HTTP port, asking the
    spec's endpoint picker which pod serves each request."""
    picker = spec.routing.inferencePool.endpointPicker
    assert picker is not None  # the spec requires it when the pool is enabled
    return with_hash({
        "apiVersion": INFERENCE_POOL_API, "kind": "InferencePool", "metadata": _meta(names),
        "spec": {"selector": {"matchLabels": pod_selector_labels(names.name)},
                 "targetPorts": [{"number": HTTP_PORT}],
                 "extensionRef": {"name": picker.name, "portNumber": picker.port,
                                  "failureMode": picker.failureMode}},
    })


def build_secret(names: Names, name: str, data: dict[str, bytes], tls: bool,
                 component: str = "certificates", annotations: dict[str, str] | None = None
                 ) -> dict:
    meta = _meta(names, name, component)
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "v1", "kind": "Secret", "metadata": meta,
        "type": "kubernetes.io/tls" if tls else "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def secret_bytes(secret: dict, key: str) -> bytes | None:
    value = (secret.get("data") or {}).get(key)
    return base64.b64decode(value) if value else None


def endpoints(names: Names, cluster_domain: str, spec: LLMServiceSpec, routed: bool) -> dict:
    """Where clients connect. HTTP is always ``<name>`` (through the router once ``routed``:
    then ``router`` says so); gRPC is the pod Service while the router is on, because the
    router proxies HTTP only."""
    def host(service: str) -> str:
        return f"{service}.{names.namespace}.svc.{cluster_domain}"

    out = {"http": f"http://{host(names.name)}:{HTTP_PORT}",
           "grpc": f"{host(names.pod_service if spec.router_enabled else names.name)}:{GRPC_PORT}"}
    if routed:
        out["router"] = out["http"]
    return out


# --- autoscaling: HPA and KEDA modes ----------------------------------------------------------

# The pods metric an HPA reads (running + queued sequences per pod), served by a Prometheus
# adapter rule (docs/autoscaling.md); the KEDA query reads the same series from Prometheus.
KEDA_API = "keda.sh/v1alpha1"
HPA_MAX_WINDOW = 3600  # autoscaling/v2 caps stabilizationWindowSeconds at one hour


def scale_target_ref(names: Names) -> dict:
    """The LLMService itself: HPA and KEDA write its scale subresource (spec.replicas), and
    the operator carries that to the Deployment, as with the builtin autoscaler."""
    return {"apiVersion": "llamafleet.io/v1alpha1", "kind": "LLMService", "name": names.name}


def scaling_target(spec: LLMServiceSpec, plan: ServicePlan) -> int:
    """In-flight requests per replica to aim for: the spec's, else the planned batch width."""
    assert spec.scaling is not None
    return spec.scaling.targetInFlightPerReplica or max(1, plan.max_batch_size)


def _behavior(spec: LLMServiceSpec) -> dict:
    assert spec.scaling is not None

    def window(name: str) -> int:
        return min(HPA_MAX_WINDOW, round(spec.scaling.seconds(name)))

    return {"scaleUp": {"stabilizationWindowSeconds": window("scaleUpStabilization")},
            "scaleDown": {"stabilizationWindowSeconds": window("scaleDownDelay")}}


def build_hpa(names: Names, spec: LLMServiceSpec, plan: ServicePlan) -> dict:
    """spec.scaling.mode hpa: an autoscaling/v2 HPA on the per-pod in-flight metric."""
    sc = spec.scaling
    assert sc is not None
    return with_hash({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(names),
        "spec": {
            "scaleTargetRef": scale_target_ref(names),
            "minReplicas": sc.minReplicas, "maxReplicas": sc.maxReplicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": INFLIGHT_METRIC},
                "target": {"type": "AverageValue",
                           "averageValue": str(scaling_target(spec, plan))}}}],
            "behavior": _behavior(spec),
        },
    })


def keda_query(names: Names) -> str:
    """PromQL for the LLMService's load: in-flight requests of its pods plus the requests its
    routers hold (labels from the chart's PodMonitor, which copies app.kubernetes.io/instance
    onto every series); each term is 0 when absent, so the query works at zero pods."""
    match = f'namespace="{names.namespace}",{INSTANCE_METRIC_LABEL}="{names.name}"'
    return " + ".join(f"(sum({series}{{{match}}}) or vector(0))" for series in (
        PodMetric.RUNNING, PodMetric.QUEUE_DEPTH, RouterMetric.HOLD_QUEUE_DEPTH))


def build_scaled_object(names: Names, spec: LLMServiceSpec, plan: ServicePlan,
                        prometheus_url: str) -> dict:
    """spec.scaling.mode keda: a ScaledObject with a Prometheus trigger on the same load.
    KEDA scales 0 <-> 1 itself (activationThreshold 0: any load wakes it) and hands 1..max
    to the HPA it makes; cooldownPeriod is idleBeforeZero."""
    sc = spec.scaling
    assert sc is not None
    return with_hash({
        "apiVersion": KEDA_API, "kind": "ScaledObject", "metadata": _meta(names),
        "spec": {
            "scaleTargetRef": scale_target_ref(names),
            "minReplicaCount": sc.minReplicas, "maxReplicaCount": sc.maxReplicas,
            "cooldownPeriod": round(sc.seconds("idleBeforeZero")),
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(spec)}},
            "triggers": [{"type": "prometheus", "metricType": "AverageValue", "metadata": {
                "serverAddress": prometheus_url, "query": keda_query(names),
                "threshold": str(scaling_target(spec, plan)), "activationThreshold": "0"}}],
        },
    })


# --- the router ---------------------------------------------------------------------------------

ROUTER_METRICS_PATH = "/router/metrics"


def router_env(names: Names, spec: LLMServiceSpec) -> list[dict]:
    values = {"LLMSERVICE": names.name, "HOST": "0.0.0.0", "PORT": ROUTER_PORT,
              "LOG_FORMAT": spec.logging.format, "LOG_LEVEL": spec.logging.level.upper()}
    if spec.tenants is not None:
        values["TENANTS_FILE"] = tenants_file(spec)
        if spec.tenants.maxQueuedPerReplica is not None:
            values["MAX_QUEUED_PER_REPLICA"] = spec.tenants.maxQueuedPerReplica
    env: list[dict] = [{"name": ROUTER_ENV_PREFIX + k, "value": str(v)} for k, v in values.items()]
    env.append({"name": ROUTER_ENV_PREFIX + "NAMESPACE", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.namespace"}}})
    # The router's polls of the pods' /metrics need the key the pods require (the same
    # Secret the pods read); clients' own Authorization headers pass through unchanged.
    secret, key = api_key_ref(names, spec)
    env.append({"name": ROUTER_ENV_PREFIX + "BACKEND_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": secret, "key": key}}})
    return env + tracing_env(names, spec)


def build_router_deployment(names: Names, spec: LLMServiceSpec, image: str) -> dict:
    """``llamafleet router`` from the pods' image, with its own ServiceAccount (it watches
    the pod Service's EndpointSlices and scales the LLMService from zero)."""
    r = spec.routing.router
    probe = {"httpGet": {"path": "/ready", "port": "router"}}
    tenant_volumes, tenant_mounts = tenants_volume(spec)
    container = {
        "name": "router", "image": image, "imagePullPolicy": spec.image.pullPolicy,
        "command": ["llamafleet"], "args": ["router"],
        "env": router_env(names, spec),
        "ports": [{"name": "router", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "router"}, "periodSeconds": 10,
                          "failureThreshold": 6},
        "resources": {"requests": {"cpu": r.resources.cpu, "memory": r.resources.memory},
                      "limits": {"memory": r.resources.memory}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *tenant_mounts],
        "securityContext": _container_security(),
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.router,
        "automountServiceAccountToken": True,  # it talks to the API server
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}, *tenant_volumes],
        "terminationGracePeriodSeconds": 30,
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": router_selector_labels(names.name)}}],
    }
    if tenant_volumes:  # the Secret's files (0440) are then the router's group's to read
        pod_spec["securityContext"]["fsGroup"] = USER_ID
    if spec.imagePullSecrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.imagePullSecrets]
    return with_hash({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(names, names.router, "router"),
        "spec": {
            "replicas": r.replicas,
            "selector": {"matchLabels": router_selector_labels(names.name)},
            # Small and stateless: surge, so a rollout never leaves clients without one.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1,
                                                                     "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels(names.name, "router"), "annotations": {
                "prometheus.io/scrape": "true", "prometheus.io/port": str(ROUTER_PORT),
                "prometheus.io/path": ROUTER_METRICS_PATH}},
                "spec": pod_spec},
        },
    })


def build_router_service_account(names: Names) -> dict:
    return with_hash({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": _meta(names, names.router, "router")})


def build_router_role(names: Names) -> dict:
    """ROUTER_RBAC_RULES in this namespace; the LLMService rules name this LLMService only."""
    rules = []
    for rule in ROUTER_RBAC_RULES:
        out: dict[str, Any] = {k: list(v) for k, v in rule.items()}
        if "llamafleet.io" in rule["apiGroups"]:
            out["resourceNames"] = [names.name]
        rules.append(out)
    return with_hash({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                      "metadata": _meta(names, names.router, "router"), "rules": rules})


def build_router_role_binding(names: Names) -> dict:
    return with_hash({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(names, names.router, "router"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.router},
        "subjects": [{"kind": "ServiceAccount", "name": names.router,
                      "namespace": names.namespace}],
    })
