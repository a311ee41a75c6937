#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` from the llama.cpp that the pinned llama-cpp-python
# sdist vendors (same commit as our engine), with llama.cpp's default CMake options.
# About 5 minutes on 2 cores. Output: benchmarks/.build/bin/llama-server
set -euo pipefail
cd "$(dirname "$0")"
VERSION=$(python3 -I -c "import re,pathlib;print(re.search(r'llama-cpp-python==([\d.]+)',pathlib.Path('../pyproject.toml').read_text()).group(1))")
mkdir -p .build
cd .build
if [ ! -x bin/llama-server ]; then
  [ -f "llama_cpp_python-$VERSION.tar.gz" ] || \
    python3 -I -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
  rm -rf src && mkdir src && tar xzf "llama_cpp_python-$VERSION.tar.gz" -C src --strip-components=1
  cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF > cmake.log 2>&1
  cmake --build build -j"$(nproc)" --target llama-server > build.log 2>&1
  mkdir -p bin && cp build/bin/llama-server bin/
fi
echo "$(pwd)/bin/llama-server"
