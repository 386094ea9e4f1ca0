#!/usr/bin/env bash
# Fetches the vocabulary-only GGUFs llama.cpp ships for its tokenizer tests
# (models/ggml-vocab-*.gguf with their .inp/.out test cases) from the llama-cpp-python sdist
# on PyPI, for engine/tests/bpe_vocabs.rs. Idempotent.
#   TURBINE_VOCABS (default ~/.cache/turbine-vocabs): where the files go.
set -euo pipefail
dest=${TURBINE_VOCABS:-$HOME/.cache/turbine-vocabs}
version=0.3.36
names="llama-bpe qwen2 qwen35 gpt-2 deepseek-llm deepseek-coder starcoder refact command-r falcon mpt"
missing=0
for n in $names; do
  for ext in gguf gguf.inp gguf.out; do
    [ -s "$dest/ggml-vocab-$n.$ext" ] || missing=1
  done
done
[ "$missing" -eq 0 ] && exit 0
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The same sdist scripts/llama_ref/build.sh builds the reference llama.cpp from; reuse a copy
# it already unpacked, else download it (no build: the sdist is only read).
ref=${LLAMA_REF_DIR:-$HOME/.cache/turbine-llama}/src/vendor/llama.cpp/models
if [ -d "$ref" ]; then
  src=$ref
else
  bash "$(dirname "$0")/fetch-llama-sdist.sh" "$tmp" >/dev/null
  members=()
  for n in $names; do
    for ext in gguf gguf.inp gguf.out; do members+=("llama_cpp_python-$version/vendor/llama.cpp/models/ggml-vocab-$n.$ext"); done
  done
  tar -xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp" "${members[@]}"
  src=$tmp/llama_cpp_python-$version/vendor/llama.cpp/models
fi
for n in $names; do
  cp "$src/ggml-vocab-$n.gguf" "$src/ggml-vocab-$n.gguf.inp" "$src/ggml-vocab-$n.gguf.out" "$dest/"
done
echo "vocabularies in $dest"
