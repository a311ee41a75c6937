"""Capacity planning: how many sequences of a model fit in a memory budget.

One function, :func:`fit`, over an explicit :class:`MemoryBudget` and a
:class:`ModelFootprint`. The pod calls it with the memory it measures at start-up
(``llamafleet.inference.capacity``), the operator with the memory its nodes declare
(``llamafleet.operator.planning``); neither does any arithmetic of its own.

Pure and import-light on purpose: the operator imports it, so it must not load llama.cpp.
The formula (docs/architecture.md):

    kv_bytes_per_token = sum over layers of n_head_kv * (key_length + value_length) * bytes
    per_sequence       = kv bytes for one sequence at the context size
                         (sliding-window layers hold at most `window` tokens)
    free               = devices * (device memory - already in use)
    max_batch_size     = clamp(floor((free * usable_fraction - weights_on_device - reserve)
                                     / per_sequence), 1, cap)

On a GPU only the offloaded share of the weights and of the KV cache counts (the rest stays
in RAM). When not even one sequence fits, the plan says so (max_batch_size 0) and callers
fail with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# Every Nth layer is global (full context); the others use the sliding window.
# llama.cpp hard-codes these patterns per architecture.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4}

# What a budget keeps back unless told otherwise (the pod's MEMORY_RESERVE_MIB and
# MEMORY_USABLE_FRACTION default to these; the operator plans with them).
DEFAULT_RESERVE_BYTES = 768 * MiB
DEFAULT_USABLE_FRACTION = 0.95


class CapacityError(Exception):
    pass


@dataclass(frozen=True)
class KVShape:
    n_layer: int
    n_head_kv: int
    key_length: int
    value_length: int
    sliding_window: int | None = None
    swa_pattern: int | None = None  # every Nth layer is global; None = all layers global

    @classmethod
    def of(cls, shape: Any) -> KVShape:
        """From a ModelShape (GGUF metadata) or anything with the same attributes."""
        return cls(shape.n_layer, shape.n_head_kv, shape.key_length, shape.value_length,
                   shape.sliding_window,
                   SWA_PATTERN.get(shape.architecture) if shape.sliding_window else None)

    def bytes_per_token(self, kv_type: str = "f16") -> float:
        return self.n_head_kv * (self.key_length + self.value_length) * BYTES_PER_ELEMENT[kv_type]

    def bytes_per_sequence(self, context: int, kv_type: str = "f16") -> float:
        per_layer = self.bytes_per_token(kv_type)
        if self.sliding_window and self.swa_pattern:
            n_global = self.n_layer // self.swa_pattern
            n_local = self.n_layer - n_global
            return per_layer * (n_global * context + n_local * min(context, self.sliding_window))
        return per_layer * self.n_layer * context


@dataclass(frozen=True)
class MemoryBudget:
    """The memory one pod plans in. Every figure is in bytes.

    ``kind`` says which memory: ``"gpu"``, the GPU memory of the cards the pod gets (it holds
    the offloaded layers' weights and KV cache), or ``"cpu"``, the pod's RAM (it holds all).
    Who fills it in, and from what:

    - the pod (llamafleet.inference.capacity), **measured** at start-up before the model
      loads: a card's total memory and what is already in use on it (NVML; the card with
      the least free memory), or its RAM (the cgroup limit, else MemTotal; nothing in use);
    - the operator (llamafleet.operator.planning), **declared**: a node's
      ``nvidia.com/gpu.memory`` label, or ``spec.resources.memory`` for CPU pods; nothing in
      use (the scheduler gives the pod whole cards, and the limit is the pod's own).
    """

    kind: Literal["gpu", "cpu"]
    device_bytes: float  # the memory of one device: a GPU card's total, or the pod's RAM
    devices: int = 1  # GPUs the layers are split over (1 for RAM)
    in_use_bytes: float = 0  # of device_bytes, already taken on each device before the load
    reserve_bytes: float = DEFAULT_RESERVE_BYTES  # kept free: compute buffers, the runtime
    usable_fraction: float = DEFAULT_USABLE_FRACTION  # share of the free memory to plan on

    @property
    def free_bytes(self) -> float:
        """Free memory of all the devices together, before the model loads."""
        return self.devices * (self.device_bytes - self.in_use_bytes)

    @property
    def usable_bytes(self) -> float:
        """The share of the free memory that the weights, the KV cache and the reserve fill."""
        return self.free_bytes * self.usable_fraction

    def describe(self) -> str:
        in_use = f" ({self.in_use_bytes / MiB:.0f} MiB in use)" if self.in_use_bytes else ""
        if self.kind == "gpu":
            return f"{self.devices}x{self.device_bytes / MiB:.0f} MiB GPU{in_use}"
        return f"{self.free_bytes / MiB:.0f} MiB RAM{in_use}"


@dataclass(frozen=True)
class ModelFootprint:
    """What one replica of a model puts in memory: its weights, and per sequence its KV cache.

    ``weights_bytes`` is the GGUF file's size: the pod measures the file it loads, the
    operator takes spec.model.shape or the embedded-model registry (declared).
    """

    weights_bytes: float
    kv: KVShape
    context: int  # tokens per sequence
    kv_type: str = "f16"  # the KV cache's element type (BYTES_PER_ELEMENT)
    gpu_layers: int = -1  # layers offloaded to a GPU budget: -1 all
    # A speculative draft model beside it (its own weights, and a KV cache with as many
    # sequences of the same context): planned together, since each sequence holds both.
    draft: ModelFootprint | None = None

    @property
    def per_sequence_bytes(self) -> float:
        """KV cache bytes of one sequence at the full context, over all layers."""
        return self.kv.bytes_per_sequence(self.context, self.kv_type)

    def offloaded_fraction(self) -> float:
        """The share of the layers (weights and KV cache) that a GPU holds."""
        if self.gpu_layers < 0:
            return 1.0
        return min(self.gpu_layers, self.kv.n_layer) / max(self.kv.n_layer, 1)


@dataclass(frozen=True)
class Plan:
    max_batch_size: int  # 0: not even one sequence fits
    reason: str
    mode: str  # "gpu" | "cpu": the budget's kind
    memory_mib: int  # the budget's free memory (all devices), MiB
    per_sequence_mib: float  # KV cache of one sequence in that memory, MiB

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit(budget: MemoryBudget, model: ModelFootprint, cap: int) -> Plan:
    """The one capacity function: how many sequences of ``model`` fit in ``budget``, at most
    ``cap``. The reason shows the arithmetic."""
    if cap < 1:
        raise ValueError("cap must be >= 1")
    weights = per_seq = 0.0
    for part in (model, model.draft) if model.draft is not None else (model,):
        share = part.offloaded_fraction() if budget.kind == "gpu" else 1.0
        weights += part.weights_bytes * share
        per_seq += part.per_sequence_bytes * share
    usable, reserve = budget.usable_bytes, budget.reserve_bytes
    free = usable - weights - reserve
    both = " (with the draft model's)" if model.draft is not None else ""
    head = (f"{budget.describe()}: {usable / MiB:.0f} MiB usable - {weights / MiB:.0f} MiB "
            f"weights{both} - {reserve / MiB:.0f} MiB reserve = {free / MiB:.0f} MiB for KV; "
            f"{per_seq / MiB:.1f} MiB per sequence of {model.context} tokens{both}")
    fits = math.floor(free / per_seq) if per_seq > 0 else cap
    if fits < 1:
        n, why = 0, f"{head}: not even one sequence fits"
    elif fits >= cap:
        n, why = cap, f"{head}: {fits} fit, capped at {cap}"
    else:
        n, why = fits, f"{head}: {fits} fit (cap {cap})"
    return Plan(n, why, budget.kind, int(budget.free_bytes / MiB), round(per_seq / MiB, 2))
