#!/usr/bin/env bash
# Decode (tg128) and prompt (pp256) speed of every synthetic model of scripts/synth/
# (scripts/fetch-test-data.sh writes them), Turbine beside llama.cpp on the same file, one
# model after the other: scripts/bench-vs-llama.sh per model.
#   scripts/bench-synthetic.sh [THREADS] [REPS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
synth=${TURBINE_SYNTH:-$HOME/.cache/turbine-synth}
echo "CPU: $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed "s/^ //"), threads ${1:-$(nproc)}, reps ${2:-3}"
for model in "$synth"/*.gguf; do
  echo "## $(basename "$model" .gguf)"
  PROMPT=256 bash "$here/bench-vs-llama.sh" "$model" "${1:-$(nproc)}" "${2:-3}" | tail -n +2
done
