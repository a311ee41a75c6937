"""The portable build (what the images ship) runs on x86-64 CPUs other than the build machine's.

QEMU's user-mode emulator runs the project's Python with the CPU model it is told to present:
CPUID reports that CPU's features, and an instruction it lacks raises SIGILL, as on real
hardware. The portable llama-cpp-python (scripts/build-llama-cpp-python.sh --portable) must pick
the ggml CPU module that fits each model and decode; the native build (-march=native on this
machine) must not survive an older CPU, which is why images never ship it.

The floor is AVX (Sandy Bridge, 2011): ggml itself goes down to any x86-64 (its x64 and sse42
modules), but numpy's wheel, which llama-cpp-python needs, stops with SIGILL on an SSE4.2-only
CPU (Westmere) under the same emulator.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import logging
import sys
from pathlib import Path
# llama.cpp's info lines (which CPU module it loaded) are forwarded at DEBUG: show them.
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from llamafleet.inference import llama_backend as lb
from llamafleet.inference.selftest import self_test
import llama_cpp
print("modules:", " ".join(lb.BACKEND_MODULES))
print("system info:", llama_cpp.llama_print_system_info().decode().strip())
m = lb.LlamaModel(Path(sys.argv[1]), gpu_layers=0)
b = lb.LlamaBackend(m, n_seq=1, context_size=128, n_batch=32, threads=2)
print("tokens:", list(self_test(b, m.tokenize("The sky is", add_bos=m.add_bos)).tokens))
"""


@pytest.fixture(scope="module")
def portable_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Cached: the Docker image test builds and uses the same wheel.
    wheel = subprocess.run([str(ROOT / "scripts/build-llama-cpp-python.sh"), "--portable"],
                           capture_output=True, text=True, check=True, timeout=2400).stdout.strip()
    site = tmp_path_factory.mktemp("portable")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), wheel], check=True)
    return site


def _run_as(cpu: str, model: Path, site: Path | None) -> subprocess.CompletedProcess:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 is not installed (scripts/system-deps.sh installs qemu-user)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    if site is not None:
        env["PYTHONPATH"] = str(site)  # ahead of the venv's native llama_cpp
    return subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c", PROBE, str(model)], env=env,
                          capture_output=True, text=True, timeout=600)


def _line(out: str, prefix: str) -> str:
    return next((line for line in out.splitlines() if line.startswith(prefix)), "")


# CPU model -> the ggml module it must get. QEMU's emulator has no AVX-512, so a Skylake
# server model presents AVX2 and gets the haswell module.
CPUS = {"SandyBridge": "libggml-cpu-sandybridge.so", "Haswell": "libggml-cpu-haswell.so",
        "Skylake-Server": "libggml-cpu-haswell.so"}


@pytest.mark.timeout(3000)
@pytest.mark.parametrize("cpu", list(CPUS))
def test_portable_build_picks_the_module_for_the_cpu_and_decodes(
        cpu: str, portable_site: Path, instruct_model_path: Path) -> None:
    r = _run_as(cpu, instruct_model_path, portable_site)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"loaded CPU backend from {portable_site}/llama_cpp/lib/{CPUS[cpu]}" in r.stderr, r.stderr[-2000:]
    info = _line(r.stdout, "system info:")
    assert "AVX = 1" in info and "AVX512 = 1" not in info and "AMX_INT8" not in info, info
    assert ("AVX2 = 1" in info) == (cpu != "SandyBridge"), info
    tokens = _line(r.stdout, "tokens:")
    assert tokens.count(",") == 3, r.stdout  # the start-up self-test decoded its 4 tokens


def test_native_build_does_not_run_on_an_older_cpu(instruct_model_path: Path) -> None:
    flags = Path("/proc/cpuinfo").read_text()
    if " avx2 " not in flags:
        pytest.skip("this machine has no AVX2, so its native build runs on Sandy Bridge too")
    r = _run_as("SandyBridge", instruct_model_path, None)
    assert r.returncode == -4 or r.returncode == 132 or "Illegal instruction" in r.stderr, (
        r.returncode, r.stderr[-2000:])
