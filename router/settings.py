"""Every setting of the router, in one place (``llamafleet router --help`` prints them).

Each field reads ``LLM_LLAMA_SERVICE_ROUTER_<NAME>``; ``llamafleet router --<name>`` overrides it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llamafleet.common import tenants
from llamafleet.common.contract import HTTP_PORT, ROUTER_ENV_PREFIX, ROUTER_PORT, env_name, router_env_name
from llamafleet.common.http_limits import Limits
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
        f"http://127.0.0.1:{HTTP_PORT},http://127.0.0.1:{HTTP_PORT + 100} (a fixed set). Give this "
        "or --llmservice.",
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
    max_queued_per_replica: int | None = Field(
        None,
        ge=0,
        description="Hold requests in the router once a replica has this many of the "
        "router's requests beyond its slots (its max batch size, from its /metrics): the "
        "hold queue then orders them, highest priority first and tenants of one priority in "
        "turn, instead of the replicas' own queues. Unset: send at once, hold only while no "
        "replica is ready.",
    )
    tenants_file: tenants.TenantsPath = Field(
        None,
        description="The tenants file (YAML or JSON; the Secret that the LLMService's "
        "spec.tenants.secretName names, mounted): keys that name tenants, with priorities "
        "and limits that the router enforces for the fleet (429 rate_limit_exceeded). Re-read "
        "within a second of a change; malformed: the router does not start, or on a reload "
        "keeps the last good one. With it the router checks keys itself and sends tenants' "
        "requests with --backend-api-key.",
    )
    # --- client reads (llamafleet.common.http_limits) ---------------------------------
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest request head (request line and headers together) in bytes; "
        "beyond it 400 and the connection is closed, before the head is held. 32 KiB is "
        "nginx's default (4 buffers of 8 KiB): room for long bearer tokens and cookies.",
    )
    max_headers: int = Field(
        100,
        ge=8,
        description="Most header fields in one request (431 beyond; Apache's default "
        "LimitRequestFields). OpenAI clients send about 15.",
    )
    header_timeout: float = Field(
        15.0,
        gt=0,
        description="Seconds a client has to send a request's head once its connection "
        "opens (or once its next request begins on a kept-alive connection); then 408 and "
        "the connection is closed. Every HTTP client sends its head at once; this only "
        "ends slow-drip clients that would hold a connection for ever.",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Largest request body (413 beyond: at once from Content-Length, else as "
        "soon as the count passes it). Above a pod's own limit up to a 229k-token context "
        "(1 MiB + 32 B per token), so below that the pod's own 413 is the one clients see.",
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a request's whole body has to arrive once its head has (408 "
        "beyond). 60 s carries an 8 MiB body at 140 KB/s; a client sending one byte every "
        "10 s is cut off instead of holding its connection and its buffer.",
    )
    max_buffered_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024 * 1024,
        description="Request bodies the router keeps in memory at once, all requests "
        "together (being read, held for a replica, or being sent; a body is kept until its "
        "answer ends, for retries). Beyond it new requests get 503 `overloaded` before their "
        "body is read. 128 MiB keeps the router well inside its pod's default 512 MiB limit.",
    )
    max_connections: int = Field(
        4096,
        ge=16,
        description="Requests in progress at once, streams included (uvicorn's "
        "limit_concurrency; 503 beyond). About 64 sequences on each of 64 replicas.",
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
    poll_timeout: float = Field(
        2.0,
        gt=0,
        description="Seconds one poll (/ready, then /metrics) of a replica may take. Both "
        "answer in milliseconds from the pod's event loop, off the engine thread; a replica "
        "slower than this (stopped, hung, partitioned) is out of rotation until a poll "
        "answers in time, and the other replicas' polls never wait for it.",
    )
    poll_failure_budget: int = Field(
        3,
        ge=1,
        description="Polls in a row that may go unanswered before a replica is given up: its "
        "requests that have had no answer yet go to another replica, and its streams end "
        "with an error event. One missed poll only takes it out of rotation (a busy pod can "
        "miss one); three (about 3 x (poll-interval + poll-timeout) = 9 s by default) means "
        "it is stopped or hung.",
    )
    failure_backoff: float = Field(
        1.0,
        gt=0,
        description="After a request fails on a replica before any answer (connect error, "
        "dropped connection, given up), the replica stays out of rotation this long even "
        "while its /ready answers 200, doubling with each failure in a row up to "
        "--failure-backoff-max; an answered request resets it. Without it a replica that "
        "fails every request but passes its polls gets new ones every poll.",
    )
    failure_backoff_max: float = Field(
        60.0, gt=0, description="The longest --failure-backoff (seconds)."
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Replicas one request is sent to at most: the first and its retries. "
        "A retry never goes to a replica this request has already tried; once every "
        "untried ready replica is used up or this many were tried, the client gets 502 "
        "`replica_failed`.",
    )
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to a replica.")
    read_timeout: float = Field(
        600.0,
        gt=0,
        description="The longest silence from a replica on a proxied request: before its "
        "answer, or between two chunks of it. A non-streaming answer arrives whole at the end, "
        "so this must exceed the longest generation; a stopped replica is found much sooner "
        "by its polls (--poll-failure-budget). Also bounds writing a body to a replica.",
    )
    backend_api_key: SecretStr | None = Field(
        None,
        description="Bearer token for the router's own polls of replicas' /metrics when "
        f"they require an API key (their {env_name('api_key')}). Never added to clients' "
        "requests: their Authorization goes through and the replicas check it. A caller "
        "that presents it also sees the replicas' URLs on /health.",
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

    @model_validator(mode="after")
    def _bodies_fit(self) -> RouterSettings:
        if self.max_request_bytes > self.max_buffered_bytes:
            raise ValueError("max_request_bytes must not exceed max_buffered_bytes")
        return self

    @property
    def read_limits(self) -> Limits:
        return Limits(max_header_bytes=self.max_header_bytes, max_headers=self.max_headers,
                      head_timeout=self.header_timeout, max_body_bytes=self.max_request_bytes,
                      body_timeout=self.body_timeout, max_connections=self.max_connections,
                      body_setting=router_env_name("max_request_bytes"))

    @property
    def backend_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.backends.split(",") if u.strip()]
