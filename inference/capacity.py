"""The pod's side of capacity planning: measure its memory at start-up (the GPUs through
NVML, or the RAM limit) as a :class:`~llamafleet.common.capacity.MemoryBudget`, and fit the
model into it with :func:`llamafleet.common.capacity.fit`, the function the operator uses too."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from llamafleet.common.capacity import CapacityError, KVShape, MemoryBudget, MiB, ModelFootprint, Plan, fit
from llamafleet.common.contract import env_name

log = logging.getLogger(__name__)


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
    """The visible GPUs as NVML measures them. The memory figures are those of the card with
    the least free memory (llama.cpp splits the layers evenly), in bytes."""

    count: int
    total_bytes: int  # that card's memory
    in_use_bytes: int  # of it, taken when measured (before the load: by others)
    name: str

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.in_use_bytes


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
        fullest = min((nvml.nvmlDeviceGetMemoryInfo(h) for h in handles), key=lambda m: int(m.free))
        total = int(fullest.total)
        name = nvml.nvmlDeviceGetName(handles[0])
        name = name.decode() if isinstance(name, bytes) else str(name)
        return GPUInfo(len(handles), total, total - int(fullest.free), name)
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


def probe_for_pod(settings: Any, nvml: NVML | None = None, gpu_offload: bool | None = None
                  ) -> GPUInfo | None:
    """The GPUs the pod plans from, or None to plan from RAM.

    Call it **before the model is loaded**: :func:`fit` subtracts the weights from the
    memory it is given, as the operator does from the card's memory. NVML's free memory
    measured after the load already lacks them, and a pod that planned from it subtracted
    them twice and refused a model the operator had planned for it (a 7B Q4 on a 6 GB card).

    GPU memory (NVML) is used only when the llama.cpp build can offload: a CPU build on a
    GPU node keeps the KV cache in RAM, so it is planned from RAM.
    """
    if settings.gpu_layers == 0:
        return None
    if gpu_offload is None:
        gpu_offload = llama_supports_gpu_offload()
        if not gpu_offload:
            log.info("this llama.cpp build cannot offload to a GPU: planning from RAM")
    return probe_gpus(nvml) if gpu_offload else None


def pod_budget(settings: Any, gpus: GPUInfo | None, system_memory: int | None = None
               ) -> MemoryBudget:
    """The memory the pod plans in, as measured: ``gpus`` (:func:`probe_for_pod`, before the
    load) or, when None, the RAM (``system_memory``, else :func:`system_memory_bytes`); the
    reserve and the usable share from the settings."""
    kept = dict(reserve_bytes=settings.memory_reserve_mib * MiB,
                usable_fraction=settings.memory_usable_fraction)
    if gpus is not None:
        return MemoryBudget("gpu", gpus.total_bytes, gpus.count, gpus.in_use_bytes, **kept)
    mem = system_memory if system_memory is not None else system_memory_bytes()
    return MemoryBudget("cpu", mem, **kept)


def pod_model(settings: Any, shape: Any) -> ModelFootprint:
    """The loaded model's footprint: ``shape`` (GGUF metadata and the file's size) at the
    settings' context, KV cache type and GPU layers."""
    kv = KVShape.of(shape)
    if getattr(settings, "swa_full", False):  # sliding-window layers keep every position
        kv = replace(kv, sliding_window=None, swa_pattern=None)
    return ModelFootprint(shape.size_bytes, kv, settings.context_size, settings.kv_cache_type,
                          settings.gpu_layers)


def plan_for_pod(settings: Any, shape: Any, gpus: GPUInfo | None,
                 system_memory: int | None = None, draft_shape: Any = None) -> Plan:
    """Plan from ``gpus`` (:func:`probe_for_pod`, before the load) or, when None, from RAM;
    raise CapacityError when not even one sequence fits. ``draft_shape``: a speculative draft
    model's, planned with the served model (its weights, and its KV cache per sequence)."""
    model = pod_model(settings, shape)
    if draft_shape is not None:
        model = replace(model, draft=pod_model(settings, draft_shape))
    result = fit(pod_budget(settings, gpus, system_memory), model, settings.max_batch_size)
    if gpus is not None:
        result = replace(result, reason=f"{gpus.name}: {result.reason}")
    if result.max_batch_size < 1:
        raise CapacityError(
            f"the model does not fit: {result.reason}. Lower {env_name('context_size')}, "
            "use a smaller model or quantisation, or give the pod more memory.")
    return result
