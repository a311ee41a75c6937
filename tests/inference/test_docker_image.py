"""The server image: built from a locally made base, run on the host network, answers
/ready and a chat completion; the same through docker-compose. Skipped (with the reason)
only where no Docker engine can start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[2]


# A cold machine compiles the portable llama-cpp-python wheel (ggml's CPU code once per
# variant, about 10 minutes on 2 cores) and the local base image before the image itself.
@pytest.mark.timeout(3000)
def test_image_builds_and_serves() -> None:
    r = subprocess.run([str(ROOT / "scripts/docker-smoke.sh")], capture_output=True, text=True,
                       timeout=2900)
    if r.returncode == 3:
        pytest.skip(f"no Docker engine can start here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "container: ok" in r.stdout
    assert "chat ok" in r.stdout
    # A portable image: ggml's CPU code as per-variant modules, the best one for this CPU
    # loaded at start-up, so the features llama.cpp reports are this machine's.
    modules = next(line for line in r.stdout.splitlines() if line.startswith("cpu modules:"))
    assert "libggml-cpu-x64.so" in modules and "libggml-cpu-haswell.so" in modules, modules
    assert "sapphirerapids" not in modules  # no AMX kernels (docs/llama-cpp.md)
    info = next(line for line in r.stdout.splitlines() if line.startswith("system info:"))
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split())
    for flag, feature in (("avx2", "AVX2"), ("avx512f", "AVX512")):
        assert (f"{feature} = 1" in info) == (flag in flags), (feature, info)
    assert "AMX_INT8 = 1" not in info
    print(r.stdout)
