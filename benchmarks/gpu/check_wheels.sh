#!/usr/bin/env bash
# Run here after benchmarks/gpu/prepare.sh, before spending device time: do the wheels in .whl
# give CPython 3.12 everything the GPU scripts import? It makes a bare 3.12 virtual environment
# with only what that machine has of its own (numpy, jinja2, prometheus-client, nvidia-ml-py),
# installs .whl as run_on_gpu.sh and side_by_side.sh do (--no-index --no-deps --target), and
# imports every third-party module that llamafleet's pod and bench import, then the parts of
# llamafleet that need no llama.cpp. A missing wheel fails here in a minute instead of on the
# GPU machine after its build.
#
#   bash benchmarks/gpu/check_wheels.sh        # exit 0: nothing missing
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY312=
for c in "${PY312_PATH:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if [ -n "$c" ] && "$c" -V >/dev/null 2>&1; then PY312=$c; break; fi
done
if [ -z "$PY312" ]; then
  echo "check_wheels: no python3.12 here (the GPU machine's Python); set PY312_PATH" >&2
  exit 2
fi
[ -d .whl ] || { echo "check_wheels: no .whl: run benchmarks/gpu/prepare.sh first" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY312" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q numpy jinja2 prometheus-client nvidia-ml-py
"$work/venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --target "$work/site" .whl/*.whl
# The project from a copy of this tree (setuptools writes build/ beside the sources).
mkdir "$work/src"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/src" 2>/dev/null || true
"$work/venv/bin/python" -m pip install -q --no-deps --target "$work/pkg" "$work/src"
PYTHONPATH="$work/site:$work/pkg" "$work/venv/bin/python" - <<'EOF'
import importlib
import sys

# Third-party modules that inference/, common/ and bench/ import (grpc_tools: generating the
# stubs, a development step; llama_cpp: built on the GPU machine from .devcache), and the
# optional ones the pod uses when present (uvloop, httptools: uvicorn[standard] as deployed).
third_party = ["aiohttp", "fastapi", "grpc", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection",
               "h11", "httptools", "httpx", "jinja2", "numpy", "opentelemetry.propagate",
               "opentelemetry.trace", "prometheus_client", "pydantic", "pydantic_settings",
               "pynvml", "starlette", "uvicorn", "uvloop", "yaml", "google.protobuf"]
ours = ["llamafleet.bench.load", "llamafleet.common.tracing", "llamafleet.common.tenants",
        "llamafleet.common.http_limits", "llamafleet.common.protocol"]
missing = []
for name in third_party + ours:
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(f"{name}: {e}")
if missing:
    print("check_wheels: missing on the GPU machine:\n  " + "\n  ".join(missing))
    sys.exit(1)
print(f"check_wheels: all {len(third_party) + len(ours)} imports resolve on CPython "
      f"{sys.version.split()[0]} with .whl")
EOF
