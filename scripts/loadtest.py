#!/usr/bin/env python3
"""Serving load test: N concurrent streamed greedy completions against one server.

Talks to Turbine (or Ollama) through /api/generate, or to llama-server through its native
/completion route; loopback only, bounded in requests and time. Reports aggregate output
tokens per second, time to first token (TTFT) and time per output token after the first
(TPOT), as medians and 99th percentiles.

  python3 scripts/loadtest.py --api ollama --url http://127.0.0.1:11434 --model gemma3:270m \
      --concurrency 1,8,32 --num-predict 128

Standard library only.
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

TOPICS = [
    "the history of the printing press", "how volcanoes form", "the life of honey bees",
    "the rules of chess", "why the sky is blue", "the water cycle", "how bridges carry loads",
    "the first moon landing", "the invention of the telephone", "how vaccines work",
    "the migration of whales", "the origins of jazz", "how a compiler works",
    "the great wall of china", "the theory of plate tectonics", "how bread is baked",
]


def prompt_for(i):
    """Distinct prompts, so no request is served from another's cache."""
    return f"Essay {i}. Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}, part {i // len(TOPICS) + 1}:\n"


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def one_request(api, host, port, model, i, num_predict, timeout):
    """Runs one streamed completion; returns (ttft_s, tpot_s or None, n_tokens, end_time)."""
    if api == "ollama":
        path = "/api/generate"
        body = {"model": model, "prompt": prompt_for(i), "raw": True, "stream": True,
                "options": {"num_predict": num_predict, "temperature": 0}}
    else:
        path = "/completion"
        body = {"prompt": prompt_for(i), "n_predict": num_predict, "temperature": 0, "stream": True,
                "cache_prompt": True}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    start = time.monotonic()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first = None
    n_tokens = 0
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        if line.startswith("data:"):
            line = line[5:].strip()
        chunk = json.loads(line)
        text = chunk.get("response", chunk.get("content", ""))
        if first is None and text:
            first = time.monotonic()
        if chunk.get("done") or chunk.get("stop"):
            n_tokens = chunk.get("eval_count") or chunk.get("tokens_predicted") or \
                chunk.get("timings", {}).get("predicted_n", 0)
            break
    end = time.monotonic()
    conn.close()
    if first is None:
        first = end
    ttft = first - start
    tpot = (end - first) / (n_tokens - 1) if n_tokens > 1 else None
    return ttft, tpot, n_tokens, end


def run_level(api, url, model, concurrency, n_requests, num_predict, timeout, max_seconds=float("inf"), first_id=0):
    u = urllib.parse.urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing to load-test a non-loopback host: {u.hostname}")
    results, errors = [], []
    lock = threading.Lock()
    next_id = [first_id]

    def worker():
        while True:
            with lock:
                if next_id[0] >= first_id + n_requests or time.monotonic() > deadline:
                    return
                i = next_id[0]
                next_id[0] += 1
            try:
                r = one_request(api, u.hostname, u.port, model, i, num_predict, timeout)
                with lock:
                    results.append(r)
            except Exception as e:  # a failed request is reported, not hidden
                with lock:
                    errors.append(str(e))

    start = time.monotonic()
    deadline = start + max_seconds
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    tokens = sum(r[2] for r in results)
    ttfts = [r[0] for r in results]
    tpots = [r[1] for r in results if r[1] is not None]
    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "tpot_p50_ms": 1000 * percentile(tpots, 50), "tpot_p99_ms": 1000 * percentile(tpots, 99),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", choices=["ollama", "llama-server"], required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="gemma3:270m")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=0, help="per level (default: 2 x concurrency, at least 4)")
    ap.add_argument("--num-predict", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    ap.add_argument("--max-seconds", type=float, default=600, help="per level: no new requests after this")
    ap.add_argument("--label", default=None)
    ap.add_argument("--json", action="store_true", help="one JSON object per level instead of a table")
    ap.add_argument("--first-id", type=int, default=0,
                    help="number of the first prompt; every request of a run, over all levels, gets its own")
    args = ap.parse_args()
    label = args.label or args.api
    # Warm-up: loads the model and touches the code paths.
    run_level(args.api, args.url, args.model, 1, 1, 8, args.timeout)
    if not args.json:
        print(f"| server | conc | requests | agg tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
    first_id = args.first_id
    for c in [int(x) for x in args.concurrency.split(",") if x]:
        n = args.requests or min(64, max(4, 2 * c))
        r = run_level(args.api, args.url, args.model, c, n, args.num_predict, args.timeout, args.max_seconds, first_id)
        first_id += n
        r["server"] = label
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"| {label} | {c} | {r['requests']} | {r['agg_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                  f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} |", flush=True)
        if r["errors"]:
            print(f"{r['errors']} requests failed, first: {r['first_error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
