#!/usr/bin/env python3
"""Write cpu/tests/fixtures/quant_fixtures.json: ggml block bytes and the values the PyPI
`gguf` package (llama.cpp's gguf-py, whose quants are checked bit-exact against
ggml-quants.c) produces for them.

Used by cpu/tests/quant_scalar.rs. Deterministic (fixed numpy seed); rerun with

    pip install gguf numpy
    python3 scripts/gen_quant_fixtures.py

Every entry holds `bytes_hex` (the row as stored in a GGUF file) and `expected_hex`
(the dequantized row as little-endian f32 bytes, so the comparison is bit-exact and
needs no float parsing). Types gguf can quantize are made from random floats; the
others (K-quants, IQ4_NL) from random block bytes with sane f16 scales.
"""

import json
import os
import sys
from importlib.metadata import version

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

OUT = os.path.join(os.path.dirname(__file__), "..", "cpu", "tests", "fixtures", "quant_fixtures.json")

rng = np.random.default_rng(20240601)


def hexs(a: np.ndarray) -> str:
    return np.ascontiguousarray(a).view(np.uint8).tobytes().hex()


def entry(name: str, qtype: T, raw: np.ndarray) -> dict:
    """One fixture: raw block bytes and gguf's dequantization of them."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    assert raw.size % size == 0
    n = raw.size // size * block
    # MXFP4 with e = 254 overflows to inf, as it does in ggml.
    with np.errstate(over="ignore"):
        vals = dequantize(raw.reshape(1, -1) if block > 1 else raw.view(np.uint8), qtype)
    vals = np.asarray(vals, dtype=np.float32).reshape(-1)
    assert vals.size == n, (name, vals.size, n)
    return {"type": name, "n": n, "bytes_hex": hexs(raw), "expected_hex": hexs(vals)}


def float_rows(n_blocks: int, block: int) -> np.ndarray:
    """Random floats with an all-zero block (d = 0 path) and a block with outliers."""
    x = rng.standard_normal(n_blocks * block).astype(np.float32)
    x[:block] = 0.0
    if n_blocks > 2:
        x[2 * block + 3] = 40.0
        x[2 * block + 7] = -55.0
    return x


def from_floats(name: str, qtype: T, n_blocks: int = 4) -> dict:
    block, _ = GGML_QUANT_SIZES[qtype]
    raw = quantize(float_rows(n_blocks, block).reshape(1, -1), qtype)
    return entry(name, qtype, raw.view(np.uint8).reshape(-1))


def put_f16(raw: np.ndarray, offset: int, lo: float, hi: float) -> None:
    """Overwrite the f16 at `offset` of every block with a random value in [lo, hi)."""
    vals = rng.uniform(lo, hi, raw.shape[0]).astype(np.float16)
    raw[:, offset:offset + 2] = vals.view(np.uint8).reshape(-1, 2)


def random_blocks(qtype: T, n_blocks: int, f16_fields: list[int], signed_d: bool = False) -> np.ndarray:
    _, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in f16_fields:
        put_f16(raw, off, -0.02 if signed_d else 0.001, 0.02)
    return raw.reshape(-1)


def q8_0_quantize_fixture() -> dict:
    """Floats and ggml's quantize_row_q8_0_ref bytes: checks the activation quantizer.

    The last block has amax = 127 (so d = 1 exactly) and values at .5: roundf rounds
    them away from zero, which round-half-even would not."""
    x = float_rows(3, 32)
    ties = np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5, 64.49] + [0.0] * 24, dtype=np.float32)
    x = np.concatenate([x, ties]).astype(np.float32)
    raw = quantize(x.reshape(1, -1), T.Q8_0).view(np.uint8).reshape(-1)
    return {"n": int(x.size), "input_hex": hexs(x), "bytes_hex": hexs(raw)}


def main() -> None:
    entries = []
    for name in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]:
        entries.append(from_floats(name, T[name]))

    # MXFP4 scale edge cases: e = 0 and 1 are subnormal in GGML_E8M0_TO_FP32_HALF.
    mx = rng.integers(0, 256, size=(6, 17), dtype=np.uint8)
    mx[:, 0] = [0, 1, 2, 127, 128, 254]
    entries.append(dict(entry("MXFP4", T.MXFP4, mx.reshape(-1)), note="e8m0 edges"))

    bf = rng.standard_normal(40).astype(np.float32)
    bf[:6] = [0.0, -0.0, np.inf, -np.inf, 1e-40, 3.0e38]
    entries.append(entry("BF16", T.BF16, quantize(bf.reshape(1, -1), T.BF16).view(np.uint8).reshape(-1)))

    f16 = rng.standard_normal(40).astype(np.float16)
    f16[:5] = [0.0, -0.0, np.inf, 6.0e-8, 65504.0]
    entries.append(entry("F16", T.F16, f16.view(np.uint8)))

    # Offsets of the f16 scale fields inside each block (llama.cpp's structs).
    entries.append(entry("Q2_K", T.Q2_K, random_blocks(T.Q2_K, 2, [80, 82])))
    entries.append(entry("Q3_K", T.Q3_K, random_blocks(T.Q3_K, 2, [108], signed_d=True)))
    entries.append(entry("Q4_K", T.Q4_K, random_blocks(T.Q4_K, 2, [0, 2])))
    entries.append(entry("Q5_K", T.Q5_K, random_blocks(T.Q5_K, 2, [0, 2])))
    entries.append(entry("Q6_K", T.Q6_K, random_blocks(T.Q6_K, 2, [208], signed_d=True)))
    entries.append(entry("IQ4_NL", T.IQ4_NL, random_blocks(T.IQ4_NL, 4, [0], signed_d=True)))

    out = {
        "generator": "scripts/gen_quant_fixtures.py",
        "gguf_version": version("gguf"),
        "dequant": entries,
        "quantize_q8_0": q8_0_quantize_fixture(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)} ({len(entries)} dequant fixtures)", file=sys.stderr)


if __name__ == "__main__":
    main()
