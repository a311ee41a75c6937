"""A GPU pod starts with the batch width the operator planned for it (issue 23, item 16).

The pod is built as `llamafleet serve` builds it (serving.build, the real model and
engine); only NVML is faked, at the pod's boundary (tests/support/fake_nvml.py): a card whose free
memory drops once the weights are on it, as a real card's does. Planned from the free
memory after the load, the weights were subtracted twice and the pod refused a model that
the operator had planned for it.
"""

from __future__ import annotations

import math
import sys

import pytest
from llamafleet.common.capacity import MiB

from tests.support.fake_nvml import FakeNVML

pytestmark = pytest.mark.integration

CONTEXT = 1024


def test_a_gpu_pod_starts_with_the_batch_the_operator_planned(instruct_model_path,
                                                              monkeypatch) -> None:
    from llamafleet.inference import capacity, llama_backend, serving
    from llamafleet.inference.settings import Settings
    from llamafleet.operator.planning import MEMORY_LABEL, NodeGPU, plan_service, served_facts
    from llamafleet.operator.spec import parse_spec

    spec = parse_spec({"model": {"source": {"embedded": True}, "contextSize": CONTEXT},
                       "resources": {"gpus": 1}, "batching": {"maxBatchSize": 8}})
    facts = served_facts(spec)
    kv, size = facts.kv, facts.size
    # A card on which the operator plans 2 sequences, with room for half a third.
    card_mib = math.ceil((size + 768 * MiB + 2.5 * kv.bytes_per_sequence(CONTEXT)) / 0.95 / MiB)
    node = NodeGPU("gpu-node", {MEMORY_LABEL: str(card_mib)}, card_mib, 1, "Fake GPU")
    operator = plan_service(spec, [node])
    assert operator.max_batch_size == 2, operator.reason

    nvml = FakeNVML([card_mib], name="Fake GPU")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)  # what probe_gpus imports
    monkeypatch.setattr(capacity, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    class Offloaded(llama_backend.LlamaModel):
        """The real model; its weights also take their room on the fake card."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            nvml.load(self.shape.size_bytes)

    monkeypatch.setattr(llama_backend, "LlamaModel", Offloaded)
    settings = Settings(embedded_model_dir=instruct_model_path.parent, context_size=CONTEXT,
                        max_batch_size=8, threads=2, gpu_layers=-1, embeddings=False)
    pod = serving.build(settings)
    try:
        memory = nvml.nvmlDeviceGetMemoryInfo(0)
        assert memory.free < memory.total - 90 * MiB  # the weights are on the card
        assert pod.plan.mode == "gpu" and "Fake GPU" in pod.plan.reason
        assert pod.plan.max_batch_size == operator.max_batch_size, pod.plan.reason
        assert pod.engine.max_batch_size == operator.max_batch_size
    finally:
        pod.close()
