"""The capacity planner on realistic cards and models, and the pod's probe (NVML faked)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from llamafleet.common.capacity import (
    CapacityError,
    GiB,
    KVShape,
    MemoryBudget,
    MiB,
    ModelFootprint,
    fit,
)
from llamafleet.inference import capacity

from tests.support.fake_nvml import FakeNVML

# (name, KV shape, GGUF size of the Q4_K_M file)
MISTRAL_7B = (KVShape(32, 8, 128, 128), 4.37e9)
LLAMA2_7B = (KVShape(32, 32, 128, 128), 4.08e9)
LLAMA32_3B = (KVShape(28, 8, 128, 128), 2.02e9)
LLAMA31_8B = (KVShape(32, 8, 128, 128), 4.92e9)
LLAMA31_70B = (KVShape(80, 8, 128, 128), 42.5e9)


def gpu(card_gib: float, model, cap: int = 16, context: int = 4096, count: int = 1) -> int:
    kv, size = model
    return fit(MemoryBudget("gpu", card_gib * GiB, devices=count),
               ModelFootprint(size, kv, context), cap).max_batch_size


def test_kv_bytes_follow_the_formula() -> None:
    kv, _ = MISTRAL_7B
    assert kv.bytes_per_token() == 8 * (128 + 128) * 2  # per layer, f16
    assert kv.bytes_per_sequence(4096) == 32 * 8 * 256 * 2 * 4096  # 512 MiB
    assert kv.bytes_per_sequence(4096, "q8_0") < kv.bytes_per_sequence(4096)


def test_six_gb_card_with_a_7b_q4_model_at_4k_gives_one() -> None:
    assert gpu(6, MISTRAL_7B) == 1


def test_a_7b_without_gqa_does_not_fit_at_4k_on_6gb_and_says_why() -> None:
    p = fit(MemoryBudget("gpu", 6 * GiB), ModelFootprint(LLAMA2_7B[1], LLAMA2_7B[0], 4096), 16)
    assert p.max_batch_size == 0
    assert "not even one sequence fits" in p.reason


@pytest.mark.parametrize("card, model, expected", [
    (8, LLAMA32_3B, 11),      # 3B on 8 GB: (7.6 - 1.88 - 0.75) GiB / 448 MiB
    (8, LLAMA31_8B, 4),
    (8, LLAMA31_70B, 0),
    (24, LLAMA32_3B, 16),     # capped
    (24, LLAMA31_8B, 16),
    (24, LLAMA31_70B, 0),
    (48, LLAMA31_8B, 16),
    (48, LLAMA31_70B, 4),
    (80, LLAMA31_70B, 16),
    (80, LLAMA32_3B, 16),
])
def test_realistic_cards(card: int, model, expected: int) -> None:
    assert gpu(card, model) == expected


def test_large_card_uses_the_cap() -> None:
    assert gpu(80, LLAMA31_8B, cap=64) == 64
    assert gpu(80, LLAMA31_8B, cap=200) < 200  # memory-bound below a huge cap


def test_two_gpus_pool_memory() -> None:
    assert gpu(48, LLAMA31_70B, count=2) > gpu(48, LLAMA31_70B)


def test_partial_offload_counts_only_offloaded_weights_and_kv() -> None:
    kv, size = LLAMA31_8B
    full = fit(MemoryBudget("gpu", 8 * GiB), ModelFootprint(size, kv, 4096), 64)
    half = fit(MemoryBudget("gpu", 8 * GiB), ModelFootprint(size, kv, 4096, gpu_layers=16), 64)
    assert half.max_batch_size > full.max_batch_size


def test_sliding_window_layers_hold_only_the_window() -> None:
    gemma = KVShape(n_layer=18, n_head_kv=1, key_length=256, value_length=256,
                    sliding_window=512, swa_pattern=6)
    full = KVShape(18, 1, 256, 256)
    assert gemma.bytes_per_sequence(4096) == 512 * 2 * (3 * 4096 + 15 * 512)
    assert gemma.bytes_per_sequence(4096) < full.bytes_per_sequence(4096) / 3
    assert gemma.bytes_per_sequence(256) == full.bytes_per_sequence(256)


def test_cpu_mode_uses_system_memory() -> None:
    kv, size = LLAMA32_3B
    p = fit(MemoryBudget("cpu", 16 * GiB), ModelFootprint(size, kv, 4096), 8)
    assert p.mode == "cpu" and p.max_batch_size == 8 and "RAM" in p.reason


# --- the pod's probe ----------------------------------------------------------------------


def pod_settings(**kw):
    from llamafleet.inference.settings import Settings

    return Settings(**{"max_batch_size": 16, "context_size": 4096, **kw})


MISTRAL_SHAPE = SimpleNamespace(architecture="llama", n_layer=32, n_head_kv=8, key_length=128,
                                value_length=128, sliding_window=None, size_bytes=4.37e9)


def gpu_pod_plan(settings, shape, nvml: FakeNVML):
    """As serving.build does it: probe, load the weights onto the card, plan."""
    gpus = capacity.probe_for_pod(settings, nvml=nvml, gpu_offload=True)
    nvml.load(shape.size_bytes)
    return capacity.plan_for_pod(settings, shape, gpus)


def test_probe_reads_visible_gpus_and_plans() -> None:
    nvml = FakeNVML([81559])
    p = gpu_pod_plan(pod_settings(), MISTRAL_SHAPE, nvml)
    assert p.mode == "gpu" and p.max_batch_size == 16
    assert "H100" in p.reason and nvml.shut


def test_probe_respects_cuda_visible_devices() -> None:
    info = capacity.probe_gpus(FakeNVML([6144, 81559]), visible="1")
    assert info.count == 1 and info.free_bytes == 81559 * MiB


def test_a_gpu_pod_plans_what_the_operator_planned_although_the_weights_are_loaded() -> None:
    # docs/architecture.md's example: a 7B Q4 on a 6 GB card at 4k gives 1 sequence. Once
    # the weights are on the card, its free memory lacks them: planned from that, the pod
    # subtracted them twice and refused the model (CapacityError).
    kv = KVShape(32, 8, 128, 128)
    operator = fit(MemoryBudget("gpu", 6144 * MiB), ModelFootprint(4.37e9, kv, 4096), 16)
    assert operator.max_batch_size == 1
    nvml = FakeNVML([6144])
    p = gpu_pod_plan(pod_settings(), MISTRAL_SHAPE, nvml)
    free = nvml.nvmlDeviceGetMemoryInfo(0)
    assert free.free < free.total - 4e9  # the fake shows the weights as loaded
    assert p.max_batch_size == operator.max_batch_size == 1
    assert "4168 MiB weights" in p.reason  # subtracted once


def test_nothing_fits_is_a_clear_error() -> None:
    with pytest.raises(CapacityError, match="does not fit.*CONTEXT_SIZE"):
        gpu_pod_plan(pod_settings(), MISTRAL_SHAPE, FakeNVML([4096]))


def test_gpu_layers_zero_means_cpu_even_with_a_gpu() -> None:
    nvml = FakeNVML([81559])
    s = pod_settings(gpu_layers=0)
    p = capacity.plan_for_pod(s, MISTRAL_SHAPE, capacity.probe_for_pod(s, nvml=nvml),
                              system_memory=8 * GiB)
    assert p.mode == "cpu" and p.max_batch_size == 5 and not nvml.shut  # NVML never asked


def test_a_build_without_gpu_offload_plans_from_ram_even_with_a_gpu() -> None:
    # A CPU build of llama.cpp on a GPU node keeps the KV cache in RAM: size it from RAM.
    nvml = FakeNVML([81559])
    s = pod_settings()
    gpus = capacity.probe_for_pod(s, nvml=nvml, gpu_offload=False)
    p = capacity.plan_for_pod(s, MISTRAL_SHAPE, gpus, system_memory=8 * GiB)
    assert p.mode == "cpu" and p.max_batch_size == 5 and not nvml.shut  # NVML never asked


def test_the_real_build_is_asked_whether_it_can_offload() -> None:
    import llama_cpp

    assert capacity.llama_supports_gpu_offload() is bool(llama_cpp.llama_supports_gpu_offload())


def test_no_nvml_means_cpu_mode_for_real(tmp_path) -> None:
    s = pod_settings(max_batch_size=4)
    p = capacity.plan_for_pod(s, MISTRAL_SHAPE, capacity.probe_for_pod(s))
    assert p.mode == "cpu"  # this machine has no GPU: the real probe finds none
    (tmp_path / "memory.max").write_text(str(6 * GiB))
    assert capacity.system_memory_bytes(cgroup_root=tmp_path) == 6 * GiB
    (tmp_path / "memory.max").write_text("max")
    assert capacity.system_memory_bytes(cgroup_root=tmp_path) > 6 * GiB


def test_swa_full_plans_the_sliding_layers_at_full_context() -> None:
    gemma = SimpleNamespace(architecture="gemma3", n_layer=48, n_head_kv=8, key_length=256,
                            value_length=256, sliding_window=1024, size_bytes=7e9)
    kw = dict(context_size=32768, max_batch_size=256)
    windowed = capacity.plan_for_pod(pod_settings(**kw), gemma, None, system_memory=64 * GiB)
    full = capacity.plan_for_pod(pod_settings(swa_full=True, **kw), gemma, None,
                                 system_memory=64 * GiB)
    assert full.per_sequence_mib > 4 * windowed.per_sequence_mib
    assert full.max_batch_size < windowed.max_batch_size



def test_memory_already_in_use_is_not_planned_on() -> None:
    kv, size = LLAMA31_8B
    model = ModelFootprint(size, kv, 4096)
    busy = fit(MemoryBudget("gpu", 24 * GiB, in_use_bytes=12 * GiB), model, 64)
    assert busy.max_batch_size == fit(MemoryBudget("gpu", 12 * GiB), model, 64).max_batch_size
    assert busy.max_batch_size < fit(MemoryBudget("gpu", 24 * GiB), model, 64).max_batch_size
    assert busy.memory_mib == 12 * 1024 and "(12288 MiB in use)" in busy.reason


def test_the_pod_measures_what_others_use_on_its_card_before_the_load() -> None:
    nvml = FakeNVML([81559, 81559])
    nvml.used[1] = 40960 * MiB  # another process on the second card: the fullest one counts
    gpus = capacity.probe_for_pod(pod_settings(), nvml=nvml, gpu_offload=True)
    assert (gpus.count, gpus.total_bytes, gpus.in_use_bytes) == (2, 81559 * MiB, 40960 * MiB)
    budget = capacity.pod_budget(pod_settings(memory_reserve_mib=1024), gpus)
    assert budget.free_bytes == 2 * (81559 - 40960) * MiB and budget.reserve_bytes == 1024 * MiB
    assert "2x81559 MiB GPU (40960 MiB in use)" in capacity.plan_for_pod(
        pod_settings(), MISTRAL_SHAPE, gpus).reason


def test_a_draft_model_is_planned_with_the_served_one() -> None:
    """Its weights and its KV cache per sequence come out of the same memory."""
    draft = SimpleNamespace(architecture="llama", n_layer=8, n_head_kv=4, key_length=64,
                            value_length=64, sliding_window=None, size_bytes=0.5e9)
    s = pod_settings(max_batch_size=64)
    alone = capacity.plan_for_pod(s, MISTRAL_SHAPE, None, system_memory=16 * GiB)
    both = capacity.plan_for_pod(s, MISTRAL_SHAPE, None, system_memory=16 * GiB,
                                 draft_shape=draft)
    # Mistral at 4096 tokens: 512 MiB a sequence; the draft adds 32 MiB and 477 MiB weights.
    assert alone.per_sequence_mib == 512 and both.per_sequence_mib == 544
    assert both.max_batch_size < alone.max_batch_size
    assert "with the draft model's" in both.reason
