"""benchmarks/make_random_gguf.py as a module: random-weight GGUFs (and LoRA adapters for
them) of exact shapes, for tests that need a real model file of a given shape. It is a
script in benchmarks/, not a package module, so it is loaded from its path."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "make_random_gguf.py"


@functools.cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_random_gguf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
