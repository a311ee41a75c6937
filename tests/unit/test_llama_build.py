"""The installed llama-cpp-python is the pinned version built with today's patches/llama.cpp."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from llamafleet.inference.model import llama_cpp_python_version

ROOT = Path(__file__).resolve().parents[2]


def test_installed_llama_cpp_python_carries_the_current_patches() -> None:
    pin = re.search(r'"llama-cpp-python==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    patches = sorted((ROOT / "patches" / "llama.cpp").glob("*.patch"))
    assert patches, "no llama.cpp patches found"
    # The same identity scripts/build-llama-cpp-python.sh gives the wheel.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in patches)
                            + os.environ.get("CMAKE_ARGS", "").encode()).hexdigest()[:8]
    assert llama_cpp_python_version() == f"{pin}+llamafleet.{digest}", (
        "run scripts/setup.sh: the installed llama-cpp-python is not built from the current "
        "patches/llama.cpp")
