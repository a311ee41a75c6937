#!/usr/bin/env bash
# Set up (once) and serve the embedded default model: OpenAI API and studio on :16070.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/llamafleet serve "$@"
