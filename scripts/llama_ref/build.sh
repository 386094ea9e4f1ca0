#!/usr/bin/env bash
# Builds llama.cpp (the reference oracle) from the llama-cpp-python sdist on PyPI, outside the
# repository, and links our fixture dumper (dump.cpp) against it.
#   LLAMA_REF_DIR (default ~/.cache/turbine-llama): where the source and build live.
#   LLAMA_EXTRA_TARGETS: more targets, e.g. "llama-bench llama-server" (llama-server needs
#   LLAMA_BUILD_SERVER=ON).
# Prints the path of the built dumper on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ref=${LLAMA_REF_DIR:-$HOME/.cache/turbine-llama}
version=0.3.36
mkdir -p "$ref"
if [ ! -d "$ref/src/vendor/llama.cpp" ]; then
  tarball=$(bash "$here/../fetch-llama-sdist.sh" "$ref/dl")
  mkdir -p "$ref/src"
  tar -xzf "$tarball" -C "$ref/src" --strip-components=1 "llama_cpp_python-$version/vendor/llama.cpp"
fi
command -v cmake >/dev/null || python3 -m pip install cmake ninja
cmake -S "$ref/src/vendor/llama.cpp" -B "$ref/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=${LLAMA_BUILD_SERVER:-OFF} >/dev/null
cmake --build "$ref/build" --target llama ${LLAMA_EXTRA_TARGETS:-} -j "$(nproc)"
if [ -f "$here/dump.cpp" ]; then
  libs=$(find "$ref/build" -name 'libllama.a' -o -name 'libggml*.a' | tr '\n' ' ')
  g++ -O2 -std=c++17 -I"$ref/src/vendor/llama.cpp/include" -I"$ref/src/vendor/llama.cpp/ggml/include" \
    "$here/dump.cpp" -Wl,--start-group $libs -Wl,--end-group -lgomp -lpthread -lm -o "$ref/llama-ref-dump"
  echo "$ref/llama-ref-dump"
fi
