"""Every setting of the router, in one place (``llamafleet router --help`` prints them).

Each field reads ``LLM_LLAMA_SERVICE_ROUTER_<NAME>``; ``llamafleet router --<name>`` overrides it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llamafleet.common.contract import ROUTER_ENV_PREFIX, ROUTER_PORT
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A Kubernetes object name that is also a DNS label (LLMService and namespace names).
DNS_LABEL = r"^(|[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)$"
# Where Kubernetes tells a pod its namespace (the service account's mounted token).
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _pod_namespace() -> str:
    try:
        return NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


class RouterSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ROUTER_ENV_PREFIX, extra="ignore", frozen=True)

    backends: str = Field(
        "",
        description="Comma-separated base URLs of `llamafleet serve` replicas, e.g. "
        "http://127.0.0.1:16070,http://127.0.0.1:16170 (a fixed set). Give this or --llmservice.",
    )
    llmservice: str = Field(
        "",
        pattern=DNS_LABEL,
        description="In a cluster: the LLMService whose replicas to route to. The router "
        "watches the EndpointSlices of its pod Service (<name>-pods), uses the ready "
        "endpoints, and scales the LLMService from 0 to 1 replica when a request waits "
        "and none is ready. Give this or --backends.",
    )
    namespace: str = Field(
        default_factory=_pod_namespace,
        pattern=DNS_LABEL,
        description="Namespace of --llmservice (default: the router pod's own namespace, "
        f"from {NAMESPACE_FILE}; else 'default').",
    )
    host: str = Field("0.0.0.0", description="Address the router listens on.")
    port: int = Field(ROUTER_PORT, ge=1, le=65535, description="HTTP port of the router.")
    # --- holding ------------------------------------------------------------------------
    hold_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds a request waits for a ready replica before it fails with 503 "
        "(no replica ready, e.g. while scaling from zero).",
    )
    hold_queue_size: int = Field(
        256,
        ge=1,
        description="Requests that may wait for a ready replica at once; beyond it the "
        "router answers 429.",
    )
    # --- affinity -----------------------------------------------------------------------
    block_chars: int = Field(
        256,
        ge=16,
        description="Size in characters of the prompt-prefix blocks whose chained hashes "
        "give prefix affinity.",
    )
    load_factor: float = Field(
        1.25,
        ge=1.0,
        description="Bounded loads: no replica takes more than this times the mean load "
        "(consistent hashing with bounded loads; 1.25 as KubeAI).",
    )
    virtual_nodes: int = Field(256, ge=1, description="Points per replica on the hash ring.")
    affinity_entries: int = Field(
        65536,
        ge=1,
        description="Prefix blocks remembered with the replica that last served them (LRU).",
    )
    # --- replicas -----------------------------------------------------------------------
    poll_interval: float = Field(
        1.0, gt=0, description="Seconds between polls of each replica's /ready and /metrics."
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to a replica.")
    backend_api_key: SecretStr | None = Field(
        None,
        description="Bearer token for the router's own polls of replicas' /metrics when "
        "they require an API key (their LLM_LLAMA_SERVICE_API_KEY). Never added to clients' "
        "requests: their Authorization goes through and the replicas check it.",
    )
    log_level: str = Field("INFO", description="Python log level.")
    log_format: Literal["json", "console"] = Field(
        "json", description="Log lines as JSON (production) or readable text.")

    @field_validator("backends")
    @classmethod
    def _urls(cls, v: str) -> str:
        for url in (u.strip() for u in v.split(",")):
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"backend {url!r} is not an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> RouterSettings:
        if bool(self.backend_urls) == bool(self.llmservice.strip()):
            raise ValueError("give exactly one of --backends URL,URL (fixed replicas) and "
                             "--llmservice NAME (discover them in Kubernetes)")
        return self

    @property
    def backend_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.backends.split(",") if u.strip()]
