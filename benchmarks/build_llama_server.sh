#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` and `llama-batched-bench` from the llama.cpp that the
# pinned llama-cpp-python sdist vendors (same commit as our engine), with llama.cpp's default
# CMake options, statically linked. About 5 minutes on 2 cores (both tools in one build).
#
#   benchmarks/build_llama_server.sh            # as upstream ships it -> .build/bin/llama-server
#                                               #                         .build/bin/llama-batched-bench
#   benchmarks/build_llama_server.sh --patched  # plus patches/llama.cpp (the kernels llamafleet
#                                               # runs) -> .build/bin/llama-server-patched
#                                               #          .build/bin/llama-batched-bench-patched
# Prints the llama-server path. A build that has only llama-server (older runs of this
# script) is completed with llama-batched-bench.
set -euo pipefail
cd "$(dirname "$0")"
. ../scripts/llama-cpp-env.sh   # the compiler flags of every llamafleet llama.cpp build (no AMX)
VERSION=$(python3 -c "import re,pathlib;print(re.search(r'llama-cpp-python==([\d.]+)',pathlib.Path('../pyproject.toml').read_text()).group(1))")
suffix=""
[ "${1:-}" = "--patched" ] && suffix="-patched"
mkdir -p .build
cd .build
if [ ! -x "bin/llama-server$suffix" ] || [ ! -x "bin/llama-batched-bench$suffix" ]; then
  if [ ! -f "build$suffix/CMakeCache.txt" ]; then
    [ -f "llama_cpp_python-$VERSION.tar.gz" ] || \
      python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
    rm -rf "src$suffix" && mkdir "src$suffix"
    tar xzf "llama_cpp_python-$VERSION.tar.gz" -C "src$suffix" --strip-components=1
    if [ -n "$suffix" ]; then
      for p in ../../patches/llama.cpp/*.patch; do
        patch -s -p1 -d "src$suffix/vendor/llama.cpp" < "$p"
      done
    fi
    cmake -S "src$suffix/vendor/llama.cpp" -B "build$suffix" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF > "cmake$suffix.log" 2>&1
  fi
  cmake --build "build$suffix" -j"$(nproc)" --target llama-server llama-batched-bench \
    > "build$suffix.log" 2>&1
  mkdir -p bin
  cp "build$suffix/bin/llama-server" "bin/llama-server$suffix"
  cp "build$suffix/bin/llama-batched-bench" "bin/llama-batched-bench$suffix"
fi
echo "$(pwd)/bin/llama-server$suffix"
