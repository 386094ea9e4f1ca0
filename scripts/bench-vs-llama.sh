#!/usr/bin/env bash
# Runs llama.cpp's llama-bench and `turbine bench` on the same model, threads and test
# sizes, one after the other, and prints both tables and Turbine's speed ratios.
#   scripts/bench-vs-llama.sh [MODEL] [THREADS] [REPS]
# PROMPT (default 512) sets the prompt-processing size (models with a short context need less);
# DEPTH (default 0) the tokens already in the cache when each test starts (llama-bench's -d).
# MODEL defaults to the installed gemma3:270m blob. llama.cpp (commit 0c1e570, from the
# llama-cpp-python 0.3.36 sdist) is built once under ~/.cache/turbine-llama.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
store=${OLLAMA_MODELS:-$HOME/.ollama/models}
model=${1:-$store/blobs/sha256-a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818}
threads=${2:-$(nproc)}
reps=${3:-5}
prompt=${PROMPT:-512}
depth=${DEPTH:-0}
LLAMA_EXTRA_TARGETS=llama-bench bash "$root/scripts/llama_ref/build.sh" >/dev/null
llama_bench=${LLAMA_REF_DIR:-$HOME/.cache/turbine-llama}/build/bin/llama-bench
(cd "$root" && cargo build --release -q -p turbine-shell)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), threads $threads, reps $reps"
"$llama_bench" -m "$model" -t "$threads" -r "$reps" -p "$prompt" -n 128 -d "$depth" -o json > "$out/llama.json"
"$root/target/release/turbine" bench -m "$model" -t "$threads" -r "$reps" -p "$prompt" -n 128 -d "$depth" -o json > "$out/turbine.json"
python3 - "$out/llama.json" "$out/turbine.json" <<'PY'
import json, sys
llama, turbine = (json.load(open(p)) for p in sys.argv[1:3])
def test(r):
    name = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
    return name + (f" @ d{r['n_depth']}" if r.get("n_depth") else "")
print("| engine | test | t/s | ratio |")
print("| --- | --- | ---: | ---: |")
ref = {test(r): r["avg_ts"] for r in llama}
for name, rows in (("llama.cpp", llama), ("turbine", turbine)):
    for r in rows:
        t = test(r)
        print(f"| {name} | {t} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} | {r['avg_ts'] / ref[t]:.2f} |")
PY
