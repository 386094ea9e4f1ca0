#!/usr/bin/env bash
# Gateway overhead: one `turbine serve` node measured directly, then through a
# `turbine gateway` in front of it, with scripts/loadtest.py at the same concurrency levels
# on loopback. Prints both tables and the gateway's aggregate-speed and TTFT ratios.
#   scripts/bench-gateway.sh [LEVELS] [NUM_PREDICT]     e.g. scripts/bench-gateway.sh 1,8 128
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
levels=${1:-1,8}
num_predict=${2:-128}
(cd "$root" && cargo build --release -q -p turbine-shell)
bin=$root/target/release/turbine
source "$root/scripts/serve-helpers.sh"

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) threads; levels $levels; $num_predict tokens per request"
node=$(free_port)
gw=$(free_port)
home=$out/home
OLLAMA_HOST=127.0.0.1:$node TURBINE_HOME=$home "$bin" serve 2>"$out/node.log" &
pids+=($!)
wait_up "http://127.0.0.1:$node/api/version"
OLLAMA_HOST=127.0.0.1:$gw TURBINE_HOME=$home "$bin" gateway --node "http://127.0.0.1:$node" 2>"$out/gw.log" &
pids+=($!)
wait_up "http://127.0.0.1:$gw/api/version"
# Each run warms up first (loading the model), so neither pays for the load; the gateway's
# run uses other prompts, so it is not served from the direct run's prefix cache.
python3 "$root/scripts/loadtest.py" --api ollama --url "http://127.0.0.1:$node" --label direct \
  --concurrency "$levels" --num-predict "$num_predict" --json | tee "$out/direct.jsonl"
python3 "$root/scripts/loadtest.py" --api ollama --url "http://127.0.0.1:$gw" --label gateway \
  --first-id 1000 --concurrency "$levels" --num-predict "$num_predict" --json | tee "$out/gateway.jsonl"
python3 - "$out/direct.jsonl" "$out/gateway.jsonl" <<'PY'
import json, sys
direct, gw = ([json.loads(l) for l in open(p) if l.strip()] for p in sys.argv[1:3])
for d, g in zip(direct, gw):
    print(f"concurrency {d['concurrency']}: aggregate {g['agg_tok_s']:.1f} vs {d['agg_tok_s']:.1f} tok/s "
          f"({g['agg_tok_s'] / d['agg_tok_s']:.3f}x), TTFT median {g['ttft_p50_ms']:.1f} vs {d['ttft_p50_ms']:.1f} ms")
PY
