"""Capacity planning: how many sequences fit, shared by the operator and the pod.

Pure and import-light on purpose: the operator imports it, so it must not load
llama.cpp. The formula (ARCHITECTURE.md):

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
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

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


# --- the pod's probe ------------------------------------------------------------------------


class NVML(Protocol):
    """The part of pynvml we use (faked in unit tests)."""

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int: ...

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...

    def nvmlDeviceGetName(self, handle: Any) -> Any: ...


@dataclass(frozen=True)
class GPUInfo:
    count: int
    memory_bytes: int  # smallest free memory among the visible devices
    name: str


def probe_gpus(nvml: NVML | None = None, visible: str | None = None) -> GPUInfo | None:
    """Visible GPUs through NVML, or None when there are none or NVML is missing."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound and friends
        log.info("no NVIDIA GPU visible (%s)", e)
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        indices = list(range(count))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        if visible is not None and visible.strip() != "":
            wanted = [v.strip() for v in visible.split(",") if v.strip()]
            indices = [int(v) for v in wanted if v.isdigit() and int(v) < count]
        if not indices:
            return None
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        free = min(int(nvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles)
        name = nvml.nvmlDeviceGetName(handles[0])
        name = name.decode() if isinstance(name, bytes) else str(name)
        return GPUInfo(len(handles), free, name)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def system_memory_bytes(cgroup_root: Path = Path("/sys/fs/cgroup"),
                        meminfo: Path = Path("/proc/meminfo")) -> int:
    """The cgroup memory limit when there is one, else the machine's memory."""
    total = 0
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    for limit_file in (cgroup_root / "memory.max", cgroup_root / "memory/memory.limit_in_bytes"):
        try:
            raw = limit_file.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            return int(raw)
    return total


def llama_supports_gpu_offload() -> bool:
    """Whether the llama.cpp build can offload at all (a CPU build cannot, GPU or not)."""
    import llama_cpp  # here, not at the top: importing this module must not load llama.cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def plan_for_pod(settings: Any, shape: Any, nvml: NVML | None = None,
                 system_memory: int | None = None, gpu_offload: bool | None = None) -> Plan:
    """Probe the machine and plan; raise CapacityError when not even one sequence fits.

    GPU memory (NVML) is used only when the llama.cpp build can offload: a CPU build on a
    GPU node keeps the KV cache in RAM, so it is planned from RAM.
    """
    if settings.gpu_layers != 0 and gpu_offload is None:
        gpu_offload = llama_supports_gpu_offload()
        if not gpu_offload:
            log.info("this llama.cpp build cannot offload to a GPU: planning from RAM")
    kv = KVShape.of(shape)
    common = dict(weights_bytes=shape.size_bytes, kv=kv, context=settings.context_size,
                  cap=settings.max_batch_size, kv_type=settings.kv_cache_type,
                  reserve_bytes=settings.memory_reserve_mib * MiB,
                  usable_fraction=settings.memory_usable_fraction)
    gpus = probe_gpus(nvml) if settings.gpu_layers != 0 and gpu_offload else None
    if gpus is not None:
        layers = shape.n_layer if settings.gpu_layers < 0 else min(settings.gpu_layers, shape.n_layer)
        result = plan(memory_bytes=gpus.memory_bytes, device_count=gpus.count,
                      offload_fraction=layers / max(shape.n_layer, 1), mode="gpu", **common)
        result = Plan(result.max_batch_size, f"{gpus.name}: {result.reason}", result.mode,
                      result.memory_mib, result.per_sequence_mib)
    else:
        mem = system_memory if system_memory is not None else system_memory_bytes()
        result = plan(memory_bytes=mem, device_count=1, mode="cpu", **common)
    if result.max_batch_size < 1:
        raise CapacityError(
            f"the model does not fit: {result.reason}. Lower LLM_LLAMA_SERVICE_CONTEXT_SIZE, "
            "use a smaller model or quantisation, or give the pod more memory.")
    return result
