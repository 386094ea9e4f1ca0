#!/usr/bin/env bash
# Serving benchmark: `turbine serve` and llama.cpp's llama-server (--parallel N) on the same
# GGUF and machine, one after the other, each driven by scripts/loadtest.py at the same
# concurrency levels on loopback. Prints both tables and Turbine's aggregate-speed ratios.
#   scripts/bench-serving.sh [LEVELS] [NUM_PREDICT]     e.g. scripts/bench-serving.sh 1,8,32 128
# llama-server (commit 0c1e570, from the llama-cpp-python 0.3.36 sdist) is built once
# under ~/.cache/turbine-llama.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
levels=${1:-1,8,32}
num_predict=${2:-128}
store=${OLLAMA_MODELS:-$HOME/.ollama/models}
model=$store/blobs/sha256-a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
threads=$(nproc)
LLAMA_BUILD_SERVER=ON LLAMA_EXTRA_TARGETS=llama-server bash "$root/scripts/llama_ref/build.sh" >/dev/null
llama_server=${LLAMA_REF_DIR:-$HOME/.cache/turbine-llama}/build/bin/llama-server
(cd "$root" && cargo build --release -q -p turbine-shell)
source "$root/scripts/serve-helpers.sh"

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $threads threads; levels $levels; $num_predict tokens per request"

port=$(free_port)
OLLAMA_HOST=127.0.0.1:$port OLLAMA_MODELS=$store "$root/target/release/turbine" serve 2>"$out/turbine.log" &
pids+=($!)
wait_up "http://127.0.0.1:$port/api/version"
python3 "$root/scripts/loadtest.py" --api ollama --url "http://127.0.0.1:$port" --label turbine \
  --concurrency "$levels" --num-predict "$num_predict" --json | tee "$out/turbine.jsonl"
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

: > "$out/llama.jsonl"
for n in ${levels//,/ }; do
  port=$(free_port)
  "$llama_server" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -tb "$threads" \
    --parallel "$n" -c $((n * 2048)) --no-webui 2>"$out/llama-$n.log" &
  pids+=($!)
  wait_up "http://127.0.0.1:$port/health"
  python3 "$root/scripts/loadtest.py" --api llama-server --url "http://127.0.0.1:$port" \
    --label "llama-server -np $n" --concurrency "$n" --num-predict "$num_predict" --json | tee -a "$out/llama.jsonl"
  kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
done

python3 - "$out/turbine.jsonl" "$out/llama.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for p in sys.argv[1:3] for l in open(p) if l.strip()]
ref = {r["concurrency"]: r["agg_tok_s"] for r in rows if r["server"].startswith("llama")}
print("| server | concurrency | requests | aggregate tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | vs llama-server |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in sorted(rows, key=lambda r: (r["concurrency"], r["server"])):
    c = r["concurrency"]
    ratio = r["agg_tok_s"] / ref[c] if ref.get(c) else float("nan")
    print(f"| {r['server']} | {c} | {r['requests']} | {r['agg_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
          f"| {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {ratio:.2f} |")
    if r["errors"]:
        print(f"  ({r['errors']} failed: {r['first_error']})")
PY
