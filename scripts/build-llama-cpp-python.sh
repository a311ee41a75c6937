#!/usr/bin/env bash
# Build the pinned llama-cpp-python with llamafleet's patches (patches/llama.cpp/ on the vendored
# llama.cpp, patches/llama-cpp-python/ on the package) and the shared compiler flags
# (scripts/llama-cpp-env.sh: no AMX kernels) into a wheel; print its path. Idempotent: a wheel
# built from the same version, patches and flags is reused from the cache (about 5 minutes to
# compile on 2 cores otherwise; the portable build compiles ggml's CPU code once per variant).
#
# The wheel's version carries a local label, e.g. 0.3.36+llamafleet.1a2b3c4d, which still
# satisfies the `llama-cpp-python==0.3.36` pin and shows at runtime that the patches are in.
#
#   scripts/build-llama-cpp-python.sh                     # CPU build for this machine (-march=native)
#   scripts/build-llama-cpp-python.sh --portable          # any x86-64 CPU: one ggml-cpu module per
#                                                         # variant (SSE4.2 ... AVX-512), chosen at
#                                                         # run time (the CPU image uses this)
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/build-llama-cpp-python.sh
#   LLAMAFLEET_SDIST=path/to/llama_cpp_python-X.tar.gz ...  # no download (offline machines)
#   scripts/build-llama-cpp-python.sh [--portable] --label  # print the version label only
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
label_only=""
for arg in "$@"; do
  case "$arg" in
    --portable)
      # Upstream's own images do the same: no -march=native, back-ends as loadable modules.
      CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF" ;;
    --label) label_only=1 ;;
    *) echo "usage: $0 [--portable] [--label]" >&2; exit 2 ;;
  esac
done
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")
[ -n "$VERSION" ] || { echo "no llama-cpp-python==X pin in pyproject.toml" >&2; exit 1; }
# shellcheck source=llama-cpp-env.sh
. "$ROOT/scripts/llama-cpp-env.sh"
ID=$(cat "$ROOT"/patches/llama.cpp/*.patch "$ROOT"/patches/llama-cpp-python/*.patch \
       <(printf '%s|%s|%s' "${CMAKE_ARGS:-}" "$CFLAGS" "$CXXFLAGS") | sha256sum | cut -c1-8)
LOCAL="$VERSION+llamafleet.$ID"
if [ -n "$label_only" ]; then echo "$LOCAL"; exit 0; fi
OUT=${LLAMAFLEET_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/llamafleet/wheels}
mkdir -p "$OUT"

apply() {  # $1 = patch, $2 = directory
  if command -v patch >/dev/null; then patch -s -p1 -d "$2" < "$1"; else (cd "$2" && git apply -p1 "$1"); fi
}

wheel=$(find "$OUT" -maxdepth 1 -name "llama_cpp_python-${LOCAL}-*.whl" | head -1)
if [ -z "$wheel" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  sdist=${LLAMAFLEET_SDIST:-}
  if [ -z "$sdist" ]; then
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
    sdist=$(ls "$work"/llama_cpp_python-*.tar.gz)
  fi
  mkdir "$work/src"
  tar xzf "$sdist" -C "$work/src" --strip-components=1
  for p in "$ROOT"/patches/llama.cpp/*.patch; do apply "$p" "$work/src/vendor/llama.cpp"; done
  for p in "$ROOT"/patches/llama-cpp-python/*.patch; do apply "$p" "$work/src"; done
  sed -i "s/^__version__ = .*/__version__ = \"$LOCAL\"/" "$work/src/llama_cpp/__init__.py"
  echo "building llama-cpp-python $LOCAL (CMAKE_ARGS='${CMAKE_ARGS:-}' CFLAGS='$CFLAGS'); about 5 minutes" >&2
  CMAKE_ARGS="${CMAKE_ARGS:-}" "$PY" -m pip wheel -q --no-deps "$work/src" -w "$work/wheel" >&2
  cp "$work"/wheel/llama_cpp_python-*.whl "$OUT/"
  wheel=$(find "$OUT" -maxdepth 1 -name "llama_cpp_python-${LOCAL}-*.whl" | head -1)
fi
echo "$wheel"
