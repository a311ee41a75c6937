#!/usr/bin/env bash
# llamafleet vs llama-server vs llama.cpp's own ceiling, on one GPU, from ONE CUDA build.
#
# One cmake build of the vendored, patched llama.cpp (patches/llama.cpp) gives llama-server,
# llama-batched-bench and the shared libraries; llama-cpp-python is installed with
# CMAKE_ARGS=-DLLAMA_BUILD=OFF (Python only) and those libraries are copied into
# llama_cpp/lib, so both servers run the same kernels. Same random-weight model
# (benchmarks/make_random_gguf.py), same client (`llamafleet bench`, several processes),
# levels 1,4,16,64,128, each interleaved ours/theirs; then the client's own ceiling
# (`bench --self-test`), a step breakdown of llamafleet (`serve --step-profile`,
# benchmarks/step_profile.py) and `llama-batched-bench` at the same batch sizes.
#
# Prepare here:  benchmarks/gpu/prepare.sh   (.devcache: slim sdist; .whl: serving wheels)
# Device tool:   carry [".devcache", ".whl"], command:
#                  RESULTS=$OUT bash benchmarks/gpu/side_by_side.sh
#                then copy the files back into benchmarks/results/gpu-<card>/.
# Stages:        side_by_side.sh [all|build|bench]  (build about 4-5 min on 16 cores; bench
#                about 3 min; on a warm machine `bench` reuses /tmp/lf-build)
# Knobs (env):   LEVELS=1,4,16,64,128  MAX_TOKENS=128  PROMPT_TOKENS=128 (batched-bench)
#                MODEL_ARGS="--dim 2048 --layers 16 --ff 5632"  THREADS=8  RESULTS=<dir>
#                CUDA=0 (a CPU dry run of the whole script)  PYTHON=python3  WHEELS=1 (install .whl)
#                SELF_TEST_LEVELS=16,64,128  GRAPHS_LEVEL=64
#                SKIP=self-test,step-profile,graphs (parts left out when device time is short)
#
# Writes to $RESULTS (default benchmarks/results/gpu-<card>/), at most 8 files:
#   side-by-side.json  the bench record (llamafleet = target, llama-server = compare)
#   batched-bench.jsonl  llama-batched-bench, one line per batch size, split KV streams
#                      (kv_unified false, its default) and one unified buffer (true)
#   self-test.json     client events/s against a no-op server, 1 vs N processes
#   step-profile.json  llamafleet's step parts per level (a second serve, --step-profile)
#   cuda-graphs-off.json  llamafleet at c$GRAPHS_LEVEL (64) with GGML_CUDA_DISABLE_GRAPHS=1
#   summary.json, summary.md  ratios and the acceptance lines of issue 17 (summarise.py)
#   logs.tar.gz        build, server and bench logs
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
STAGE=${1:-all}
case "$STAGE" in all|build|bench) ;; *) echo "usage: $0 [all|build|bench]" >&2; exit 2 ;; esac
LEVELS=${LEVELS:-1,4,16,64,128}
MAX_TOKENS=${MAX_TOKENS:-128}
PROMPT_TOKENS=${PROMPT_TOKENS:-128}
MODEL_ARGS=${MODEL_ARGS:---dim 2048 --layers 16 --ff 5632}
THREADS=${THREADS:-8}
GRAPHS_LEVEL=${GRAPHS_LEVEL:-64}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
SDIST=${SDIST:-.devcache/llama_cpp_python-$VERSION.tar.gz}
SRC=/tmp/lf-src BUILD=/tmp/lf-build SITE=/tmp/lf-site MODEL=/tmp/lf-random.gguf
LOGS=/tmp/lf-logs
mkdir -p "$LOGS"
NGL=99
CUDA=${CUDA:-1} PY=${PYTHON:-python3} WHEELS=${WHEELS:-1}
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
max_level=$(tr ',' '\n' <<<"$LEVELS" | sort -n | tail -1)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 |
       sed 's/NVIDIA //; s/ .*//' | tr '[:upper:]' '[:lower:]' || true)
RESULTS=${RESULTS:-benchmarks/results/gpu-${card:-unknown}}
mkdir -p "$RESULTS"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  tar czf "$RESULTS/logs.tar.gz" -C "$LOGS" . 2>/dev/null || true
}
trap cleanup EXIT
say() { echo "[$(date +%T)] $*"; }
skip() { [[ ",${SKIP:-}," == *",$1,"* ]]; }

build() {
  if [ "$CUDA" = 1 ]; then
    command -v nvcc >/dev/null || { echo "no nvcc: this script needs a CUDA machine (CUDA=0: CPU)" >&2; exit 1; }
    backend=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
  else
    backend=(-DGGML_CUDA=OFF)
  fi
  [ -f "$SDIST" ] || { echo "missing $SDIST: run benchmarks/gpu/prepare.sh here first" >&2; exit 1; }
  if [ -x "$BUILD/bin/llama-server" ] && [ -x "$BUILD/bin/llama-batched-bench" ] &&
     [ -f "$SITE/llama_cpp/lib/libllama.so" ]; then
    say "build: reusing $BUILD"; return
  fi
  # The compiler flags of every llamafleet llama.cpp build (no AMX kernels).
  # shellcheck source=SCRIPTDIR/../../scripts/llama-cpp-env.sh
  . scripts/llama-cpp-env.sh
  rm -rf "$SRC" "$BUILD" && mkdir -p "$SRC"
  tar xzf "$SDIST" -C "$SRC" --strip-components=1
  for p in patches/llama.cpp/*.patch; do patch -s -p1 -d "$SRC/vendor/llama.cpp" < "$p"; done
  for p in patches/llama-cpp-python/*.patch; do patch -s -p1 -d "$SRC" < "$p"; done
  sed -i "s/^__version__ = \"\([0-9.]*\)\"/__version__ = \"\1+llamafleet.$([ "$CUDA" = 1 ] && echo cuda || echo cpu)\"/" "$SRC/llama_cpp/__init__.py"
  local t0=$SECONDS
  say "build: cmake (${backend[*]}, shared libraries)"
  cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "${backend[@]}" -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF > "$LOGS/cmake.log" 2>&1 ||
    { tail -30 "$LOGS/cmake.log"; exit 1; }
  cmake --build "$BUILD" -j"$(nproc)" --target llama llama-server llama-batched-bench \
    > "$LOGS/build.log" 2>&1 || { tail -50 "$LOGS/build.log"; exit 1; }
  say "build: llama.cpp in $((SECONDS - t0)) s"
  # llama-cpp-python's Python part only, then the libraries of the build above.
  if [ "$WHEELS" = 1 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl
  fi
  CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$PY" -m pip install -q --no-deps --no-build-isolation \
    --no-cache-dir --upgrade --target "$SITE" "$SRC" > "$LOGS/pip-llama-cpp-python.log" 2>&1 ||
    { tail -30 "$LOGS/pip-llama-cpp-python.log"; exit 1; }
  mkdir -p "$SITE/llama_cpp/lib"
  cp -a "$BUILD"/bin/lib*.so* "$SITE/llama_cpp/lib/"
  "$PY" -m pip install -q --no-deps --no-build-isolation --upgrade --target "$SITE" . \
    > "$LOGS/pip-llamafleet.log" 2>&1 || { tail -30 "$LOGS/pip-llamafleet.log"; exit 1; }
  "$PY" -c "import llama_cpp; print(llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
}

wait_ready() {  # $1 = url, $2 = what
  "$PY" - "$1" "$2" <<'PY'
import sys, threading, httpx
url, what = sys.argv[1:]
tick = threading.Event()
for _ in range(240):
    try:
        if httpx.get(url, timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    tick.wait(0.5)
sys.exit(f"{what} did not become ready at {url}")
PY
}

serve_llamafleet() {  # $1 = port, $2.. = extra flags
  local port=$1; shift
  "$PY" -m llamafleet.common.cli serve --model-path "$MODEL" --host 127.0.0.1 \
    --http-port "$port" --grpc-port 0 --metrics-port 0 --context-size "$CTX" \
    --max-batch-size "$max_level" --queue-size 1024 --threads "$THREADS" "$@" \
    > "$LOGS/llamafleet-$port.log" 2>&1 &
  PIDS+=($!)
  wait_ready "http://127.0.0.1:$port/ready" "llamafleet serve"
}

bench() {
  [ -f "$SITE/llama_cpp/lib/libllama.so" ] || { echo "run the build stage first" >&2; exit 1; }
  local gguf_py="$SRC/vendor/llama.cpp/gguf-py"
  if [ ! -f "$MODEL" ]; then
    say "model: random weights ($MODEL_ARGS)"
    # shellcheck disable=SC2086
    PYTHONPATH="$SITE:$gguf_py" "$PY" benchmarks/make_random_gguf.py "$MODEL" $MODEL_ARGS
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$LOGS/nvidia-smi.txt" 2>&1 || true
  # Per sequence: the chat prompt (byte-level vocabulary: ~1 token per byte) + the completion.
  CTX=$(( (PROMPT_TOKENS + MAX_TOKENS + 256 + 255) / 256 * 256 ))

  # split KV streams (its default, as llama-server -np N) and one unified KV buffer
  # (llamafleet's kv_unified=True): does the unified cache cost on the GPU?
  : > "$RESULTS/batched-bench.jsonl"
  for kvu in no-kv-unified kv-unified; do
    say "llama-batched-bench --$kvu: the ceiling (B = $LEVELS)"
    "$BUILD/bin/llama-batched-bench" -m "$MODEL" -ngl "$NGL" -c $(( max_level * (PROMPT_TOKENS + MAX_TOKENS) )) \
      -b 2048 -ub 512 -npp "$PROMPT_TOKENS" -ntg "$MAX_TOKENS" -npl "$LEVELS" --"$kvu" --output-format jsonl \
      > "$LOGS/batched-bench-$kvu.log" 2>&1 || { tail -30 "$LOGS/batched-bench-$kvu.log"; exit 1; }
    grep '^{' "$LOGS/batched-bench-$kvu.log" |
      sed "s/^{/{\"kv_unified\": $([ $kvu = kv-unified ] && echo true || echo false), /" >> "$RESULTS/batched-bench.jsonl"
  done

  if ! skip self-test; then
  say "client ceiling: bench --self-test"
  "$PY" -m llamafleet.common.cli bench --self-test --concurrent "${SELF_TEST_LEVELS:-16,64,128}" \
    --max-tokens "$MAX_TOKENS" --json "$RESULTS/self-test.json" 2>"$LOGS/self-test.err" | tee "$LOGS/self-test.txt" ||
    say "self-test reported failures (see self-test.json)"
  fi

  say "servers: llamafleet on 18000, llama-server -np $max_level on 18080"
  serve_llamafleet 18000
  "$BUILD/bin/llama-server" -m "$MODEL" -ngl "$NGL" --host 127.0.0.1 --port 18080 \
    -np "$max_level" -c $(( max_level * CTX )) -t "$THREADS" --no-webui \
    > "$LOGS/llama-server.log" 2>&1 &
  PIDS+=($!)
  wait_ready "http://127.0.0.1:18080/health" "llama-server"
  # one unmeasured request each (CUDA graphs, allocations)
  "$PY" -m llamafleet.common.cli bench --url http://127.0.0.1:18000 --compare http://127.0.0.1:18080 \
    --concurrent 1 --requests 1 --max-tokens 16 > "$LOGS/warmup.txt" 2>&1
  say "side by side: $LEVELS"
  "$PY" -m llamafleet.common.cli bench --url http://127.0.0.1:18000 --compare http://127.0.0.1:18080 \
    --concurrent "$LEVELS" --max-tokens "$MAX_TOKENS" --json "$RESULTS/side-by-side.json" \
    2>"$LOGS/side-by-side.err" | tee "$LOGS/side-by-side.txt" ||
    say "side by side: some requests failed (see side-by-side.json)"
  curl -s http://127.0.0.1:18000/info > "$LOGS/llamafleet-info.json" || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()

  if ! skip step-profile; then
  say "llamafleet step profile"
  serve_llamafleet 18001 --step-profile
  "$PY" benchmarks/step_profile.py --url http://127.0.0.1:18001 --concurrent "$LEVELS" \
    --max-tokens "$MAX_TOKENS" --json "$RESULTS/step-profile.json" 2>"$LOGS/step-profile.err" |
    tee "$LOGS/step-profile.txt" || say "step profile: some requests failed"

  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
  fi

  # What CUDA graphs buy llamafleet's steps (a batch that changes shape may rebuild them).
  if ! skip graphs; then
  say "llamafleet at c$GRAPHS_LEVEL with GGML_CUDA_DISABLE_GRAPHS=1"
  GGML_CUDA_DISABLE_GRAPHS=1 serve_llamafleet 18002
  "$PY" -m llamafleet.common.cli bench --url http://127.0.0.1:18002 --concurrent 1 --requests 1 \
    --max-tokens 16 > /dev/null 2>&1
  "$PY" -m llamafleet.common.cli bench --url http://127.0.0.1:18002 --concurrent "$GRAPHS_LEVEL" \
    --max-tokens "$MAX_TOKENS" --json "$RESULTS/cuda-graphs-off.json" 2>"$LOGS/cuda-graphs-off.err" |
    tee "$LOGS/cuda-graphs-off.txt" || say "graphs off: some requests failed"
  fi

  "$PY" benchmarks/gpu/summarise.py "$RESULTS" | tee "$LOGS/summary.txt"
}

case "$STAGE" in
  build) build ;;
  bench) bench ;;
  all) build; bench ;;
esac
