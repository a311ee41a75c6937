#!/usr/bin/env bash
# Run here, before a GPU check: puts what benchmarks/gpu/*.sh need and the GPU machine lacks
# into two git-ignored folders that the device tool carries (carry: [".devcache", ".whl"]).
#   .devcache/llama_cpp_python-<pin>.tar.gz  the pinned sdist, slimmed to fit the 64 MiB the
#                                            tool carries (no .git, no llama.cpp models/docs/media)
#   .whl/                                    wheels of the serving stack for CPython 3.12 (that
#                                            machine lacks fastapi, pydantic, uvicorn, ...; it has
#                                            numpy, jinja2, prometheus-client, scikit-build-core;
#                                            benchmarks/gpu/check_wheels.sh tries them)
# Both come from PyPI through pip. About 33 MiB together.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
mkdir -p .devcache .whl
slim=.devcache/llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$slim" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
  mkdir "$work/src"
  tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work/src"
  d="$work/src/llama_cpp_python-$VERSION"
  rm -rf "$d/.git" "$d/vendor/llama.cpp/.git" "$d/vendor/llama.cpp/models" \
         "$d/vendor/llama.cpp/docs" "$d/vendor/llama.cpp/media"
  tar czf "$slim" -C "$work/src" "llama_cpp_python-$VERSION"
fi
# The serving stack with its dependencies, resolved together (pydantic pins pydantic-core).
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "fastapi>=0.115" "uvicorn[standard]>=0.30" "pydantic>=2.7" "pydantic-settings>=2.3" \
  "grpcio-health-checking>=1.85,<2" "grpcio-reflection>=1.85,<2" "httpx>=0.27" "aiohttp>=3.9" "pyyaml>=6" diskcache
du -sh .devcache .whl
