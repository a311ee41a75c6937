#!/usr/bin/env bash
# Set up (once) and run every test: unit, integration (real model, real servers on
# loopback, real TLS, real kopf against KMock, real chromium), e2e where a cluster exists.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/system-deps.sh
.venv/bin/ruff check .   # lint first: the config is in pyproject.toml
exec .venv/bin/pytest "$@"
