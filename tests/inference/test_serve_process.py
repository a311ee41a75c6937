"""`llamafleet serve` as users and pods start it: a separate process that runs its start-up
self-test before `/ready`, then serves concurrent streams; and a model that cannot decode
makes it exit non-zero with a clear message instead of reporting ready.

A llama.cpp build that crashes on this machine's CPU (the AMX kernels on Sapphire Rapids
class Xeons, docs/llama-cpp.md) fails here as a dead process, not as a dead test runner."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.support.servers import serve_process as _serve
from tests.support.servers import serve_ready as _ready
from tests.support.servers import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_serve_self_tests_then_serves_four_concurrent_streams(model_path: Path) -> None:
    proc, port = _serve("--model-path", str(model_path), "--max-batch-size", "4",
                        "--context-size", "512")
    try:
        wait_until(lambda: _ready(proc, port), timeout=120)
        results: dict[int, tuple[int, bool]] = {}

        def stream(i: int) -> None:
            body = {"messages": [{"role": "user", "content": f"Count to {i + 3}"}],
                    "max_tokens": 24, "ignore_eos": True, "stream": True}
            deltas, done = 0, False
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                              json=body, timeout=120) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    done = done or line == "data: [DONE]"
                    deltas += line.startswith("data: {") and '"content"' in line
            results[i] = (deltas, done)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert sorted(results) == [0, 1, 2, 3]
        assert all(done and deltas >= 20 for deltas, done in results.values()), results
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "start-up self-test passed: 4 tokens" in out, out[-3000:]


def test_a_model_that_cannot_decode_never_reports_ready(tmp_path: Path) -> None:
    broken = tmp_path / "nan.gguf"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/make_random_gguf.py"), str(broken),
                    "--dim", "64", "--layers", "1", "--ff", "128", "--heads", "4",
                    "--kv-heads", "4", "--context", "256", "--fill", "nan"],
                   check=True, capture_output=True)
    proc, port = _serve("--model-path", str(broken), "--max-batch-size", "1",
                        "--context-size", "128")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out[-3000:]
    assert "start-up self-test" in out and "NaN or infinite" in out, out[-3000:]
    assert "start-up failed" in out
