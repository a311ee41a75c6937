"""Operator settings, in one place (env prefix ``LLAMAFLEET_OPERATOR_``, from the pod contract)."""

from __future__ import annotations

from llamafleet.common.contract import (
    GPU_IMAGE_TAG,
    IMAGE_REPOSITORY,
    IMAGE_TAG,
    OPERATOR_ENV_PREFIX,
    OPERATOR_METRICS_PORT,
)
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=OPERATOR_ENV_PREFIX, extra="ignore",
                                      frozen=True)

    image_repository: str = Field(
        IMAGE_REPOSITORY, description="Server image repository for CPU pods (spec.resources.gpus 0) "
        "unless the LLMService names an image.")
    image_tag: str = Field(IMAGE_TAG, description="Server image tag for CPU pods.")
    gpu_image_repository: str = Field(
        IMAGE_REPOSITORY, description="Server image repository for GPU pods (spec.resources.gpus "
        ">= 1): a CUDA build (docker/Dockerfile.cuda) unless the LLMService names an image.")
    gpu_image_tag: str = Field(GPU_IMAGE_TAG, description="Server image tag for GPU pods.")
    resync_seconds: float = Field(
        30.0, gt=0, description="How often each LLMService is re-planned against the nodes, "
        "its certificates checked for renewal and its status refreshed.")
    autoscale_interval: float = Field(
        15.0, gt=0, description="How often the builtin autoscaler (spec.scaling.mode builtin) "
        "reads each autoscaled LLMService's pods and router and decides its replicas, in seconds.")
    autoscale_read_timeout: float = Field(
        2.0, gt=0, description="Timeout of one metrics read of a pod or router by the builtin "
        "autoscaler, in seconds; a read that fails is a missing reading.")
    adapter_timeout: float = Field(
        60.0, gt=0, description="Timeout of one call to a pod that lists, loads or unloads LoRA "
        "adapters (spec.adapters), in seconds; a load reads the adapter's file.")
    prometheus_url: str = Field(
        "http://prometheus-operated.monitoring.svc:9090", description="Prometheus that KEDA "
        "queries for spec.scaling.mode keda (the ScaledObject's prometheus trigger serverAddress).")
    pod_namespace: str | None = Field(
        None, description="The operator pod's own namespace (the chart sets it from the downward "
        "API). With pod_labels it lets the builtin autoscaler through each LLMService's "
        "NetworkPolicy to read the pods' and routers' metrics; unset (an operator outside the "
        "cluster), no such rule is added.")
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Labels of the operator's pods, as JSON (the chart "
        "sets its selector labels).")
    cluster_domain: str = Field("cluster.local", description="DNS suffix for Service names.")
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty: the whole cluster.")
    model_cache_enabled: bool = Field(
        False, description="Download URL-sourced models once per namespace into the model cache "
        "volume (a PersistentVolumeClaim the operator creates, by a Job), which the pods mount "
        "read-only; LLMServices naming the same sha256 share one copy. Off: each pod downloads "
        "its model in an init container (the fallback where no ReadWriteMany storage exists).")
    model_cache_claim: str = Field(
        "llamafleet-model-cache", description="Name of the model cache's PersistentVolumeClaim "
        "in each namespace with URL-sourced LLMServices; created when missing (an existing one, "
        "e.g. made by an admin, is used as it is).")
    model_cache_storage_class: str | None = Field(
        None, description="storageClassName of the cache claims the operator creates; unset or "
        "empty: the cluster's default class. It must provide model_cache_access_mode.")
    model_cache_size: str = Field(
        "100Gi", description="Requested size of each cache claim the operator creates.")
    model_cache_access_mode: str = Field(
        "ReadWriteMany", pattern=r"^(ReadWriteMany|ReadWriteOnce|ReadWriteOncePod)$",
        description="Access mode of the cache claims. ReadWriteMany lets pods on every node "
        "mount it; ReadWriteOnce works only while the fetch Jobs and all pods using it share "
        "one node.")
    model_cache_poll_seconds: float = Field(
        10.0, gt=0, description="While a model downloads, how often its LLMServices re-read "
        "the Job and write its progress to status.modelCache, in seconds.")
    metrics_port: int = Field(
        OPERATOR_METRICS_PORT, ge=0, le=65535, description="Port of the operator's own "
        "Prometheus /metrics (reconciles, conditions, the builtin autoscaler); 0 turns it off.")
    metrics_host: str = Field("0.0.0.0", description="Address the operator's /metrics listens on.")
    kubeconfig: str | None = Field(
        None, description="kubeconfig file for the API client (default: in-cluster, then "
        "$KUBECONFIG / ~/.kube/config).")

    @property
    def operator_peer(self) -> dict | None:
        """The operator's pods as a NetworkPolicy peer, when it knows where they run."""
        if not self.pod_namespace or not self.pod_labels:
            return None
        return {"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": self.pod_namespace}},
                "podSelector": {"matchLabels": dict(self.pod_labels)}}
