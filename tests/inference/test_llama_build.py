"""The installed llama-cpp-python is the pinned version built with today's patches/llama.cpp and
compiler flags, and without llama.cpp's AMX kernels."""

from __future__ import annotations

import subprocess
from pathlib import Path

import llama_cpp
from llamafleet.common.versions import llama_cpp_python_version

ROOT = Path(__file__).resolve().parents[2]


def test_installed_llama_cpp_python_carries_the_current_patches() -> None:
    # The identity scripts/build-llama-cpp-python.sh gives the wheel: version, patches, flags.
    label = subprocess.run([str(ROOT / "scripts/build-llama-cpp-python.sh"), "--label"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert llama_cpp_python_version() == label, (
        "run scripts/setup.sh: the installed llama-cpp-python is not built from the current "
        "patches/llama.cpp and scripts/llama-cpp-env.sh")


def test_build_leaves_out_the_amx_kernels() -> None:
    # ggml reports AMX_INT8 = 1 only when its AMX kernels are compiled in; on a Sapphire Rapids
    # class CPU a GGML_NATIVE build without scripts/llama-cpp-env.sh has them, and they crash
    # the first decode there (docs/llama-cpp.md).
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info, info
