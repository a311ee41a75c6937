"""Plan an LLMService's batch width from the nodes it may run on: the memory they declare
(node labels, or spec.resources.memory for CPU pods) as a MemoryBudget, fitted with
:func:`llamafleet.common.capacity.fit`, the function the pod uses too."""

from __future__ import annotations

from dataclasses import dataclass

from llamafleet.common.capacity import KVShape, MemoryBudget, MiB, ModelFootprint, fit
from llamafleet.common.contract import embedded_model

from .spec import LLMServiceSpec, quantity_bytes

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


def model_facts(spec: LLMServiceSpec) -> tuple[KVShape, float, str]:
    given = spec.model.shape.model_dump(exclude_none=True)
    if spec.model.source.embedded:
        name = spec.model.source.embedded.name
        base, origin = embedded_model(name).shape, f"embedded model {name}"
    elif given.get("sizeBytes") and given.get("layers"):
        base, origin = CONSERVATIVE_SHAPE, "spec.model.shape"
    else:
        base, origin = CONSERVATIVE_SHAPE, "conservative 8B-class estimate (set spec.model.shape)"
    s = {**base, **given}
    kv = KVShape(s["layers"], s["kvHeads"], s["keyLength"], s["valueLength"],
                 s.get("slidingWindow"), s.get("swaPattern"))
    return kv, float(s["sizeBytes"]), origin


def eligible(nodes: list[NodeGPU], spec: LLMServiceSpec) -> list[NodeGPU]:
    """Nodes whose labels satisfy the spec's nodeSelector (affinity is left to the scheduler)."""
    sel = spec.scheduling.nodeSelector
    return [n for n in nodes if all(n.labels.get(k) == v for k, v in sel.items())]


def plan_service(spec: LLMServiceSpec, nodes: list[NodeGPU]) -> ServicePlan:
    kv, size, origin = model_facts(spec)
    model = ModelFootprint(size, kv, spec.model.contextSize, gpu_layers=spec.gpuLayers)
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
