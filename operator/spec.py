"""The LLMService spec as the operator reads it: defaults and validation, mirroring the CRD.

The API server validates against the CRD schema; we validate again because the operator
must never trust that (older CRD, disabled validation) and must say precisely what to fix.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

from llamafleet.common.contract import (
    ADAPTER_NAME_PATTERN,
    DEFAULT_EMBEDDED_MODEL,
    SPECULATIVE_K_DEFAULT,
    SPECULATIVE_K_MAX,
    TENANTS_SECRET_KEY,
    embedded_model,
    pod_service_name,
)
from llamafleet.common.sampling import MaxTokens, RepeatPenalty, Temperature, TopK, TopP
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .certs import parse_duration


class SpecError(Exception):
    """The spec is wrong; the message says what to fix."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PVCSource(_M):
    claimName: str = Field(min_length=1)
    path: str = Field(min_length=1)


class URLSource(_M):
    url: str = Field(pattern=r"^https?://")
    sha256: str = Field(pattern=r"^[a-f0-9]{64}$")


class EmbeddedSource(_M):
    """A model built into the image, by its name in llamafleet.common.contract.EMBEDDED_MODELS."""

    name: str = DEFAULT_EMBEDDED_MODEL

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return embedded_model(name).name


class Source(_M):
    WHERE: ClassVar[str] = "model.source"  # where in the spec, for the error

    pvc: PVCSource | None = None
    url: URLSource | None = None
    embedded: EmbeddedSource | None = None

    @field_validator("embedded", mode="before")
    @classmethod
    def _boolean(cls, value: Any) -> Any:
        """The older form: ``embedded: true`` is the default model, ``false`` none."""
        if isinstance(value, bool):
            return EmbeddedSource() if value else None
        return value

    @model_validator(mode="after")
    def _one(self) -> Source:
        chosen = [k for k in ("pvc", "url", "embedded") if getattr(self, k) is not None]
        if len(chosen) != 1:
            w = self.WHERE
            raise ValueError(f"set exactly one of {w}.pvc, {w}.url or {w}.embedded (got "
                             f"{chosen or 'none'})")
        return self


class Shape(_M):
    sizeBytes: int | None = Field(None, ge=1)
    layers: int | None = Field(None, ge=1)
    kvHeads: int | None = Field(None, ge=1)
    keyLength: int | None = Field(None, ge=1)
    valueLength: int | None = Field(None, ge=1)
    slidingWindow: int | None = Field(None, ge=1)
    swaPattern: int | None = Field(None, ge=1)


class ModelSpec(_M):
    source: Source
    contextSize: int = Field(4096, ge=64, le=1_048_576)
    shape: Shape = Field(default_factory=Shape)


class AdapterPVCSource(PVCSource):
    # The pod reads its start-up adapters as NAME=PATH[:SCALE], comma-separated.
    path: str = Field(min_length=1, pattern=r"^[^,]+$")


class AdapterSource(_M):
    """Where an adapter's GGUF comes from: a file on a PVC, or a URL the pods download (and
    verify) before they start, as the model's."""

    pvc: AdapterPVCSource | None = None
    url: URLSource | None = None

    @model_validator(mode="after")
    def _one(self) -> AdapterSource:
        chosen = [k for k in ("pvc", "url") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("set exactly one of source.pvc or source.url (got "
                             f"{chosen or 'none'})")
        return self


MAX_ADAPTERS = 32


class AdapterSpec(_M):
    """A LoRA adapter for the model: requests that name it run with it (llamafleet.inference.adapters)."""

    name: str = Field(pattern=f"^{ADAPTER_NAME_PATTERN}$")
    source: AdapterSource
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _finite(cls, scale: float) -> float:
        if not math.isfinite(scale):
            raise ValueError(f"scale {scale}: must be a finite number")
        return scale


class Image(_M):
    repository: str | None = None
    tag: str | None = None
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
CPU = re.compile(r"^[0-9]+(\.[0-9]+)?m?$")


class Resources(_M):
    gpus: int = Field(1, ge=0, le=16)
    cpu: str = Field("2", pattern=CPU.pattern)
    memory: str = Field("8Gi", pattern=QUANTITY.pattern)


class Batching(_M):
    maxBatchSize: int = Field(16, ge=1, le=256)
    queueSize: int = Field(64, ge=0, le=100_000)


class DraftSource(Source):
    WHERE: ClassVar[str] = "speculative.draftModel.source"


class DraftModelSpec(_M):
    """The draft model of speculative mode 'draft': a small model with the served model's
    vocabulary, from the same kinds of source as the model (the pod checks the vocabulary).
    ``shape``: its size and shape for the capacity plan, as model.shape
    (llamafleet.operator.planning.draft_facts)."""

    source: DraftSource
    shape: Shape = Field(default_factory=Shape)


class Speculative(_M):
    """The pods' speculative decoding (--speculative, --speculative-k, --draft-model): 'ngram'
    drafts by prompt lookup, 'draft' with ``draftModel``; 'none' is off."""

    mode: Literal["none", "ngram", "draft"] = "none"
    k: int = Field(SPECULATIVE_K_DEFAULT, ge=1, le=SPECULATIVE_K_MAX)
    draftModel: DraftModelSpec | None = None

    @model_validator(mode="after")
    def _draft_model_with_mode_draft(self) -> Speculative:
        if self.mode == "draft" and self.draftModel is None:
            raise ValueError("mode draft needs draftModel.source (pvc, url or embedded): a "
                             "small model with the served model's vocabulary")
        if self.draftModel is not None and self.mode != "draft":
            raise ValueError(f"draftModel is set but mode is {self.mode!r}: set mode draft to "
                             "use it, or remove draftModel")
        return self


class Tracing(_M):
    """OpenTelemetry traces of the pods and the router (docs/observability.md), exported over
    OTLP/HTTP to ``otlpEndpoint`` (a collector's base URL; ``/v1/traces`` is appended).
    Unset: off."""

    otlpEndpoint: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=2048)
    sampleRatio: float = Field(1.0, ge=0, le=1)


class Sampling(_M):
    """The pods' DEFAULT_* sampling settings (ranges: llamafleet.common.sampling)."""

    temperature: Temperature | None = None
    topK: TopK | None = None
    topP: TopP | None = None
    repeatPenalty: RepeatPenalty | None = None
    maxTokens: MaxTokens | None = None


class TLS(_M):
    enabled: bool = True
    validity: str = "8760h"
    renewBefore: str = "720h"
    # How long old and new CA are both trusted during a CA rotation (twice: before the
    # leaves are reissued, and before the old CA is dropped). Kubelets refresh mounted
    # Secrets within about a minute (sync period plus cache TTL); 10m leaves a margin.
    caOverlap: str = "10m"

    @model_validator(mode="after")
    def _durations(self) -> TLS:
        validity, renew = parse_duration(self.validity), parse_duration(self.renewBefore)
        overlap = parse_duration(self.caOverlap)
        if renew >= validity:
            raise ValueError(f"tls.renewBefore ({self.renewBefore}) must be shorter than "
                             f"tls.validity ({self.validity})")
        if 2 * overlap >= renew:
            raise ValueError(f"tls.caOverlap ({self.caOverlap}) must be shorter than half of "
                             f"tls.renewBefore ({self.renewBefore}): a CA rotation takes two "
                             "overlap windows and must end before the old CA expires")
        return self


class Toleration(_M):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class Scheduling(_M):
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)


class Logging(_M):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Peer(_M):
    podSelector: dict[str, str] | None = None
    namespaceSelector: dict[str, str] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Peer:
        if self.podSelector is None and self.namespaceSelector is None:
            raise ValueError("an allowedClients entry needs podSelector or namespaceSelector "
                             "(an empty peer would admit every pod)")
        return self


class NetworkPolicySpec(_M):
    enabled: bool = True
    allowedClients: list[Peer] = Field(default_factory=list)
    monitoringNamespaces: list[str] = Field(default_factory=list)


class Auth(_M):
    apiKeySecret: str | None = Field(None, pattern=DNS_SUBDOMAIN.pattern, max_length=253)
    apiKeySecretKey: str = Field("api-key", pattern=r"^[-._a-zA-Z0-9]+$")


class TenantsSpec(_M):
    """The tenants file (llamafleet.common.tenants): a Secret mounted into the pods and the
    router, re-read within a second of a change (keys, priorities, limits)."""

    secretName: str = Field(pattern=DNS_SUBDOMAIN.pattern, max_length=253)
    secretKey: str = Field(TENANTS_SECRET_KEY, pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)
    # The router holds requests beyond each replica's slots plus this (its priority queue).
    maxQueuedPerReplica: int | None = Field(None, ge=0, le=10000)


class LocalObjectReference(_M):
    name: str = Field(pattern=DNS_SUBDOMAIN.pattern, max_length=253)


class PDBSpec(_M):
    enabled: bool = False
    minAvailable: int = Field(1, ge=0)


class EndpointPicker(_M):
    """The Service of a Gateway API Inference Extension endpoint picker (e.g. llm-d's)."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN.pattern)
    port: int = Field(9002, ge=1, le=65535)
    failureMode: Literal["FailOpen", "FailClose"] = "FailClose"


class InferencePoolSpec(_M):
    enabled: bool = False
    endpointPicker: EndpointPicker | None = None

    @model_validator(mode="after")
    def _picker(self) -> InferencePoolSpec:
        if self.enabled and self.endpointPicker is None:
            raise ValueError("routing.inferencePool.enabled needs routing.inferencePool."
                             "endpointPicker.name: the Service of the endpoint picker that "
                             "the gateway asks which pod serves a request")
        return self


class RouterResources(_M):
    cpu: str = Field("500m", pattern=CPU.pattern)
    memory: str = Field("512Mi", pattern=QUANTITY.pattern)


class RouterSpec(_M):
    """``llamafleet router`` in front of the pods; ``enabled`` unset means
    :attr:`LLMServiceSpec.router_enabled` decides."""

    enabled: bool | None = None
    replicas: int = Field(1, ge=1, le=100)
    resources: RouterResources = Field(default_factory=RouterResources)


class Routing(_M):
    inferencePool: InferencePoolSpec = Field(default_factory=InferencePoolSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)


DURATION = r"^([0-9]+(\.[0-9]+)?[dhms])+$"  # as the CRD: 90s, 5m, 1h30m, 7d


class Scaling(_M):
    """Autoscaling on load (llamafleet.operator.scaling_policy). With it, spec.replicas belongs
    to the autoscaler, which writes it through the scale subresource: leave it out."""

    mode: Literal["builtin", "hpa", "keda"] = "builtin"
    minReplicas: int = Field(1, ge=0, le=1000)
    maxReplicas: int = Field(ge=1, le=1000)
    # None: the planned max_batch_size (scale out once the pods' sequence slots are full).
    targetInFlightPerReplica: int | None = Field(None, ge=1, le=100_000)
    averageWindow: str = Field("30s", pattern=DURATION)
    scaleUpStabilization: str = Field("0s", pattern=DURATION)
    scaleDownDelay: str = Field("5m", pattern=DURATION)
    idleBeforeZero: str = Field("15m", pattern=DURATION)

    @model_validator(mode="after")
    def _consistent(self) -> Scaling:
        for name in ("averageWindow", "scaleUpStabilization", "scaleDownDelay"):
            parse_duration(getattr(self, name), allow_zero=True)
        parse_duration(self.idleBeforeZero)
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"scaling.minReplicas ({self.minReplicas}) must not be above "
                             f"scaling.maxReplicas ({self.maxReplicas})")
        if self.mode == "hpa" and self.minReplicas == 0:
            raise ValueError("scaling.mode hpa cannot scale to zero (a HorizontalPodAutoscaler "
                             "needs the alpha HPAScaleToZero feature gate for minReplicas 0): "
                             "use minReplicas >= 1, or mode builtin or keda")
        return self

    def seconds(self, name: str) -> float:
        """One of the duration fields, in seconds."""
        return parse_duration(getattr(self, name), allow_zero=True).total_seconds()


class LLMServiceSpec(_M):
    model: ModelSpec
    adapters: list[AdapterSpec] = Field(default_factory=list, max_length=MAX_ADAPTERS)
    # Absent: 1 for a fixed fleet; with spec.scaling, max(minReplicas, 1) until the
    # autoscaler first writes it (see _replicas_follow_scaling).
    replicas: int = Field(1, ge=0, le=1000)
    image: Image = Field(default_factory=Image)
    resources: Resources = Field(default_factory=Resources)
    gpuLayers: int = Field(-1, ge=-1)
    batching: Batching = Field(default_factory=Batching)
    speculative: Speculative = Field(default_factory=Speculative)
    tracing: Tracing = Field(default_factory=Tracing)
    sampling: Sampling = Field(default_factory=Sampling)
    systemPrompt: str | None = Field(None, max_length=65536)
    tls: TLS = Field(default_factory=TLS)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    logging: Logging = Field(default_factory=Logging)
    networkPolicy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    podDisruptionBudget: PDBSpec = Field(default_factory=PDBSpec)
    auth: Auth = Field(default_factory=Auth)
    tenants: TenantsSpec | None = None
    imagePullSecrets: list[LocalObjectReference] = Field(default_factory=list)
    routing: Routing = Field(default_factory=Routing)
    scaling: Scaling | None = None

    @model_validator(mode="after")
    def _adapter_names_differ(self) -> LLMServiceSpec:
        names = [a.name for a in self.adapters]
        if (twice := sorted({n for n in names if names.count(n) > 1})):
            raise ValueError(f"adapters: each name must be unique ({', '.join(twice)} repeated)")
        return self

    @model_validator(mode="after")
    def _replicas_follow_scaling(self) -> LLMServiceSpec:
        """With spec.scaling the autoscaler owns spec.replicas: absent, the fleet starts at
        max(minReplicas, 1) (it comes up once, then idles to zero if minReplicas is 0); set,
        it must lie in [minReplicas, maxReplicas] (the scale subresource keeps it there)."""
        sc = self.scaling
        if sc is None:
            return self
        if "replicas" not in self.model_fields_set:
            self.replicas = max(sc.minReplicas, 1)
        elif not sc.minReplicas <= self.replicas <= sc.maxReplicas:
            raise ValueError(f"replicas ({self.replicas}) is outside scaling.minReplicas.."
                             f"scaling.maxReplicas ({sc.minReplicas}..{sc.maxReplicas}): with "
                             "spec.scaling the autoscaler sets replicas; leave it out")
        return self

    @model_validator(mode="after")
    def _pdb_leaves_room(self) -> LLMServiceSpec:
        pdb = self.podDisruptionBudget
        if pdb.enabled and self.scaling is not None:
            # The fleet moves: the PDB must leave room at its smallest non-zero size.
            floor = max(self.scaling.minReplicas, 1)
            if pdb.minAvailable >= floor:
                raise ValueError(f"podDisruptionBudget.minAvailable ({pdb.minAvailable}) must be "
                                 f"below max(scaling.minReplicas, 1) ({floor}), or no node could "
                                 "be drained while the fleet is at its smallest")
            return self
        if pdb.enabled and self.replicas > 0 and pdb.minAvailable >= self.replicas:
            raise ValueError(f"podDisruptionBudget.minAvailable ({pdb.minAvailable}) must be "
                             f"below replicas ({self.replicas}), or no node could ever be "
                             "drained; lower it or disable the PodDisruptionBudget")
        return self

    @property
    def router_enabled(self) -> bool:
        """Whether the operator deploys the router: as set, else when there is more than
        one replica to choose from (one replica needs no routing), or when autoscaling may
        change the replicas (the router holds requests while the fleet is at zero; it
        stays on as the fleet grows and shrinks, so clients never switch Services)."""
        if self.routing.router.enabled is not None:
            return self.routing.router.enabled
        return self.replicas > 1 or self.scaling is not None


def parse_spec(raw: dict[str, Any]) -> LLMServiceSpec:
    try:
        return LLMServiceSpec.model_validate(dict(raw or {}))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = "spec." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "spec"
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        raise SpecError("; ".join(problems)) from None
    except ValueError as e:
        raise SpecError(str(e)) from None


# Service names are RFC 1035 labels (63 characters); the pod Service adds a suffix.
MAX_NAME_LENGTH = 63 - len(pod_service_name(""))


def check_name(name: str) -> None:
    """The LLMService's name becomes Service names (RFC 1035 labels: ``<name>`` and
    ``<name>-pods``) and a label value."""
    if len(name) > MAX_NAME_LENGTH or not DNS_LABEL.match(name):
        raise SpecError(f"metadata.name {name!r} must be a DNS label of at most "
                        f"{MAX_NAME_LENGTH} characters: lowercase letters, digits and '-', "
                        "starting with a letter and ending with a letter or digit (no dots), "
                        f"because it names the Services {name}-pods and {name}")


def quantity_bytes(q: str) -> int:
    m = QUANTITY.match(q)
    if not m:
        raise SpecError(f"invalid quantity {q!r}")
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12, None: 1}
    return int(float(q[: len(q) - len(m.group(2) or "")]) * units[m.group(2)])
