#!/usr/bin/env bash
# Set up (once) and serve the embedded default model, SmolLM2-135M-Instruct: OpenAI API and
# studio on :16070. LLM_LLAMA_SERVICE_EMBEDDED_MODEL=gemma-3-270m (or --embedded-model) picks
# the other embedded model; arguments go to `llamafleet serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/llamafleet serve "$@"
