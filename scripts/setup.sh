#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with llamafleet and its test tools.
# llama-cpp-python compiles from source the first time (about 5 minutes on 2 cores);
# pip caches the wheel afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# -I everywhere: the repository root holds a folder named operator/, which must never
# shadow the standard library's operator module through the current directory.
if [ ! -x .venv/bin/python ]; then
  "$PY" -I -m venv .venv
fi
.venv/bin/python -I -m pip install -q --upgrade pip
.venv/bin/python -I -m pip install -q -e '.[test,bench]'
