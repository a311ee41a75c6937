"""STEP_PROFILE on a real server: llama.cpp decodes, the breakdown shows up in /info and
/metrics, and every part is measured on the real path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.support.servers import start_server

pytestmark = pytest.mark.integration


async def _stream(client: httpx.AsyncClient, url: str) -> int:
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 12, "stream": True, "ignore_eos": True}
    chunks = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            chunks += line.startswith("data: {")
    return chunks


def test_step_profile_breaks_down_real_steps(model_path: Path) -> None:
    srv = start_server(model_path=model_path, step_profile=True, max_batch_size=4)
    try:
        async def load() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                await asyncio.gather(*(_stream(client, srv.url) for _ in range(4)))

        asyncio.run(load())
        prof = httpx.get(f"{srv.url}/info", timeout=10).json()["step_profile"]
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
    finally:
        srv.stop()
    steps = prof["all_steps"]
    assert steps["steps"] >= 12  # at least one step per generated token
    parts = steps["parts_ms_per_step"]
    for part in ("batch", "decode", "sample", "text", "deliver", "admit"):
        assert parts[part] > 0, (part, parts)
    assert parts["decode"] == max(parts.values())  # on a CPU llama_decode dominates
    by_batch = prof["decode_steps_by_batch"]
    assert by_batch and all(1 <= int(b) <= 4 for b in by_batch)
    assert prof["thread_cpu_s"]["engine"] > 0 and "event_loop" in prof["thread_cpu_s"]
    assert 'llamafleet_engine_step_seconds_total{part="decode"}' in metrics


def test_without_step_profile_nothing_is_timed(server) -> None:
    from llamafleet.inference.llama_backend import LlamaBackend

    assert server.serving.profile is None and type(server.serving.engine.backend) is LlamaBackend
    assert "step_profile" not in httpx.get(f"{server.url}/info", timeout=10).json()
