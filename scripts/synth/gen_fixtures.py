#!/usr/bin/env python3
"""Regenerates fixtures/synthetic/{arch}.json: llama.cpp's outputs on the synthetic models
of scripts/synth/make_models.py (which this runs first, into a temporary folder).

    python3 scripts/synth/gen_fixtures.py [ARCH...]      (default: every architecture)

Run it with a Python that has the `gguf` and `numpy` versions scripts/fetch-test-data.sh
pins (its venv, ~/.cache/turbine-synth-venv), so the models are the tests' bytes.
Builds llama.cpp with scripts/llama_ref/build.sh (cached outside the repo). For each model
(F32, then Q8_0) it records, for a fixed teacher-forced sequence, every position's top-10
ids and logits and the logits of 64 fixed probe ids, and the 32-token greedy continuations
of three prompts. The F32 model runs with an F32 KV cache (LLAMA_REF_KV_F32), the strict
check, with flash attention off (it would cast the cache to f16); the quantized model
(Q8_0, or MXFP4 experts for gpt-oss) with llama.cpp's defaults (F16 cache, flash attention). The tests read the JSON and the
models make_models.py writes; they never need llama.cpp.
"""
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_models import ARCHS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
N_GREEDY = 32
N_TEACHER = 48


def dumper():
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts/llama_ref/build.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def logits(dump, model, ids, env):
    with tempfile.TemporaryDirectory() as tmp:
        idf, outf = os.path.join(tmp, "ids"), os.path.join(tmp, "out.bin")
        with open(idf, "w") as f:
            f.write(" ".join(map(str, ids)))
        subprocess.run([dump, "logits", model, idf, outf], check=True, env=env)
        return np.fromfile(outf, dtype=np.float32).reshape(len(ids), -1)


def write_records(path, texts):
    with open(path, "wb") as f:
        for t in texts:
            b = t.encode()
            f.write(f"{len(b)}\n".encode() + b + b"\n")


def greedy(dump, model, env):
    with tempfile.TemporaryDirectory() as tmp:
        rec = os.path.join(tmp, "records")
        write_records(rec, PROMPTS)
        out = subprocess.run([dump, "greedy", model, rec, str(N_GREEDY)], check=True, env=env, capture_output=True, text=True)
        return [[int(t) for t in line.split()] for line in out.stdout.splitlines()]


def corpus():
    """llama.cpp's tokenizer test inputs (whitespace runs, digits, accents, CJK, emoji,
    code, contractions), from the vocabularies scripts/fetch-vocabs.sh fetches."""
    vocabs = os.environ.get("TURBINE_VOCABS", os.path.expanduser("~/.cache/turbine-vocabs"))
    with open(os.path.join(vocabs, "ggml-vocab-llama-bpe.gguf.inp"), encoding="utf-8") as f:
        return [t for t in f.read().split("\n__ggml_vocab_test__\n") if t] + PROMPTS


def tokenize(dump, model, texts):
    """llama.cpp's ids for each text (special tokens added as the vocabulary says)."""
    with tempfile.TemporaryDirectory() as tmp:
        rec = os.path.join(tmp, "records")
        write_records(rec, texts)
        out = subprocess.run([dump, "tokenize", model, rec], check=True, capture_output=True, text=True)
        lines = out.stdout.split("\n")[: len(texts)]
        return [[int(t) for t in line.split()] for line in lines]


def record(dump, model, ids, probes, env):
    lg = logits(dump, model, ids, env)
    top = np.argsort(-lg, axis=1, kind="stable")[:, :10]
    return {
        "top_ids": top.tolist(),
        "top_logits": [[float(lg[i, j]) for j in row] for i, row in enumerate(top)],
        "probe_logits": lg[:, probes].astype(float).tolist(),
        "greedy": greedy(dump, model, env),
    }


# Per vocabulary: the BOS id the teacher-forced sequence starts with (None: the family
# adds none), the count of ordinary tokens to draw the rest from, and the vocabulary size.
VOCABS = {
    "llama": (128000, 128000, 128256),
    "qwen2": (None, 151643, 151936),
    "qwen3": (None, 151643, 151936),
    "qwen3moe": (None, 151643, 151936),
    "gpt-oss": (128000, 128000, 128256),
    "deepseek2": (100000, 100000, 102400),
}


def fixture(dump, models, arch):
    bos, n_plain, n_vocab = VOCABS[arch]
    rng = random.Random(20261125)
    ids = ([bos] if bos is not None else []) + [rng.randrange(0, n_plain) for _ in range(N_TEACHER - (bos is not None))]
    probes = sorted(rng.sample(range(n_vocab), 64))
    env = dict(os.environ)
    f32 = record(dump, os.path.join(models, f"{arch}-f32.gguf"), ids, probes, dict(env, LLAMA_REF_KV_F32="1"))
    quant = ARCHS[arch].get("quant", "q8_0")
    quantized = record(dump, os.path.join(models, f"{arch}-{quant}.gguf"), ids, probes, env)
    model = os.path.join(models, f"{arch}-f32.gguf")
    texts = corpus()
    return {
        "prompts": PROMPTS,
        "ids": ids,
        "probe_ids": probes,
        "f32": f32,
        quant: quantized,
        "corpus": texts,
        "corpus_ids": tokenize(dump, model, texts),
    }


def main():
    archs = sys.argv[1:] or list(VOCABS)
    dump = dumper()
    with tempfile.TemporaryDirectory() as models:
        subprocess.run([sys.executable, os.path.join(HERE, "make_models.py"), models, *archs], check=True, capture_output=True)
        for arch in archs:
            out = fixture(dump, models, arch)
            path = os.path.join(ROOT, "fixtures", "synthetic", f"{arch}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(out, f, separators=(",", ":"))
                f.write("\n")
            print(path)


if __name__ == "__main__":
    main()
