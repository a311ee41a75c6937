"""The repository's layout: the root folder operator/ never shadows the standard library;
the parts and what each may import (the dependency matrix); each command's import footprint."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


# The dependency matrix: the llamafleet parts (and llama.cpp, and the transports' libraries)
# that each part may import. `common` imports no other part and no transport; every other
# part imports only `common` (plus llama.cpp for the pod).
# A part is named by its import name (the standard library has an `operator` too).
PARTS = ("bench", "common", "inference", "operator", "router")
TRANSPORTS = {"grpc", "starlette", "fastapi"}
COMMON, INFERENCE, OPERATOR, ROUTER, BENCH = (f"llamafleet.{p}" for p in
                                              ("common", "inference", "operator", "router", "bench"))
ALLOWED: dict[str, set[str]] = {
    "common": {COMMON},
    "inference": {COMMON, INFERENCE, "llama_cpp", *TRANSPORTS},
    "router": {COMMON, ROUTER, *TRANSPORTS},
    "operator": {COMMON, OPERATOR, *TRANSPORTS},
    "bench": {COMMON, BENCH, *TRANSPORTS},
}
WATCHED = {f"llamafleet.{p}" for p in PARTS} | {"llama_cpp", *TRANSPORTS}  # what the matrix speaks of


def _modules(part: str) -> list[str]:
    """Every module of a part, by import name (generated protobuf stubs included)."""
    names = []
    for path in sorted((ROOT / part).rglob("*.py")):
        rel = path.relative_to(ROOT / part).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        names.append(".".join(["llamafleet", part, *parts]))
    return names


def imported(source: str, part: str) -> set[str]:
    """What a module of ``part`` imports, anywhere in it (functions too), named as the matrix
    names things: a llamafleet part (``llamafleet.<part>``), or the top-level name of any
    other package."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            out.add(f"llamafleet.{part}")  # relative: within its own part
            continue
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            out.add(".".join(name.split(".")[:2]) if name.startswith("llamafleet.")
                    else name.split(".")[0])
    return out


def violations(part: str, names: set[str]) -> set[str]:
    return (names & WATCHED) - ALLOWED[part]


@pytest.mark.parametrize("part", PARTS)
def test_each_part_imports_only_what_the_matrix_allows_statically(part: str) -> None:
    found = {}
    for path in sorted((ROOT / part).rglob("*.py")):
        if bad := violations(part, imported(path.read_text(), part)):
            found[str(path.relative_to(ROOT))] = sorted(bad)
    assert found == {}


def footprint(code: str) -> set[str]:
    """The parts, llama.cpp and transports that running ``code`` in a fresh interpreter
    leaves in sys.modules."""
    probe = (f"import json, sys\n{code}\n"
             "print(json.dumps(sorted({'.'.join(m.split('.')[:2]) for m in sys.modules})))")
    r = _run_from_root("-c", probe)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.splitlines()[-1])) & WATCHED


@pytest.mark.parametrize("part", PARTS)
def test_each_part_loads_only_what_the_matrix_allows_dynamically(part: str) -> None:
    modules = _modules(part)
    assert len(modules) >= 3, modules
    loaded = footprint("".join(f"import {m}\n" for m in modules))
    assert f"llamafleet.{part}" in loaded
    assert violations(part, loaded) == set()


def test_the_matrix_checks_can_fail() -> None:
    """Both checks catch an import across the matrix: the static one in source text, the
    dynamic one in what a fresh interpreter loaded."""
    assert violations("common", imported("import grpc\nfrom llamafleet.router import app", "common")) \
        == {"grpc", ROUTER}
    assert violations("operator", imported(
        "def f():\n    from llamafleet.inference.model import x\n", "operator")) == {INFERENCE}
    assert violations("inference", imported("from . import engine\nimport llama_cpp", "inference")) \
        == set()
    loaded = footprint("import llamafleet.operator.spec\nimport llamafleet.inference.settings")
    assert violations("operator", loaded) == {INFERENCE}


# Each command loads its own part and common, nothing else: its `--help` builds the same
# parser as a real run. `serve` loads llama.cpp first (cli.setup_serve says why).
@pytest.mark.parametrize(("argv", "parts"), [
    (["--help"], {COMMON}),
    (["serve", "--help"], {COMMON, INFERENCE, "llama_cpp"}),
    (["fetch", "--help"], {COMMON, INFERENCE}),
    (["bench", "--help"], {BENCH, COMMON}),
    (["router", "--help"], {COMMON, ROUTER}),
    (["operator", "--help"], {COMMON, OPERATOR}),
    (["operator", "--bogus"], {COMMON, OPERATOR}),
])
def test_each_command_loads_only_its_part_and_common(argv: list[str], parts: set[str]) -> None:
    code = ("from llamafleet.common.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n")
    assert footprint(code) - TRANSPORTS == parts


def test_serve_loads_llama_cpp_before_grpc_and_numpy() -> None:
    """llama.cpp's shared libraries go first (inference.main.init_backends says why): the
    dispatcher and the settings import neither grpc nor numpy before `serve` imports llama_cpp."""
    code = ("import sys\n"
            "order = []\n"
            "class Seen:\n"
            "    @staticmethod\n"
            "    def find_spec(name, path=None, target=None):\n"
            "        if name in ('llama_cpp', 'numpy', 'grpc') and name not in order:\n"
            "            order.append(name)\n"
            "sys.meta_path.insert(0, Seen)\n"
            "from llamafleet.common.cli import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(order))")
    r = _run_from_root("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].split()[:1] == ["llama_cpp"], r.stdout[-200:]


def test_tests_live_in_their_part_under_unique_names() -> None:
    # Tests are sorted by part, not by tier (the tier is the `integration` marker), and no two
    # test files share a name: the RBAC audit names its suites by file name (support/rbac_audit.py).
    parts = {"common", "inference", "operator", "router", "bench", "e2e"}
    files = sorted((ROOT / "tests").rglob("test_*.py"))
    assert {f.relative_to(ROOT / "tests").parts[0] for f in files} <= parts
    names = [f.name for f in files]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
