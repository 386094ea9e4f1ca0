#!/usr/bin/env bash
# The GPU check in one command: every kernel against the CPU reference with its GB/s beside
# the copy bandwidth (turbine-gpu-check --perf), then every backend operation and whole
# models on the CPU and CUDA backends, with decode and prefill speed (turbine-gpu-e2e), then
# `turbine bench --device cuda` (llama-bench's pp512 and tg128) on each model of the bundle.
# Without a GPU each prints "skipped: no GPU" and this exits 0.
#   bash scripts/gpu-check.sh [turbine-gpu-e2e options, e.g. --model PATH]
# Uses target/gpu-bundle (scripts/gpu-bundle.sh: precompiled kernels, no NVRTC or Rust
# needed) when it is there, else the binaries of target/release.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bundle=$root/target/gpu-bundle
if [ -x "$bundle/turbine-gpu-e2e" ]; then
  bin=$bundle
  export TURBINE_KERNEL_CACHE=${TURBINE_KERNEL_CACHE:-$bundle/kernels}
  models=()
  # The default model carried in parts (scripts/gpu-model-parts.sh), joined and checked.
  parts=$root/target/gpu-parts
  if [ -s "$parts/SHA256" ]; then
    joined=$root/target/gemma3-270m.gguf
    cat "$parts"/part-* > "$joined"
    if [ "$(sha256sum "$joined" | cut -d' ' -f1)" = "$(cat "$parts/SHA256")" ]; then
      models+=(--model "$joined")
    else
      echo "target/gpu-parts: the joined parts do not match SHA256 (a part missing?); default model skipped" >&2
    fi
  fi
  for m in "$bundle"/*.gguf; do [ -e "$m" ] && models+=(--model "$m"); done
else
  bin=$root/target/release
  models=()
fi
for b in turbine-gpu-check turbine-gpu-e2e; do
  [ -x "$bin/$b" ] || { echo "$bin/$b missing: run scripts/gpu-bundle.sh" >&2; exit 1; }
done
# cudarc opens libnccl.so; NCCL (PyTorch's wheel included) installs libnccl.so.2.
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
  nccl=$(python3 - 2>/dev/null <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("nvidia.nccl")
for d in (spec.submodule_search_locations or []) if spec else []:
    lib = os.path.join(d, "lib", "libnccl.so.2")
    if os.path.exists(lib):
        print(lib)
        break
PY
)
  if [ -n "$nccl" ]; then
    link=$(mktemp -d)
    ln -s "$nccl" "$link/libnccl.so"
    export LD_LIBRARY_PATH=$link${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
fi
status=0
echo "=== turbine-gpu-check --perf"
"$bin/turbine-gpu-check" --perf || status=1
echo "=== turbine-gpu-e2e"
e2e_log=$(mktemp)
if [ $# -gt 0 ]; then
  "$bin/turbine-gpu-e2e" "$@" | tee "$e2e_log" || status=1
else
  "$bin/turbine-gpu-e2e" "${models[@]}" | tee "$e2e_log" || status=1
fi
# The bundle's turbine is built with cuda (target/release's may not be).
if [ "$bin" = "$bundle" ] && [ -x "$bin/turbine" ] && ! grep -q "skipped: no GPU" "$e2e_log"; then
  # The models given (--model PATH), else the bundle's.
  paths=()
  args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    [ "${args[$i]}" = --model ] && paths+=("${args[$((i + 1))]:-}")
  done
  [ ${#paths[@]} -gt 0 ] || for ((i = 1; i < ${#models[@]}; i += 2)); do paths+=("${models[$i]}"); done
  for m in "${paths[@]}"; do
    [ -e "$m" ] || continue
    echo "=== turbine bench --device cuda -m $m"
    "$bin/turbine" bench --device cuda -m "$m" -p 512 -n 128 -r 3 || status=1
  done
fi
exit $status
