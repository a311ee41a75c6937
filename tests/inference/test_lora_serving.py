"""LoRA adapters served by a real `llamafleet serve` on real llama.cpp: the random llama and
random adapters for it (benchmarks/make_random_gguf.py, float32), against the same model with
an adapter merged into its weights."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import httpx
import pytest
from llamafleet.common.contract import MetricLabel, PodMetric
from prometheus_client.parser import text_string_to_metric_families

from tests.support.random_gguf import generator
from tests.support.servers import start_server, wait_until

pytestmark = pytest.mark.integration

SHAPE = dict(dim=64, layers=2, ff=128, heads=4, kv_heads=4, context=512)
KEY = "lora-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Greedy tokens must match exactly; the top logprobs of base + adapter and of the merged model
# differ only by float32 rounding (B·A added after the matmul vs folded into W): 1e-3 in
# natural log units is far above it (6e-6 measured) and far below a change of token.
LOGPROB_TOLERANCE = 1e-3
PROMPTS = ["The cat sat on", "Hello there, how", "Once upon a time", "1, 2, 3, 4,",
           "Kubernetes pods", "llama.cpp adapters"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora")
    gen = generator()
    one = gen.write_lora_set(folder, **SHAPE, lora_seed=1, scale=0.5)
    two = gen.write_lora_set(folder, **SHAPE, lora_seed=2)
    return {"base": one["base"], "one": one["lora"], "merged-one": one["merged"],
            "two": two["lora"]}


@pytest.fixture(scope="module")
def server(models):
    srv = start_server(model_path=models["base"], model_name="base", api_key=KEY,
                       max_batch_size=6, context_size=256, embeddings=False,
                       lora_adapters=(f"one={models['one']}:0.5",), prompt_cache_mib=16)
    yield srv
    srv.stop()


def _complete(url: str, prompt: str, model: str, n: int = 24, logprobs: int | None = None) -> dict:
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
        "ignore_eos": True, **({"logprobs": logprobs} if logprobs is not None else {})})
    assert r.status_code == 200, r.text
    return r.json()


def test_base_plus_adapter_gives_the_merged_models_tokens(server, models) -> None:
    merged = start_server(model_path=models["merged-one"], model_name="merged", max_batch_size=1,
                          context_size=256, embeddings=False)
    try:
        for prompt in PROMPTS[:3]:
            got = _complete(server.url, prompt, "one", logprobs=5)["choices"][0]
            want = _complete(merged.url, prompt, "merged", logprobs=5)["choices"][0]
            base = _complete(server.url, prompt, "base")["choices"][0]
            assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
            assert got["text"] != base["text"]  # the adapter does change the text
            for g, w in zip(got["logprobs"]["top_logprobs"], want["logprobs"]["top_logprobs"],
                            strict=True):
                assert g.keys() == w.keys()
                assert all(abs(g[t] - w[t]) <= LOGPROB_TOLERANCE for t in g), (g, w)
    finally:
        merged.stop()


def test_models_lists_adapters_with_their_parent_and_unknown_names_are_404(server, models) -> None:
    r = httpx.get(f"{server.url}/v1/models", headers=AUTH)
    cards = {m["id"]: m for m in r.json()["data"]}
    assert "parent" not in cards["base"] and cards["one"]["parent"] == "base"
    # An adapter's card says which file and scale it runs (the operator compares them).
    assert cards["one"]["root"] == str(models["one"]) and cards["one"]["scale"] == 0.5
    assert "root" not in cards["base"] and "scale" not in cards["base"]
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH,
                   json={"model": "nope", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    # The response names the model that served it.
    assert _complete(server.url, "hi", "one", n=2)["model"] == "one"


def test_a_mixed_run_at_concurrency_6_gives_each_request_its_output_alone(server, models) -> None:
    _load(server, "two", models["two"])
    try:
        jobs = [(p, m) for p, m in zip(PROMPTS, ["base", "one", "two"] * 2, strict=True)]
        alone = {job: _complete(server.url, *job)["choices"][0]["text"] for job in jobs}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            mixed = dict(zip(jobs, pool.map(lambda j: _complete(server.url, *j), jobs),
                             strict=True))
        for job in jobs:
            assert mixed[job]["choices"][0]["text"] == alone[job], job
        assert server.serving.engine.adapter_switches > 0
    finally:
        _unload(server, "two")


def test_an_adapter_loaded_at_run_time_serves_without_a_restart(server, models) -> None:
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH,
                   json={"model": "two", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404
    card = _load(server, "two", models["two"])
    assert card["id"] == "two" and card["parent"] == "base" and card["scale"] == 1.0
    # The GIE LoRA gauge counts it at once, and names it while a request for it waits: the
    # engine thread is held between two steps (Engine.call), so the request stays queued.
    assert _lora_gauge(server) == ("", "", "2")
    hold = threading.Event()
    server.serving.engine.call(lambda: hold.wait(30))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            waiting = pool.submit(_complete, server.url, PROMPTS[1], "two")
            wait_until(lambda: _lora_gauge(server) == ("", "two", "2"))
        finally:
            hold.set()
        assert waiting.result()["model"] == "two"
    wait_until(lambda: _lora_gauge(server) == ("", "", "2"))
    first = _complete(server.url, PROMPTS[0], "two")
    second = _complete(server.url, PROMPTS[0], "two")
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["text"] != _complete(server.url, PROMPTS[0], "base")["choices"][0]["text"]
    # Loading it again under the same name is a conflict; a file that is not a LoRA for this
    # model is a 400 that says why; both leave the pod serving.
    r = httpx.post(f"{server.url}/v1/adapters", headers=AUTH,
                   json={"name": "two", "path": str(models["two"])})
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    r = httpx.post(f"{server.url}/v1/adapters", headers=AUTH,
                   json={"name": "three", "path": str(models["merged-one"])})
    assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
    assert "adapter" in r.json()["error"]["message"]
    _unload(server, "two")
    r = httpx.post(f"{server.url}/v1/completions", headers=AUTH,
                   json={"model": "two", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404
    assert _complete(server.url, PROMPTS[0], "one", n=2)["model"] == "one"


def test_adapter_routes_need_the_key(server, models) -> None:
    r = httpx.post(f"{server.url}/v1/adapters", json={"name": "two", "path": str(models["two"])})
    assert r.status_code == 401


def _lora_gauge(server) -> tuple[str, str, str]:
    """The labels of the pod's one LoRA gauge series: (running, waiting, max_lora)."""
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    (family,) = [f for f in text_string_to_metric_families(text)
                 if f.name == PodMetric.LORA_REQUESTS_INFO]
    (series,) = family.samples
    return tuple(series.labels[k] for k in (MetricLabel.RUNNING_LORA_ADAPTERS,
                                             MetricLabel.WAITING_LORA_ADAPTERS,
                                             MetricLabel.MAX_LORA))


def _load(server, name: str, path: Path) -> dict:
    r = httpx.post(f"{server.url}/v1/adapters", headers=AUTH, timeout=60,
                   json={"name": name, "path": str(path)})
    assert r.status_code == 201, r.text
    return r.json()


def _unload(server, name: str) -> None:
    r = httpx.delete(f"{server.url}/v1/adapters/{name}", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
