"""Plan an LLMService's batch width from the nodes it may run on: the memory they declare
(node labels, or spec.resources.memory for CPU pods) as a MemoryBudget, fitted with
:func:`llamafleet.common.capacity.fit`, the function the pod uses too. With speculative mode
draft the draft model is planned with the served one (``ModelFootprint.draft``), as the pod
plans it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from llamafleet.common.capacity import KVShape, MemoryBudget, MiB, ModelFootprint, fit
from llamafleet.common.contract import embedded_model

from .spec import LLMServiceSpec, Shape, Source, quantity_bytes

MEMORY_LABEL = "nvidia.com/gpu.memory"
COUNT_LABEL = "nvidia.com/gpu.count"
PRODUCT_LABEL = "nvidia.com/gpu.product"

# Unknown models are planned as an 8B-class model at 8 bits: conservative on purpose.
CONSERVATIVE_SHAPE = dict(sizeBytes=8_500_000_000, layers=32, kvHeads=8, keyLength=128,
                          valueLength=128)


@dataclass(frozen=True)
class NodeGPU:
    name: str
    labels: dict[str, str]
    memory_mib: int
    count: int
    product: str

    @classmethod
    def from_labels(cls, name: str, labels: dict[str, str]) -> NodeGPU | None:
        try:
            memory = int(labels.get(MEMORY_LABEL, ""))
        except ValueError:
            return None
        try:
            count = max(1, int(labels.get(COUNT_LABEL, "1")))
        except ValueError:
            count = 1
        return cls(name, dict(labels), memory, count, labels.get(PRODUCT_LABEL, "unknown GPU"))


@dataclass(frozen=True)
class ServicePlan:
    max_batch_size: int  # 0: does not fit anywhere
    reason: str
    mode: str
    gpu_memory_mib: int | None  # memory of the node type the pods are pinned to
    pin_above_mib: int | None  # node affinity: nvidia.com/gpu.memory Gt this

    @property
    def fits(self) -> bool:
        return self.max_batch_size >= 1


# The fields of a shape that a draft model's declared shape does not take from the served
# model's: a draft is bounded by the served model only where every layer holds the full context.
SLIDING = ("slidingWindow", "swaPattern")


@dataclass(frozen=True)
class ModelFacts:
    """A model's shape as the plan takes it (spec.model.shape's names: sizeBytes, layers,
    kvHeads, keyLength, valueLength, and slidingWindow/swaPattern when it has them), and where
    those figures came from, for the plan's reason."""

    shape: dict[str, int]
    origin: str

    @property
    def kv(self) -> KVShape:
        s = self.shape
        return KVShape(s["layers"], s["kvHeads"], s["keyLength"], s["valueLength"],
                       s.get("slidingWindow"), s.get("swaPattern"))

    @property
    def size(self) -> float:
        return float(self.shape["sizeBytes"])

    def footprint(self, spec: LLMServiceSpec) -> ModelFootprint:
        """One replica's footprint of this model at the spec's context and GPU layers (the
        pod loads the served and the draft model with the same settings)."""
        return ModelFootprint(self.size, self.kv, spec.model.contextSize, gpu_layers=spec.gpuLayers)


def model_facts(source: Source, shape: Shape, where: str, base: dict[str, int],
                fallback: ModelFacts) -> ModelFacts:
    """A model's facts: an embedded source's from the image's registry; a shape with sizeBytes
    and layers as declared (``where``), the fields left out from ``base``; otherwise
    ``fallback``. Fields the shape declares always win."""
    given = shape.model_dump(exclude_none=True)
    if source.embedded:
        name = source.embedded.name
        return ModelFacts({**embedded_model(name).shape, **given}, f"embedded model {name}")
    if given.get("sizeBytes") and given.get("layers"):
        return ModelFacts({**base, **given}, where)
    return ModelFacts({**fallback.shape, **given}, fallback.origin)


def served_facts(spec: LLMServiceSpec) -> ModelFacts:
    """The served model's: spec.model.shape over an 8B-class estimate, or the registry's."""
    estimate = ModelFacts(CONSERVATIVE_SHAPE,
                          "conservative 8B-class estimate (set spec.model.shape)")
    return model_facts(spec.model.source, spec.model.shape, "spec.model.shape",
                       CONSERVATIVE_SHAPE, estimate)


def draft_facts(spec: LLMServiceSpec, served: ModelFacts) -> ModelFacts | None:
    """The speculative draft model's (mode draft; None otherwise). A draft model is smaller
    than the model it drafts for, so the served model bounds what is not declared: a declared
    sizeBytes and layers take the other fields from the served model's (a sliding window only
    as declared), and a draft with no shape is planned as the served model."""
    draft = spec.speculative.draftModel
    if spec.speculative.mode != "draft" or draft is None:
        return None
    base = {k: v for k, v in served.shape.items() if k not in SLIDING}
    as_served = ModelFacts(served.shape, "planned as the served model (set "
                                         "spec.speculative.draftModel.shape)")
    facts = model_facts(draft.source, draft.shape, "spec.speculative.draftModel.shape", base,
                        as_served)
    return ModelFacts(facts.shape, f"draft: {facts.origin}")


def eligible(nodes: list[NodeGPU], spec: LLMServiceSpec) -> list[NodeGPU]:
    """Nodes whose labels satisfy the spec's nodeSelector (affinity is left to the scheduler)."""
    sel = spec.scheduling.nodeSelector
    return [n for n in nodes if all(n.labels.get(k) == v for k, v in sel.items())]


def plan_service(spec: LLMServiceSpec, nodes: list[NodeGPU]) -> ServicePlan:
    served = served_facts(spec)
    model, origin = served.footprint(spec), served.origin
    if (draft := draft_facts(spec, served)) is not None:  # the pod loads and plans it too
        model = replace(model, draft=draft.footprint(spec))
        origin = f"{origin}; {draft.origin}"
    cap = spec.batching.maxBatchSize
    if spec.resources.gpus == 0:
        p = fit(MemoryBudget("cpu", quantity_bytes(spec.resources.memory)), model, cap)
        return ServicePlan(p.max_batch_size, f"CPU pods ({origin}): {p.reason}", "cpu", None, None)
    candidates = eligible(nodes, spec)
    if not candidates:
        return ServicePlan(1, f"no schedulable node advertises {MEMORY_LABEL}; planned "
                              "conservatively at 1 (the pod re-checks with NVML)", "gpu", None, None)
    best: tuple[int, int, str] | None = None  # (batch, memory, reason)
    for mem in sorted({n.memory_mib for n in candidates}):
        node = next(n for n in candidates if n.memory_mib == mem)
        # Declared: the node's label (MiB per card); a card the scheduler gives has none in use.
        budget = MemoryBudget("gpu", mem * MiB, devices=min(spec.resources.gpus, node.count))
        p = fit(budget, model, cap)
        reason = f"{node.product} ({origin}): {p.reason}"
        if best is None or p.max_batch_size > best[0]:
            best = (p.max_batch_size, mem, reason)
    assert best is not None
    batch, mem, reason = best
    if batch < 1:
        return ServicePlan(0, reason, "gpu", mem, None)
    return ServicePlan(batch, reason, "gpu", mem, mem - 1)
