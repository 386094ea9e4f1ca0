#!/usr/bin/env python3
"""Regenerates Turbine's llama.cpp reference fixtures for the default model.

    python3 scripts/llama_ref/gen_fixtures.py [MODEL.gguf]

Builds llama.cpp from the llama-cpp-python sdist (scripts/llama_ref/build.sh, cached outside
the repo), then writes, under fixtures/:
  tokenizer/gemma3-270m.json  token ids of a corpus (BOS added, special-token text parsed)
  logits/gemma3-270m.json     teacher-forced logits over a real text: per position the
                              top-10 ids and logits plus the logits of 32 fixed probe ids
  greedy/gemma3-270m.json     64-token greedy continuations of 10 prompts
Both logits and greedy runs are also made with llama.cpp processing one token per physical
batch (n_ubatch = 1, its decode kernels) instead of the whole text at once: how far llama.cpp
moves from itself between its own kernel paths is the noise floor our comparisons are read
against.
The tests read these files; they never need llama.cpp.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
STORE = os.environ.get("OLLAMA_MODELS", os.path.expanduser("~/.ollama/models"))
MODEL = sys.argv[1] if len(sys.argv) > 1 else os.path.join(STORE, "blobs", "sha256-" + SHA)

TOKENIZER_CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "Don't stop believing: it's 3:45pm, isn't it?",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "fn main() {\n\tprintln!(\"{}\", 42);\n}",
    "tabs\t\tand\t spaces   mixed \n\n\n  newlines\r\n",
    "               sixteen spaces then text",
    "\n\n\n\n",
    "我喜欢学习中文。北京是中国的首都。",
    "日本語のテキストも少し。한국어도 조금.",
    "Emoji: 😀🎉👍🏽 and family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "Math: ∑_{i=1}^{n} x_i² ≈ ∫ f(x) dx, π ≈ 3.14159",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "text with <bos> and <eos> inline and <pad>",
    "<start_of_turn>not closed <end_of_turn",
    "URL: https://example.com/path?query=1&x=y#frag and email a.b@c.org",
    "Numbers 1234567890 0.5 -17 1e-9 0xDEADBEEF",
    "Ünïcödé àccents: café naïve résumé Ångström",
    "Zero width\u200bjoiner and \u00a0non-breaking space",
    "Byte fallback rare chars: \U0001d54f\U0001d552\U0001d55d \u2603 \u0f00",
    "",
    " ",
    "a",
]

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def quicksort(arr):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans",
    "Here is a short poem about the moon:\n",
    "The most important rule of programming is",
    "Photosynthesis is the process by which",
    "Q: What is the largest planet in our solar system?\nA:",
]

LOGITS_TEXT = open(os.path.join(ROOT, "fixtures", "corpus", "logits-text.txt"), encoding="utf-8").read()


def run(*args, ubatch=None):
    env = dict(os.environ)
    if ubatch:
        env["LLAMA_REF_UBATCH"] = str(ubatch)
    return subprocess.run(args, check=True, capture_output=True, env=env).stdout.decode()


def write_records(texts):
    f = tempfile.NamedTemporaryFile("wb", delete=False, suffix=".rec")
    for t in texts:
        b = t.encode("utf-8")
        f.write(b"%d\n" % len(b) + b + b"\n")
    f.close()
    return f.name


def ids_lines(out):
    return [[int(x) for x in line.split()] for line in out.rstrip("\n").split("\n")]


def dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


def main():
    tool = run("bash", os.path.join(ROOT, "scripts", "llama_ref", "build.sh")).strip().split("\n")[-1]
    meta = {"llama.cpp": "0c1e570 (llama-cpp-python 0.3.36 sdist)", "model_sha256": SHA}

    recs = write_records(TOKENIZER_CORPUS)
    ids = ids_lines(run(tool, "tokenize", MODEL, recs))
    dump(os.path.join(ROOT, "fixtures/tokenizer/gemma3-270m.json"),
         {"meta": meta, "cases": [{"text": t, "ids": i} for t, i in zip(TOKENIZER_CORPUS, ids)]})

    [text_ids] = ids_lines(run(tool, "tokenize", MODEL, write_records([LOGITS_TEXT])))
    text_ids = text_ids[:520]
    assert len(text_ids) >= 512, len(text_ids)
    idf = tempfile.NamedTemporaryFile("w", delete=False)
    idf.write(" ".join(map(str, text_ids)))
    idf.close()
    import numpy as np
    logits = {}
    for ub in (None, 1):
        out = idf.name + ".bin"
        run(tool, "logits", MODEL, idf.name, out, ubatch=ub)
        logits[ub] = np.fromfile(out, dtype=np.float32).reshape(len(text_ids), -1)
        os.unlink(out)
    n_vocab = logits[None].shape[1]
    rng = random.Random(1234)
    probes = sorted(rng.sample(range(n_vocab), 32))
    positions = []
    r5 = lambda xs: [round(float(x), 5) for x in xs]
    for p in range(len(text_ids)):
        row, row1 = logits[None][p], logits[1][p]
        top = [int(i) for i in sorted(np.argpartition(-row, 10)[:10], key=lambda i: (-row[i], i))]
        positions.append({"top_ids": top, "top_logits": r5(row[top]), "probe_logits": r5(row[probes]),
                          "ubatch1": {"top_id": int(np.argmax(row1)), "top_logits": r5(row1[top]),
                                      "probe_logits": r5(row1[probes])}})
    dump(os.path.join(ROOT, "fixtures/logits/gemma3-270m.json"),
         {"meta": meta, "n_vocab": n_vocab, "tokens": text_ids, "probe_ids": probes, "positions": positions})

    prompts = write_records(GREEDY_PROMPTS)
    gen = ids_lines(run(tool, "greedy", MODEL, prompts, "64"))
    gen1 = ids_lines(run(tool, "greedy", MODEL, prompts, "64", ubatch=1))
    cases = [{"prompt": p, "ids": g, "ids_ubatch1": g1} for p, g, g1 in zip(GREEDY_PROMPTS, gen, gen1)]
    dump(os.path.join(ROOT, "fixtures/greedy/gemma3-270m.json"), {"meta": meta, "n_predict": 64, "cases": cases})
    print("fixtures written")


if __name__ == "__main__":
    main()
