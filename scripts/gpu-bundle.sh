#!/usr/bin/env bash
# Everything the GPU checks need on a machine with a GPU and no Rust or NVRTC, in one folder
# (target/gpu-bundle, under 64 MiB so one `device` call can carry it):
#   turbine-gpu-check   every kernel against the CPU reference (`--perf`: GB/s beside copy)
#   turbine-gpu-e2e     every backend operation, then logits and greedy tokens of models on
#                       CPU and CUDA, and decode / prefill speed
#   turbine             the CLI built with `cuda`: `turbine bench --device cuda` on each model
#   kernels/            CUBINs for sm_80 and sm_90a, found through TURBINE_KERNEL_CACHE
#   *.gguf              the synthetic MoE and gpt-oss models (scripts/synth/)
# Then, on the GPU machine, from the repository root (carrying target/gpu-bundle):
#   bash scripts/gpu-check.sh
# turbine-gpu-e2e is built with NCCL: it also runs the first model split over one rank per
# GPU with its collectives over NCCL (gpu-check.sh links PyTorch's libnccl.so.2 as the
# libnccl.so cudarc opens).
# The default model (253 MB) does not fit one call: scripts/gpu-model-parts.sh cuts it into
# parts to carry one per call to the warm machine; gpu-check.sh joins and checks them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bundle=$root/target/gpu-bundle
synth=${TURBINE_SYNTH:-$HOME/.cache/turbine-synth}
nvrtc=${TURBINE_NVRTC_HOME:-$HOME/.cache/turbine-nvrtc}/nvidia/cu13/lib
bash "$root/scripts/fetch-test-data.sh" >/dev/null
# A target folder of its own: these features would otherwise rebuild target/release's crates.
build=$root/target/gpu-build
(cd "$root" && cargo build --release -q --target-dir "$build" --features cuda,nccl --bin turbine-gpu-e2e -p turbine \
  && cargo build --release -q --target-dir "$build" -p turbine-cuda --bin turbine-gpu-check \
  && cargo build --release -q --target-dir "$build" -p turbine-shell --no-default-features --features cuda --bin turbine)
rm -rf "$bundle"
mkdir -p "$bundle/kernels"
for bin in turbine-gpu-check turbine-gpu-e2e turbine; do
  strip -o "$bundle/$bin" "$build/release/$bin"
done
LD_LIBRARY_PATH=$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$bundle/turbine-gpu-e2e" --precompile "$bundle/kernels"
cp "$synth/qwen3moe-q8_0.gguf" "$synth/gpt-oss-mxfp4.gguf" "$bundle/"
size=$(du -sm "$bundle" | cut -f1)
echo "bundle: $bundle ($size MiB)"
if [ "$size" -ge 64 ]; then
  echo "the bundle is over the 64 MiB one device call carries" >&2
  exit 1
fi
