"""The OpenAI surface on the real model, judged by the official `openai` client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from llamafleet.common.contract import SYSTEM_FINGERPRINT, VERSION

from tests.support.servers import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture()
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client: openai.OpenAI, server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.serving.model_id]
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_info_reports_capacity_plan_and_llama_cpp_build(server) -> None:
    info = httpx.get(server.url + "/info").json()
    assert info["max_batch_size"] == 4
    plan = info["capacity"]
    assert plan["mode"] == "cpu" and plan["max_batch_size"] == 4, plan
    assert "capped at 4" in plan["reason"], plan
    # Built by scripts/build-llama-cpp-python.sh: the local version label names the patches.
    assert "+llamafleet." in info["llama_cpp_python"], info["llama_cpp_python"]


def test_chat_non_streaming(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == model
    assert r.system_fingerprint == SYSTEM_FINGERPRINT == f"fp_llamafleet_{VERSION.replace('.', '_')}"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_usage(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=16, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert text
    assert len({c.id for c in chunks}) == 1


def test_completions(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                  temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.usage.completion_tokens <= 8
    stream = client.completions.create(model=model, prompt="One, two, three,", max_tokens=6,
                                       stream=True, temperature=0)
    streamed = "".join(c.choices[0].text for c in stream)
    assert streamed


def test_stop_string_is_never_streamed(client: openai.OpenAI, model: str) -> None:
    # The base model echoes its prompt, so "capital" is certain to come back.
    kwargs = dict(model=model, messages=[{"role": "user", "content": "The capital of Spain?"}],
                  max_tokens=40, temperature=0)
    free = client.chat.completions.create(**kwargs).choices[0].message.content
    assert "capital" in free
    r = client.chat.completions.create(**kwargs, stop=["capital"])
    assert r.choices[0].finish_reason == "stop"
    assert "capital" not in r.choices[0].message.content
    assert free.startswith(r.choices[0].message.content)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **kwargs, stop=["capital"], stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_seed_reproduces_a_request_alone(client: openai.OpenAI, model: str) -> None:
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Write a poem."}],
                  max_tokens=24, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    c = client.chat.completions.create(**{**kwargs, "seed": 99}).choices[0].message.content
    assert a == b
    assert a != c


def test_concurrent_streams_all_complete_and_never_mix(server, model: str) -> None:
    words = ["ZEBRA", "KIWI", "TULIP", "OSLO"]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

    async def one(word: str) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Repeat: {word} {word} {word}"}],
            max_tokens=32, temperature=0, stream=True)
        parts, finish = [], None
        async for c in stream:
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main() -> list[tuple[str, str | None]]:
        return await asyncio.gather(*(one(w) for w in words))

    results = asyncio.run(main())
    for word, (text, finish) in zip(words, results, strict=True):
        assert finish in ("stop", "length"), text
        others = [w for w in words if w != word]
        assert not any(o in text for o in others), (word, text)
    # the model echoes its prompt (greedy: the likeliest text, whatever the batch shape did
    # to the low bits of the logits): each stream carries its own word
    # (At least two, so that the never-mix check above is not vacuous: a 135M model does not
    # echo every time, and which batch shapes a run gets depends on timing.)
    echoed = sum(word in text for word, (text, _) in zip(words, results, strict=True))
    assert echoed >= 2, results


def test_json_schema_output_is_valid(client: openai.OpenAI, model: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 2+2? Answer in JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content)["answer"], int)


def test_json_object_output_is_json(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object."}],
        max_tokens=300, temperature=0, response_format={"type": "json_object"},
        extra_body={"repeat_penalty": 1.3})
    content = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), (dict, list))
    else:  # cut by max_tokens: still a JSON prefix
        assert content.lstrip()[:1] in ("{", "[")


def test_client_disconnect_frees_the_sequence(server, model: str) -> None:
    m = server.serving.metrics
    before = m.requests.labels("http_chat", "cancelled", "cancelled")._value.get()
    body = {"model": model, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
    # The engine frees the sequence at its next step; wait for the cancellation record.
    wait_until(lambda: m.requests.labels("http_chat", "cancelled", "cancelled")._value.get() > before)
    wait_until(lambda: server.serving.engine.running == 0)
    # and the server still answers
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200


def test_shared_prompt_prefix_is_reused(client: openai.OpenAI, model: str, server) -> None:
    system = "You are the ship's computer. " * 20
    engine = server.serving.engine
    kwargs = dict(model=model, max_tokens=8, temperature=0.5)
    first = client.chat.completions.create(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Status?"}],
        **kwargs)
    before = engine.prefix_tokens_reused
    second = client.chat.completions.create(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Course?"}],
        **kwargs)
    assert engine.prefix_tokens_reused - before >= 100  # the system prompt was not decoded again
    assert second.usage.prompt_tokens > 100 and second.choices[0].message.content
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


def test_inference_extension_gauges_follow_the_load(server, model: str) -> None:
    """The model-server protocol gauges an llm-d endpoint picker reads: waiting, running
    and KV-cache utilisation (0..1), from /metrics; running falls back to 0 once idle."""
    from prometheus_client.parser import text_string_to_metric_families

    def gauges() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name in {"llamafleet_queue_depth", "llamafleet_running_sequences",
                              "llamafleet_kv_cache_utilization"}}

    body = {"model": model, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", server.url + "/v1/chat/completions",
                                                 json=body) as r:
        lines = r.iter_lines()
        next(lines)
        busy = wait_until(lambda: (g := gauges())["llamafleet_running_sequences"] == 1 and g)
        assert 0 < busy["llamafleet_kv_cache_utilization"] <= 1
        assert busy["llamafleet_queue_depth"] == 0
    wait_until(lambda: gauges()["llamafleet_running_sequences"] == 0)


# llm-d-router's built-in `vllm` engine config (pkg/epp/framework/plugins/datalayer/extractor/
# metrics/factories.go, defaultEngineConfigs): what the picker reads from a pod that has no
# llm-d.ai/engine-type label. Our pods carry the label, and our engine config
# (examples/llm-d/endpoint-picker-config.yaml) maps each of these to our own series or, for the
# ones llamafleet has no counterpart of, to "" (the picker then skips them).
LLM_D_VLLM_DEFAULTS = {"queuedRequestsSpec": "vllm:num_requests_waiting",
                       "runningRequestsSpec": "vllm:num_requests_running",
                       "kvUsageSpec": "vllm:kv_cache_usage_perc",
                       "loraSpec": "vllm:lora_requests_info",
                       "cacheInfoSpec": "vllm:cache_config_info"}


def metric_spec(spec: str) -> tuple[str, dict[str, str]]:
    """llm-d's metric spec string, `name` or `name{label=value,...}` (its spec.go)."""
    name, _, rest = spec.partition("{")
    labels = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if p) if rest else {}
    return name.strip(), {k.strip(): v.strip().strip('"') for k, v in labels.items()}


async def test_llm_d_engine_config_reads_our_metrics_under_load(server, model: str) -> None:
    """The `llamafleet` engine config that we ship for llm-d's endpoint picker, held to a
    loaded pod's /metrics: each spec it sets names exactly one series, with the kind of value
    the picker stores (WaitingQueueSize and RunningRequestsSize: whole numbers;
    KVCacheUsagePercent: a fraction 0..1), and the series follow the load (4 running in the
    batch of 4, a fifth request waiting)."""
    from llamafleet.common.contract import ENGINE_TYPE, ENGINE_TYPE_LABEL
    from prometheus_client.parser import text_string_to_metric_families

    root = Path(__file__).resolve().parents[2]
    epp = yaml.safe_load((root / "examples/llm-d/endpoint-picker-config.yaml").read_text())
    (extractor,) = [p for p in epp["plugins"] if p["type"] == "core-metrics-extractor"]
    params = extractor["parameters"]
    assert params["engineLabelKey"] == ENGINE_TYPE_LABEL
    (engine,) = [e for e in params["engineConfigs"] if e["name"] == ENGINE_TYPE]
    assert set(LLM_D_VLLM_DEFAULTS) <= set(engine)  # every default is mapped or turned off
    specs = {k: metric_spec(v) for k, v in engine.items() if k.endswith("Spec") and v}
    lora_name, _ = specs.pop("loraSpec")
    assert set(specs) == {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"}

    async def read(h: httpx.AsyncClient) -> dict[str, float]:
        text = (await h.get(server.url + "/metrics")).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        out = {}
        for key, (name, labels) in specs.items():
            # The picker looks the family up by name and reads only gauges and counters
            # (spec.go: extractFamily, extractValue).
            family = families.get(name)
            assert family is not None and family.type in ("gauge", "counter"), (key, name, family)
            found = [s for s in family.samples if s.name == name
                     and all(s.labels.get(k) == v for k, v in labels.items())]
            assert len(found) == 1, f"{key} {name}{labels}: {len(found)} series on /metrics"
            out[key] = found[0].value
        return out

    body = {"model": model, "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 900, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120) as h:
        # loraSpec: a gauge whose latest series (by value: a timestamp) carries the protocol's
        # labels (loraspec.go, getLatestMetric; extractor.go, populateLoRAMetrics).
        text = (await h.get(server.url + "/metrics")).text
        (lora,) = [f for f in text_string_to_metric_families(text) if f.name == lora_name]
        (series,) = lora.samples
        assert lora.type == "gauge" and series.value > 0
        assert series.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "",
                                 "max_lora": "0"}
        idle = await read(h)
        assert idle == {"queuedRequestsSpec": 0, "runningRequestsSpec": 0, "kvUsageSpec": 0}

        async def stream() -> None:
            async with h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    pass

        tasks = [asyncio.create_task(stream()) for _ in range(5)]
        try:
            busy = await wait_until(lambda: _loaded(read(h)), timeout=120)
            assert busy["runningRequestsSpec"] == 4 and busy["queuedRequestsSpec"] == 1
            assert 0 < busy["kvUsageSpec"] <= 1
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await wait_until(lambda: _idle(read(h)), timeout=60)


async def _loaded(reading) -> dict[str, float] | None:
    values = await reading
    return values if values["runningRequestsSpec"] == 4 and values["queuedRequestsSpec"] == 1 else None


async def _idle(reading) -> bool:
    values = await reading
    return values["runningRequestsSpec"] == 0 and values["queuedRequestsSpec"] == 0
