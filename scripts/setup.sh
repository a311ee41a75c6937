#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with llamafleet and its test tools.
# llama-cpp-python compiles from source the first time (about 5 minutes on 2 cores);
# pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
