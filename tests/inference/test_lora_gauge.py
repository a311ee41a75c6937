"""The pod's LoRA gauge (the Gateway API Inference Extension's ``lora_requests_info``) on its
/metrics, over the scripted pod (the real Serving, Engine and app; no llama.cpp)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from llamafleet.common.contract import MetricLabel, PodMetric
from prometheus_client.parser import text_string_to_metric_families

from tests.support.scripted import ScriptedPod
from tests.support.servers import wait_until

LABELS = (MetricLabel.RUNNING_LORA_ADAPTERS, MetricLabel.WAITING_LORA_ADAPTERS,
          MetricLabel.MAX_LORA)


@pytest.fixture
def pod(tmp_path: Path):
    p = ScriptedPod(["a", "b"])
    for name in ("one", "two"):
        (tmp_path / f"{name}.gguf").write_bytes(b"lora")
    yield p
    p.close()


async def _gauge(h: httpx.AsyncClient) -> tuple[tuple[str, str, str], float]:
    """(running, waiting, max_lora) and the value of the one series on /metrics."""
    text = (await h.get("/metrics")).text
    (family,) = [f for f in text_string_to_metric_families(text)
                 if f.name == PodMetric.LORA_REQUESTS_INFO]
    assert family.type == "gauge"
    (sample,) = family.samples  # one series: a picker takes the latest, and it is this one
    return tuple(sample.labels[k] for k in LABELS), sample.value


async def _complete(h: httpx.AsyncClient, model: str) -> httpx.Response:
    return await h.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})


async def test_the_gauge_names_running_and_waiting_adapters_and_counts_the_loaded(
        pod: ScriptedPod, tmp_path: Path) -> None:
    async with pod.client() as h:
        before = time.time()
        assert (await _gauge(h))[0] == ("", "", "0")  # always exported, also without adapters
        for name in ("one", "two"):
            pod.serving.adapters.load(name, tmp_path / f"{name}.gguf")
        labels, loaded_at = await _gauge(h)
        assert labels == ("", "", "2") and before <= loaded_at <= time.time()
        assert (await _gauge(h))[1] == loaded_at  # unchanged labels keep their time

        # The engine thread stops in the first piece of "one"'s answer: "one" runs, and a
        # request for "two" (and one for the base model) waits behind it in the queue.
        gate = pod.backend.hold(0)
        first = asyncio.create_task(_complete(h, "one"))
        await wait_until(lambda: _labels_are(h, ("one", "", "2")))
        queued = [asyncio.create_task(_complete(h, m)) for m in ("two", "scripted")]
        await wait_until(lambda: _labels_are(h, ("one", "two", "2")))
        gate.set()
        answers = await asyncio.gather(first, *queued)
        assert [r.status_code for r in answers] == [200] * 3
        assert [r.json()["model"] for r in answers] == ["one", "two", "scripted"]
        await wait_until(lambda: _labels_are(h, ("", "", "2")))

        pod.serving.adapters.unload("two")
        assert (await _gauge(h))[0] == ("", "", "1")


async def _labels_are(h: httpx.AsyncClient, want: tuple[str, str, str]) -> bool:
    return (await _gauge(h))[0] == want
