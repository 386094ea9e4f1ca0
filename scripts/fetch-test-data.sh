#!/usr/bin/env bash
# Everything the test suite reads that is not in the repository: the default model
# (scripts/fetch-default-model.sh), llama.cpp's tokenizer test vocabularies
# (scripts/fetch-vocabs.sh) and the synthetic models of scripts/synth/ (written with the
# PyPI `gguf` package, pinned, in a venv of their own; rewritten when their script changes).
# Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/fetch-default-model.sh"
bash "$here/fetch-vocabs.sh"
root=$(cd "$here/.." && pwd)
synth=${TURBINE_SYNTH:-$HOME/.cache/turbine-synth}
stamp=$(sha256sum "$root/scripts/synth/make_models.py" | cut -d' ' -f1)
if [ "$(cat "$synth/models.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -s "$synth/qwen3moe-q8_0.gguf" ]; then
  venv=${TURBINE_SYNTH_VENV:-$HOME/.cache/turbine-synth-venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check gguf==0.19.0 numpy==2.4.6
  "$venv/bin/python" "$root/scripts/synth/make_models.py" "$synth" >/dev/null
  echo "$stamp" > "$synth/models.stamp"
  echo "synthetic models in $synth"
fi
# NVRTC 13.0 (PyPI's nvidia-cuda-nvrtc wheel, unpacked; no GPU needed) for the CUDA kernels'
# compile check (cuda/tests/compile.rs).
nvrtc=${TURBINE_NVRTC_HOME:-$HOME/.cache/turbine-nvrtc}
if [ ! -s "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  venv=${TURBINE_SYNTH_VENV:-$HOME/.cache/turbine-synth-venv}
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  tmp=$(mktemp -d)
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps -d "$tmp" "nvidia-cuda-nvrtc==13.0.88"
  mkdir -p "$nvrtc"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$tmp"/nvidia_cuda_nvrtc-*.whl "$nvrtc"
  rm -rf "$tmp"
  echo "NVRTC in $nvrtc/nvidia/cu13/lib"
fi
