"""GPTQ for a tied embedding: re-quantize it so that the logits, not the weights, stay close.

A tied embedding is both the input table and the output layer, and the output side is where
re-quantizing it costs: on the default SHARP checkpoint a 5-bit (group 64) embedding rounded to
nearest costs up to 5.4% perplexity, 0.7% of it through the input side (docs/quantization.md).
GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) quantizes one input column at a
time and moves each column's rounding error onto the columns not yet quantized, weighted by the
inverse of H = sum of h h^T over calibration inputs h (here the model's final, normed hidden
states), which minimises the error of the logits W h rather than of W. mlx-lm ships the same
algorithm for whole models (``mlx_lm.quant.gptq``: 2, 4 and 8 bits, Linear layers); this is it
for one matrix at every width MLX packs (2-8 bits), with mlx-lm's choices: damping 1% of H's mean
diagonal, columns in their order, and each group's scale and bias fixed from its values (minimum
and maximum) when the group is reached. Scales and biases are rounded to their storage dtype
before any code is chosen, so the codes are the ones that dtype dequantizes best.
"""

from pathlib import Path
from typing import Sequence, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .data import load_tokens
from .errors import SharpError


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes (rows, cols) in [0, 2**bits) as MLX packs them: each row one little-endian
    bit stream, code i in bits [i*bits, (i+1)*bits), read as uint32 words."""
    q = np.asarray(q, dtype=np.uint32)
    if q.shape[-1] * bits % 32:
        raise SharpError(f"{q.shape[-1]} codes of {bits} bits do not fill whole 32-bit words: use a row length that is a multiple of 32")
    stream = ((q[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(*q.shape[:-1], -1)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int, damp: float = 0.01, dtype=np.float16) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (rows, cols) ints, scales and biases (rows, cols / group_size) in ``dtype``) of
    ``w`` (rows, cols), for inputs whose second moment is ``hessian`` (cols, cols):
    ``scales * codes + biases`` (per group) approximates ``w`` so that ``w @ x`` changes least."""
    rows, cols = w.shape
    if cols % group_size or hessian.shape != (cols, cols):
        raise SharpError(f"GPTQ needs a weight whose row length is a multiple of the group size and a {cols}x{cols} Hessian, got {w.shape} and {hessian.shape}")
    top = 2**bits - 1
    w = np.array(w, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0  # an input that is always zero: its column cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    codes = np.zeros((rows, cols), dtype=np.int64)
    scales = np.zeros((rows, cols // group_size), dtype=dtype)
    biases = np.zeros_like(scales)
    for g, i in enumerate(range(0, cols, group_size)):
        j = i + group_size
        lo, hi = w[:, i:j].min(axis=1), w[:, i:j].max(axis=1)
        scales[:, g] = np.maximum((hi - lo) / top, 1e-8)
        biases[:, g] = lo
        s, b = scales[:, g].astype(np.float64), biases[:, g].astype(np.float64)
        err = np.zeros((rows, group_size))
        for k in range(i, j):
            codes[:, k] = np.clip(np.round((w[:, k] - b) / s), 0, top)
            err[:, k - i] = (w[:, k] - (s * codes[:, k] + b)) / u[k, k]
            w[:, k + 1 : j] -= np.outer(err[:, k - i], u[k, k + 1 : j])
        w[:, j:] -= err @ u[i:j, j:]
    return codes, scales, biases


def gptq_codes(w: mx.array, hessian: np.ndarray, bits: int, group_size: int, dtype=mx.float16) -> Tuple[mx.array, mx.array, mx.array]:
    """``gptq`` as MLX affine codes: (packed weight uint32, scales, biases), ready for
    ``mx.dequantize(..., group_size, bits)``."""
    codes, scales, biases = gptq(np.array(w.astype(mx.float32)), hessian, bits, group_size, dtype=np.dtype(np.float16 if dtype == mx.float16 else np.float32))
    return mx.array(pack(codes, bits)), mx.array(scales), mx.array(biases)


def output_hessian(model, tokenizer, files: Sequence[Path], windows: int, seq_len: int = 256) -> np.ndarray:
    """H = sum of h h^T over the final hidden states h (what the output layer multiplies) of the
    first ``windows`` windows of ``seq_len`` tokens of each file (float64, hidden x hidden)."""
    batches = []
    for f in files:
        tokens = load_tokens(f, tokenizer, max_tokens=windows * seq_len)[0]
        n = min(windows, len(tokens) // seq_len)
        if n == 0:
            raise SharpError(f"{f} has fewer than {seq_len} tokens: pass a longer calibration file")
        batches.extend(tokens[k * seq_len : (k + 1) * seq_len] for k in range(n))
    h = np.zeros((model.args.hidden_size,) * 2)
    for x in tqdm(batches, desc="calibration", unit="window", leave=False):
        out = model.model(mx.array(x)[None])[0].astype(mx.float32)
        h += np.array(out.T @ out, dtype=np.float64)
    return h
