#!/usr/bin/env bash
# Build the CPU image from a local base, run it (host network), wait for /ready, chat once;
# then the same through docker-compose. Prints the image size. Exit 3: no Docker here.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/dockerd.sh || exit 3
BASE=$(./scripts/docker-base.sh)
TAG=${LLAMAFLEET_IMAGE:-llamafleet:0.1.0}
ctx=$(mktemp -d)
cleanup() {
  rm -rf "$ctx"; docker rm -f llamafleet-smoke >/dev/null 2>&1 || true
  # Stop the engine if dockerd.sh started it, so it does not take CPU from later tests.
  if [ -f /tmp/llamafleet-dockerd.pid ]; then kill "$(cat /tmp/llamafleet-dockerd.pid)" 2>/dev/null || true; rm -f /tmp/llamafleet-dockerd.pid; fi
}
trap cleanup EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$ctx/" 2>/dev/null || cp -r . "$ctx/"
mkdir -p "$ctx/docker/wheels"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/docker/ca-certificates.crt"
# The portable patched llama-cpp-python wheel, built on this host (same Debian, same Python)
# and cached, spares the image build its own compile.
cp "$(./scripts/build-llama-cpp-python.sh --portable)" "$ctx/docker/wheels/"
start=$(date +%s)
docker build -q --network host --build-arg BASE="$BASE" -f "$ctx/docker/Dockerfile" -t "$TAG" "$ctx" >/dev/null
# The vfs storage driver keeps every layer as a full copy: drop what the rebuild left
# dangling (the previous image of this tag), or repeated builds fill the disk.
docker image prune -f >/dev/null
echo "built $TAG in $(( $(date +%s) - start )) s; size $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MiB", $1/1048576}')"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
check() {  # $1 = http port
  for _ in $(seq 1 120); do curl -sf "127.0.0.1:$1/ready" >/dev/null && break; sleep 1; done
  curl -sf "127.0.0.1:$1/ready"; echo
  curl -sf "127.0.0.1:$1/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"messages":[{"role":"user","content":"Say hello"}],"max_tokens":8}' | python3 -c \
    'import json,sys; r=json.load(sys.stdin); assert r["choices"][0]["message"]["content"], r; print("chat ok:", r["usage"])'
}
# The image carries no -march=native code: ggml picks its CPU module for the CPU it runs on.
echo "cpu modules: $(docker run --rm --network host --entrypoint python "$TAG" -c \
  'from llamafleet.inference import llama_backend as b; print(" ".join(b.BACKEND_MODULES))')"
echo "system info: $(docker run --rm --network host --entrypoint python "$TAG" -c \
  'from llamafleet.inference import llama_backend; import llama_cpp; print(llama_cpp.llama_print_system_info().decode())')"

served() {  # $1 = http port, $2 = the model id /v1/models must list
  curl -sf "127.0.0.1:$1/v1/models" | python3 -c \
    'import json,sys; ids=[m["id"] for m in json.load(sys.stdin)["data"]]; assert ids == [sys.argv[1]], ids; print("serves", ids[0])' "$2"
}
run() {  # $1 = http port; more args: extra `docker run` options
  local p=$1; shift
  docker run -d --name llamafleet-smoke --network host --read-only --tmpfs /tmp \
    -e LLM_LLAMA_SERVICE_HOST=127.0.0.1 -e LLM_LLAMA_SERVICE_HTTP_PORT="$p" \
    -e LLM_LLAMA_SERVICE_GRPC_PORT="$(port)" -e LLM_LLAMA_SERVICE_METRICS_PORT="$(port)" \
    -e LLM_LLAMA_SERVICE_MAX_BATCH_SIZE=2 "$@" "$TAG" serve >/dev/null
}
P=$(port)
run "$P"  # the default embedded model: SmolLM2-135M-Instruct
{ check "$P" && served "$P" SmolLM2-135M-Instruct.Q4_1; } || { docker logs llamafleet-smoke | tail -30; exit 1; }
curl -sf "127.0.0.1:$P/studio/" | grep -q "llamafleet studio" || { echo "studio not served" >&2; exit 1; }
echo "studio: ok"
docker rm -f llamafleet-smoke >/dev/null
P=$(port)
run "$P" -e LLM_LLAMA_SERVICE_EMBEDDED_MODEL=gemma-3-270m  # the other one, by name
{ check "$P" && served "$P" gemma-3-270m-q4_k_m; } || { docker logs llamafleet-smoke | tail -30; exit 1; }
docker rm -f llamafleet-smoke >/dev/null
echo "container: ok"

if command -v docker-compose >/dev/null; then
  export LLAMAFLEET_HTTP_PORT=$(port) LLAMAFLEET_GRPC_PORT=$(port) LLAMAFLEET_METRICS_PORT=$(port)
  docker-compose -p llamafleet-smoke up -d >/dev/null 2>&1
  check "$LLAMAFLEET_HTTP_PORT" || { docker-compose -p llamafleet-smoke logs | tail -30; docker-compose -p llamafleet-smoke down; exit 1; }
  docker-compose -p llamafleet-smoke down >/dev/null 2>&1
  echo "docker-compose: ok"
fi
