"""Operator settings, in one place (env prefix ``LLAMAFLEET_OPERATOR_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMAFLEET_OPERATOR_", extra="ignore",
                                      frozen=True)

    image_repository: str = Field(
        "llamafleet", description="Server image repository for CPU pods (spec.resources.gpus 0) "
        "unless the LLMService names an image.")
    image_tag: str = Field("0.1.0", description="Server image tag for CPU pods.")
    gpu_image_repository: str = Field(
        "llamafleet", description="Server image repository for GPU pods (spec.resources.gpus "
        ">= 1): a CUDA build (docker/Dockerfile.cuda) unless the LLMService names an image.")
    gpu_image_tag: str = Field("0.1.0-cuda", description="Server image tag for GPU pods.")
    resync_seconds: float = Field(
        30.0, gt=0, description="How often each LLMService is re-planned against the nodes, "
        "its certificates checked for renewal and its status refreshed.")
    cluster_domain: str = Field("cluster.local", description="DNS suffix for Service names.")
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty: the whole cluster.")
    kubeconfig: str | None = Field(
        None, description="kubeconfig file for the API client (default: in-cluster, then "
        "$KUBECONFIG / ~/.kube/config).")
