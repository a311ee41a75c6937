"""Tenants in a real `llamafleet serve` process (the embedded chat model) without a router:
a tokens-per-minute budget is enforced within one request's tokens with an honest
Retry-After, a key rotated by rewriting the file works within seconds (the old one stops),
and a malformed file stops start-up with a clear message."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support.servers import serve_process, serve_ready, wait_until

pytestmark = pytest.mark.integration

TENANTS = """
keys:
  - {key: sk-old, tenant: team-a, limits: {tokensPerMinute: 200}}
"""


def chat(port: int, key: str, max_tokens: int = 16) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                      headers={"authorization": f"Bearer {key}"},
                      json={"messages": [{"role": "user", "content": "Count to ten."}],
                            "max_tokens": max_tokens, "ignore_eos": True})


def test_a_pod_alone_enforces_tokens_per_minute_and_reloads_rotated_keys(
        tmp_path: Path, instruct_model_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    proc, port = serve_process("--model-path", str(instruct_model_path), "--max-batch-size", "2",
                               "--context-size", "512", "--api-key", "pod-key",
                               "--tenants-file", str(path))
    try:
        wait_until(lambda: serve_ready(proc, port), timeout=180)
        assert chat(port, "sk-nope").status_code == 401
        served, one = 0, 0
        t0 = time.monotonic()
        for _ in range(30):
            r = chat(port, "sk-old")
            if r.status_code == 429:
                break
            assert r.status_code == 200, r.text
            one = r.json()["usage"]["total_tokens"]
            served += one
        else:
            raise AssertionError("never limited")
        # Admitted while the budget was not in debt: at most one request's tokens beyond it
        # (plus what refilled meanwhile, 200 a minute).
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        refilled = 200 * (time.monotonic() - t0) / 60
        assert 200 <= served <= 200 + one + refilled
        retry = int(r.headers["retry-after"])
        assert 1 <= retry <= 60 * one / 200 + 1
        # Rotation: a rewritten file applies within seconds, the old key stops.
        path.write_text(TENANTS.replace("sk-old", "sk-new").replace("200", "100000"))
        wait_until(lambda: chat(port, "sk-new", 1).status_code == 200
                   and chat(port, "sk-old", 1).status_code == 401, timeout=15)
        assert chat(port, "pod-key", 1).status_code == 200  # the pod's own key still works
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "sk-old" not in out and "sk-new" not in out


def test_a_malformed_file_stops_start_up_naming_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("keys: [{key: sk-secret, tenant: a, limits: {concurrentRequests: -2}}]")
    proc, _ = serve_process("--tenants-file", str(path))
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    assert "keys[0] (tenant a).limits.concurrentRequests: must be >= 1" in out
    assert "sk-secret" not in out
