"""Capacity planning: how many sequences fit, shared by the operator and the pod.

Pure and import-light on purpose: the operator imports it, so it must not load
llama.cpp. The formula (docs/architecture.md):

    kv_bytes_per_token = sum over layers of n_head_kv * (key_length + value_length) * bytes
    per_sequence       = kv bytes for one sequence at the context size
                         (sliding-window layers hold at most `window` tokens)
    max_batch_size     = clamp(floor((memory * usable - weights_on_device - reserve)
                                     / per_sequence), 1, cap)

When not even one sequence fits, the plan says so (max_batch_size 0) and callers fail
with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# Every Nth layer is global (full context); the others use the sliding window.
# llama.cpp hard-codes these patterns per architecture.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4}


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
class Plan:
    max_batch_size: int
    reason: str
    mode: str  # "gpu" | "cpu"
    memory_mib: int
    per_sequence_mib: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(*, memory_bytes: float, device_count: int, weights_bytes: float, kv: KVShape,
         context: int, cap: int, offload_fraction: float = 1.0, kv_type: str = "f16",
         reserve_bytes: float = 768 * MiB, usable_fraction: float = 0.95, mode: str = "gpu"
         ) -> Plan:
    """The one capacity function. ``memory_bytes`` is per device."""
    if cap < 1:
        raise ValueError("cap must be >= 1")
    offload = min(max(offload_fraction, 0.0), 1.0)
    total = memory_bytes * device_count
    usable = total * usable_fraction
    weights = weights_bytes * offload
    per_seq = kv.bytes_per_sequence(context, kv_type) * (offload if mode == "gpu" else 1.0)
    free = usable - weights - reserve_bytes
    where = f"{device_count}x{memory_bytes / MiB:.0f} MiB GPU" if mode == "gpu" else \
        f"{total / MiB:.0f} MiB RAM"
    head = (f"{where}: {usable / MiB:.0f} MiB usable - {weights / MiB:.0f} MiB weights - "
            f"{reserve_bytes / MiB:.0f} MiB reserve = {free / MiB:.0f} MiB for KV; "
            f"{per_seq / MiB:.1f} MiB per sequence of {context} tokens")
    fits = math.floor(free / per_seq) if per_seq > 0 else cap
    if fits < 1:
        n, why = 0, f"{head}: not even one sequence fits"
    elif fits >= cap:
        n, why = cap, f"{head}: {fits} fit, capped at {cap}"
    else:
        n, why = fits, f"{head}: {fits} fit (cap {cap})"
    return Plan(n, why, mode, int(total / MiB), round(per_seq / MiB, 2))
