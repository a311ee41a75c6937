#!/usr/bin/env bash
# Build the pinned llama-cpp-python with llamafleet's llama.cpp patches (patches/llama.cpp/)
# into a wheel and print its path. Idempotent: a wheel built from the same version, patches
# and CMAKE_ARGS is reused from the cache (about 5 minutes to compile on 2 cores otherwise).
#
# The wheel's version carries a local label, e.g. 0.3.36+llamafleet.1a2b3c4d, which still
# satisfies the `llama-cpp-python==0.3.36` pin and shows at runtime that the patches are in.
#
#   scripts/build-llama-cpp-python.sh                     # CPU build for this machine
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/build-llama-cpp-python.sh
#   LLAMAFLEET_SDIST=path/to/llama_cpp_python-X.tar.gz ...  # no download (offline machines)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")
[ -n "$VERSION" ] || { echo "no llama-cpp-python==X pin in pyproject.toml" >&2; exit 1; }
ID=$(cat "$ROOT"/patches/llama.cpp/*.patch <(printf '%s' "${CMAKE_ARGS:-}") | sha256sum | cut -c1-8)
LOCAL="$VERSION+llamafleet.$ID"
OUT=${LLAMAFLEET_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/llamafleet/wheels}
mkdir -p "$OUT"

wheel=$(find "$OUT" -maxdepth 1 -name "llama_cpp_python-${LOCAL}-*.whl" | head -1)
if [ -z "$wheel" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  sdist=${LLAMAFLEET_SDIST:-}
  if [ -z "$sdist" ]; then
    "$PY" -I -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
    sdist=$(ls "$work"/llama_cpp_python-*.tar.gz)
  fi
  mkdir "$work/src"
  tar xzf "$sdist" -C "$work/src" --strip-components=1
  for p in "$ROOT"/patches/llama.cpp/*.patch; do
    if command -v patch >/dev/null; then
      patch -s -p1 -d "$work/src/vendor/llama.cpp" < "$p"
    else
      (cd "$work/src/vendor/llama.cpp" && git apply -p1 "$p")
    fi
  done
  sed -i "s/^__version__ = .*/__version__ = \"$LOCAL\"/" "$work/src/llama_cpp/__init__.py"
  echo "building llama-cpp-python $LOCAL (CMAKE_ARGS='${CMAKE_ARGS:-}'); about 5 minutes" >&2
  "$PY" -I -m pip wheel -q --no-deps "$work/src" -w "$work/wheel" >&2
  cp "$work"/wheel/llama_cpp_python-*.whl "$OUT/"
  wheel=$(find "$OUT" -maxdepth 1 -name "llama_cpp_python-${LOCAL}-*.whl" | head -1)
fi
echo "$wheel"
