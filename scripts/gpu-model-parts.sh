#!/usr/bin/env bash
# The default model (253 MB) in parts a device call can carry (under 64 MiB each), for the
# GPU check on a machine that cannot download it:
#   bash scripts/gpu-model-parts.sh      # writes target/gpu-parts/part-0 … part-4 and SHA256
# Then, on one warm device machine (ignored paths carried earlier stay there), one call per
# part, each carrying only its own path, e.g. carry=["target/gpu-parts/part-0"], then
# "target/gpu-parts/part-1", …, the last together with "target/gpu-parts/SHA256". Then
#   bash scripts/gpu-check.sh
# joins the parts, checks the sha256, and checks the default model first, then the bundle's
# synthetic models (scripts/gpu-bundle.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
model=${OLLAMA_MODELS:-$HOME/.ollama/models}/blobs/sha256-$sha
[ -s "$model" ] || bash "$root/scripts/fetch-default-model.sh"
parts=$root/target/gpu-parts
rm -rf "$parts"
mkdir -p "$parts"
split -b 60M -d -a 1 "$model" "$parts/part-"
echo "$sha" > "$parts/SHA256"
ls -l "$parts"
