#!/usr/bin/env bash
# Serving benchmark: `turbine serve` and llama.cpp's llama-server (--parallel N) on the same
# GGUF and machine, each driven by scripts/loadtest.py at the same concurrency levels on
# loopback. The two alternate level by level (Turbine at N, then llama-server at N) for
# ROUNDS rounds, so a busy spell of a shared machine falls on both; the table gives each
# figure's median over the rounds and the ratio of the medians, then each round's ratios.
#   scripts/bench-serving.sh [LEVELS] [NUM_PREDICT]     e.g. scripts/bench-serving.sh 1,8,32 128
#   ROUNDS (default 3)
# Every request of a run has its own prompt (ids continue over levels and rounds), so no
# request is served from another's prefix cache. llama-server (commit 0c1e570, from the
# llama-cpp-python 0.3.36 sdist) is built once under ~/.cache/turbine-llama.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
levels=${1:-1,8,32}
num_predict=${2:-128}
rounds=${ROUNDS:-3}
store=${OLLAMA_MODELS:-$HOME/.ollama/models}
model=$store/blobs/sha256-a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
threads=$(nproc)
LLAMA_BUILD_SERVER=ON LLAMA_EXTRA_TARGETS=llama-server bash "$root/scripts/llama_ref/build.sh" >/dev/null
llama_server=${LLAMA_REF_DIR:-$HOME/.cache/turbine-llama}/build/bin/llama-server
(cd "$root" && cargo build --release -q -p turbine-shell)
source "$root/scripts/serve-helpers.sh"

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $threads threads; levels $levels; $num_predict tokens per request; $rounds rounds"

tport=$(free_port)
OLLAMA_HOST=127.0.0.1:$tport OLLAMA_MODELS=$store "$root/target/release/turbine" serve 2>"$out/turbine.log" &
pids+=($!)
wait_up "http://127.0.0.1:$tport/api/version"

: > "$out/runs.jsonl"
next_id=0
for round in $(seq "$rounds"); do
  for n in ${levels//,/ }; do
    python3 "$root/scripts/loadtest.py" --api ollama --url "http://127.0.0.1:$tport" --label turbine \
      --concurrency "$n" --num-predict "$num_predict" --first-id "$next_id" --json |
      sed "s/^{/{\"round\": $round, /" | tee -a "$out/runs.jsonl"
    next_id=$((next_id + 1000))
    port=$(free_port)
    "$llama_server" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -tb "$threads" \
      --parallel "$n" -c $((n * 2048)) --no-webui 2>"$out/llama-$n.log" &
    pids+=($!)
    wait_up "http://127.0.0.1:$port/health"
    python3 "$root/scripts/loadtest.py" --api llama-server --url "http://127.0.0.1:$port" \
      --label "llama-server -np $n" --concurrency "$n" --num-predict "$num_predict" --first-id "$next_id" --json |
      sed "s/^{/{\"round\": $round, /" | tee -a "$out/runs.jsonl"
    next_id=$((next_id + 1000))
    kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
  done
done

python3 - "$out/runs.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(server, c, key):
    return statistics.median(r[key] for r in rows if r["server"] == server and r["concurrency"] == c)
levels = sorted({r["concurrency"] for r in rows})
print("| server | concurrency | requests × rounds | aggregate tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | vs llama-server |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for c in levels:
    ref = med(f"llama-server -np {c}", c, "agg_tok_s")
    for server in (f"llama-server -np {c}", "turbine"):
        mine = [r for r in rows if r["server"] == server and r["concurrency"] == c]
        agg = med(server, c, "agg_tok_s")
        print(f"| {server} | {c} | {mine[0]['requests']} × {len(mine)} | {agg:.1f} "
              f"| {med(server, c, 'ttft_p50_ms'):.0f} / {med(server, c, 'ttft_p99_ms'):.0f} "
              f"| {med(server, c, 'tpot_p50_ms'):.1f} / {med(server, c, 'tpot_p99_ms'):.1f} | {agg / ref:.2f} |")
        errors = sum(r["errors"] for r in mine)
        if errors:
            print(f"  ({errors} failed: {next(r['first_error'] for r in mine if r['errors'])})")
print()
print("Aggregate ratio per round (Turbine / llama-server, adjacent runs):")
for c in levels:
    per = []
    for rnd in sorted({r["round"] for r in rows}):
        t = [r["agg_tok_s"] for r in rows if r["round"] == rnd and r["concurrency"] == c and r["server"] == "turbine"]
        l = [r["agg_tok_s"] for r in rows if r["round"] == rnd and r["concurrency"] == c and r["server"] != "turbine"]
        if t and l:
            per.append(f"{t[0] / l[0]:.2f}")
    print(f"  concurrency {c}: {' '.join(per)}")
PY
