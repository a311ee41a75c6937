"""The repository's layout: the root folder operator/ never shadows the standard library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_from_root(*args: str) -> subprocess.CompletedProcess:
    # No -I: the current directory (the repository root) is on sys.path, as it is for a user
    # who runs `.venv/bin/python -m pip install -e .` there.
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_pip_and_the_standard_library_work_from_the_repository_root() -> None:
    r = _run_from_root("-m", "pip", "--version")
    assert r.returncode == 0 and r.stdout.startswith("pip "), r.stderr
    r = _run_from_root("-c", "import collections, operator; print(operator.eq(1, 1))")
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_the_operator_folder_is_a_namespace_portion_mapped_to_llamafleet_operator() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    r = _run_from_root("-c", "import llamafleet.operator.builders as b; print(b.__file__)")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT / "operator" / "builders.py"


def test_llamafleet_common_never_loads_llama_cpp() -> None:
    modules = sorted(p.stem for p in (ROOT / "common").glob("*.py"))
    assert {"capacity", "contract", "errors", "logs", "protocol", "sampling"} <= set(modules)
    code = ("import sys\n" + "".join(f"import llamafleet.common.{m}\n" for m in modules)
            + "print('llama_cpp' in sys.modules)")
    r = _run_from_root("-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_llamafleet_router_never_loads_llama_cpp_nor_the_pod() -> None:
    modules = sorted(p.stem for p in (ROOT / "router").glob("*.py") if p.stem != "__init__")
    assert {"affinity", "app", "backends", "main", "metrics", "settings"} <= set(modules)
    code = ("import sys\n" + "".join(f"import llamafleet.router.{m}\n" for m in modules)
            + "print(sorted(m for m in sys.modules if m == 'llama_cpp' "
              "or m.startswith('llamafleet.inference')))")
    r = _run_from_root("-c", code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
