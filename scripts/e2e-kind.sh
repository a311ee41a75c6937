#!/usr/bin/env bash
# End-to-end on a real kind cluster: create it, load the image, helm install with the CPU
# sample, wait for Ready, then call the OpenAI endpoint through a port-forward and the gRPC
# endpoint with the client certificate from the Secret. Exit 3 (skip) without docker/kind.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || [ -x ".tools/bin/$tool" ] || { echo "skip: $tool is not installed" >&2; exit 3; }
done
export PATH="$PWD/.tools/bin:$PATH"
CLUSTER=${KIND_CLUSTER:-llamafleet-e2e}
IMAGE=${LLAMAFLEET_IMAGE:-llamafleet:0.1.0}
NS=llamafleet-e2e
docker image inspect "$IMAGE" >/dev/null 2>&1 || ./scripts/docker-smoke.sh
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image "$IMAGE" --name "$CLUSTER"
helm upgrade --install llamafleet charts/llamafleet -n "$NS" --create-namespace \
  --set sample.enabled=true --set image.pullPolicy=Never --wait
kubectl -n "$NS" wait llmservice/chat-cpu --for=condition=Ready --timeout=15m
kubectl -n "$NS" port-forward svc/chat-cpu 18070:16070 18071:16071 >/tmp/pf.log 2>&1 &
PF=$!; trap 'kill $PF' EXIT
for _ in $(seq 1 30); do curl -sf localhost:18070/ready >/dev/null && break; sleep 1; done
curl -sf localhost:18070/v1/chat/completions -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":8}'
echo
d=$(mktemp -d)
for k in ca.crt tls.crt tls.key; do
  kubectl -n "$NS" get secret chat-cpu-client-tls -o "jsonpath={.data.${k//./\\.}}" | base64 -d > "$d/$k"
done
.venv/bin/python - "$d" <<'PY'
import sys, grpc
from llamafleet.inference.proto import local_pb2 as pb, local_pb2_grpc as pbg
d = sys.argv[1]
creds = grpc.ssl_channel_credentials(open(f"{d}/ca.crt", "rb").read(), open(f"{d}/tls.key", "rb").read(), open(f"{d}/tls.crt", "rb").read())
with grpc.secure_channel("localhost:18071", creds, options=[("grpc.ssl_target_name_override", "chat-cpu.llamafleet-e2e.svc")]) as ch:
    replies = list(pbg.LLMLocalServiceStub(ch).GenerateStream(pb.LLMLocalServiceGenerateStreamRequest(user_prompt="Hello", params=pb.GenerationParams(max_new_tokens=8)), timeout=120))
print("gRPC finish:", replies[-1].finish_details)
PY
echo "e2e: ok"
