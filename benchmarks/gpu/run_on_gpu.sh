#!/usr/bin/env bash
# One prepared GPU check (device tool): CUDA build of the pinned, patched llama-cpp-python, the NVML
# probe and planner on the real card, and `llamafleet bench --concurrent 1,4,16`.
# Expects .devcache/llama_cpp_python-0.3.36.tar.gz (a slimmed sdist) and .whl/ (wheels).
set -euo pipefail
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv | tee "$OUT/nvidia-smi.txt"
start=$(date +%s)
if [ -z "$(ls /tmp/site/llama_cpp/lib/libggml-cuda* 2>/dev/null)" ]; then
  # The same llama.cpp patches and compiler flags as every llamafleet build
  # (scripts/build-llama-cpp-python.sh, scripts/llama-cpp-env.sh).
  . scripts/llama-cpp-env.sh
  rm -rf /tmp/lcp && mkdir /tmp/lcp
  tar xzf .devcache/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp --strip-components=1
  for p in patches/llama.cpp/*.patch; do patch -s -p1 -d /tmp/lcp/vendor/llama.cpp < "$p"; done
  sed -i "s/^__version__ = \"\([0-9.]*\)\"/__version__ = \"\1+llamafleet.cuda\"/" /tmp/lcp/llama_cpp/__init__.py
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target /tmp/site /tmp/lcp > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
fi
echo "llama-cpp-python CUDA build: $(( $(date +%s) - start )) s"
python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . > /dev/null
python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
[ -f /tmp/rand.gguf ] || python3 benchmarks/make_random_gguf.py /tmp/rand.gguf --dim 2048 --layers 16 --ff 5632
python3 - <<'PY' | tee "$OUT/probe.txt"
from llamafleet.inference import capacity
print("NVML:", capacity.probe_gpus())
PY
serve() {  # $1 = max batch size
  python3 -m llamafleet.common.cli serve --model-path /tmp/rand.gguf --host 127.0.0.1 \
    --http-port 18000 --grpc-port 0 --metrics-port 0 --context-size 1024 --max-batch-size "$1" \
    --threads 8 > "$OUT/serve-$1.log" 2>&1 &
  PID=$!
  python3 - "$1" <<'PY'
import sys, time, httpx
for _ in range(60):
    try:
        if httpx.get("http://127.0.0.1:18000/ready").status_code == 200:
            break
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
info = httpx.get("http://127.0.0.1:18000/info").text
print(info); open(f"{__import__('os').environ['OUT']}/info-{sys.argv[1]}.json", "w").write(info)
PY
}
serve 16
python3 -m llamafleet.common.cli bench --url http://127.0.0.1:18000 --concurrent 1,4,16 \
  --max-tokens 128 --requests 32 --json "$OUT/gpu-bench-batch16.json"
kill $PID; wait $PID || true
serve 1
python3 -m llamafleet.common.cli bench --url http://127.0.0.1:18000 --concurrent 1,4 \
  --max-tokens 128 --requests 8 --json "$OUT/gpu-bench-batch1.json"
kill $PID; wait $PID || true
grep -h "max_batch_size=" "$OUT"/serve-*.log || true
