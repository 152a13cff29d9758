"""GPTQ for a tied embedding: re-quantize it so that the logits, not the weights, stay close.

A tied embedding is both the input table and the output layer, and the output side is where
re-quantizing it costs: on the default SHARP checkpoint a 5-bit (group 64) embedding rounded to
nearest costs up to 5.4% perplexity, 0.7% of it through the input side.
GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) quantizes one input column at a
time and moves each column's rounding error onto the columns not yet quantized, weighted by the
inverse of H = sum of h h^T over calibration inputs h (here the model's final, normed hidden
states), which minimises the error of the logits W h rather than of W. mlx-lm ships the same
algorithm for whole models (``mlx_lm.quant.gptq``: 2, 4 and 8 bits, Linear layers); this is it
for one matrix at every width MLX packs (2-8 bits), with mlx-lm's choices: damping 1% of H's mean
diagonal, columns in their order, and each group's scale and bias fixed from its values (minimum
and maximum) when the group is reached. Scales and biases are rounded to their storage dtype
before any code is chosen, so the codes are the ones that dtype dequantizes best.

``sequential_gptq`` applies the same per-matrix algorithm to every Linear layer of a Llama in
GPTQ's own order (block by block, each block's inputs captured from the model with the blocks
before it already quantized; experiments/frontier.py uses it), and ``mlp_sensitivity``
measures what quantizing each block's MLP alone costs, for choosing bits per layer.
"""

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from ..data.batches import load_tokens
from ..errors import SharpError


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes (rows, cols) in [0, 2**bits) as MLX packs them: each row one little-endian
    bit stream, code i in bits [i*bits, (i+1)*bits), read as uint32 words."""
    q = np.asarray(q, dtype=np.uint32)
    if q.shape[-1] * bits % 32:
        raise SharpError(
            f"{q.shape[-1]} codes of {bits} bits do not fill whole 32-bit words: use a row length that is a multiple "
            "of 32"
        )
    stream = ((q[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(*q.shape[:-1], -1)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)


def inverse_factor(hessian: np.ndarray, damp: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor of the damped H^-1, mask of dead inputs) for ``gptq``: computed
    once when several weights read the same inputs (q/k/v, gate/up)."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0  # an input that is always zero: its column cannot matter
    h[dead, dead] = 1.0
    h[np.diag_indices(h.shape[0])] += damp * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    dtype=np.float16,
    factor: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (rows, cols) ints, scales and biases (rows, cols / group_size) in ``dtype``) of
    ``w`` (rows, cols), for inputs whose second moment is ``hessian`` (cols, cols):
    ``scales * codes + biases`` (per group) approximates ``w`` so that ``w @ x`` changes least.
    ``factor``: ``inverse_factor(hessian, damp)``, if already computed."""
    rows, cols = w.shape
    if cols % group_size or hessian.shape != (cols, cols):
        raise SharpError(
            f"GPTQ needs a weight whose row length is a multiple of the group size and a {cols}x{cols} Hessian, got "
            f"{w.shape} and {hessian.shape}"
        )
    top = 2**bits - 1
    w = np.array(w, dtype=np.float64)
    u, dead = factor if factor is not None else inverse_factor(hessian, damp)  # u: upper Cholesky factor of H^-1
    w[:, dead] = 0.0
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


def gptq_codes(
    w: mx.array,
    hessian: np.ndarray,
    bits: int,
    group_size: int,
    dtype=mx.float16,
    factor: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """``gptq`` as MLX affine codes: (packed weight uint32, scales, biases), ready for
    ``mx.dequantize(..., group_size, bits)``."""
    codes, scales, biases = gptq(
        np.array(w.astype(mx.float32)),
        hessian,
        bits,
        group_size,
        dtype=np.dtype(np.float16 if dtype == mx.float16 else np.float32),
        factor=factor,
    )
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


# ---------------------------------------------------------------- every Linear of a model, block by block

# Linear layers of a Llama block, each with the input it reads: q/k/v read one input and
# gate/up another, so each of those inputs has one Hessian, captured once.
BLOCK_LINEARS = {
    "self_attn.q_proj": "self_attn.q_proj",
    "self_attn.k_proj": "self_attn.q_proj",
    "self_attn.v_proj": "self_attn.q_proj",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.gate_proj",
    "mlp.down_proj": "mlp.down_proj",
}
Codes = Dict[str, Tuple[mx.array, mx.array, mx.array]]  # module path -> (packed weight, scales, biases)


class _Sum:
    """An accumulator outside the module tree (a plain object, so nn.Module stores it as an attribute)."""

    def __init__(self):
        self.value = None


class _Tap(nn.Module):
    """A Linear stand-in that adds x^T x of its inputs to a sum, then runs the Linear."""

    def __init__(self, module: nn.Module, acc: _Sum):
        super().__init__()
        self.module, self.acc = module, acc

    def __call__(self, x: mx.array) -> mx.array:
        f = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (tokens, in)
        self.acc.value = f.T @ f if self.acc.value is None else self.acc.value + f.T @ f
        return self.module(x)


def _module(root: nn.Module, path: str) -> nn.Module:
    for key in path.split("."):
        root = root[key]
    return root


def block_hessians(
    block: nn.Module, inputs: Sequence[mx.array], run: Callable[[mx.array], mx.array]
) -> Dict[str, np.ndarray]:
    """{input name (``BLOCK_LINEARS`` values): H = sum of x x^T (float64)} of one Llama block,
    as it is now, run by ``run`` (e.g. ``LlamaModel.run`` of that block alone) on the batches
    ``inputs`` (each (B, L, D))."""
    sums = {name: _Sum() for name in set(BLOCK_LINEARS.values())}
    originals = {}
    for name, acc in sums.items():
        parent, _, key = name.rpartition(".")
        originals[name] = _module(block, name)
        _module(block, parent)[key] = _Tap(originals[name], acc)
    try:
        for x in inputs:
            run(x)
            mx.eval([acc.value for acc in sums.values()])
    finally:
        for name, module in originals.items():
            parent, _, key = name.rpartition(".")
            _module(block, parent)[key] = module
    return {name: np.array(acc.value, dtype=np.float64) for name, acc in sums.items()}


def dequantize_codes(
    code: Tuple[mx.array, mx.array, mx.array], group_size: int, bits: int, dtype=mx.float32
) -> mx.array:
    w, s, b = code
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits).astype(dtype)


def quantize_block(block: nn.Module, prefix: str, hessians: Dict[str, np.ndarray], params: Dict[str, dict]) -> Codes:
    """GPTQ codes of the Linear layers of ``block`` that ``params`` names (full path
    ``prefix.self_attn.q_proj`` -> {"bits", "group_size"}), fitted for ``hessians``; each weight is
    replaced in place by its codes' float values, so the block computes what its codes will."""
    codes, factors = {}, {}
    for name, source in BLOCK_LINEARS.items():
        p = params.get(f"{prefix}.{name}")
        if p is None:
            continue  # kept as it is (e.g. a GGUF code the float weight already equals)
        if source not in factors:
            factors[source] = inverse_factor(hessians[source])
        linear = _module(block, name)
        code = gptq_codes(linear.weight, hessians[source], p["bits"], p["group_size"], factor=factors[source])
        codes[f"{prefix}.{name}"] = code
        linear.weight = dequantize_codes(code, p["group_size"], p["bits"], linear.weight.dtype)
    mx.eval(block.parameters())
    return codes


def sequential_gptq(
    model, windows: mx.array, params: Dict[str, dict], batch_size: int = 8, progress: bool = True
) -> Codes:
    """GPTQ of the Linear layers of a Llama (``sharp_mlx.models.llama.Model``, walked with
    ``LlamaModel.run``), in GPTQ's order: block i's inputs are those of the model with blocks < i
    already replaced by their codes, captured on the token windows (N, L); q/k/v share one
    Hessian and gate/up another. ``params``: module path -> {"bits", "group_size"}; Linear layers
    it does not name are left as they are. The model's weights are replaced in place by their
    codes' float values (the same function as the quantized model, and fast on a CPU); returns
    {path: (packed weight, scales, biases)}. The embedding is not touched (``output_hessian``)."""
    inner = model.model
    xs = [inner.embed_tokens(windows[i : i + batch_size]) for i in range(0, windows.shape[0], batch_size)]
    codes: Codes = {}
    for i, block in enumerate(tqdm(inner.layers, desc="GPTQ", unit="block", leave=False, disable=not progress)):
        prefix = f"model.layers.{i}"
        if any(f"{prefix}.{name}" in params for name in BLOCK_LINEARS):
            hessians = block_hessians(block, xs, lambda x: inner.run(x, i, i + 1))
            codes.update(quantize_block(block, prefix, hessians, params))
        xs = [inner.run(x, i, i + 1) for x in xs]
        mx.eval(xs)
    return codes


def mlp_sensitivity(
    model,
    windows: mx.array,
    bits: int,
    group_size: int,
    hessian_windows: Optional[mx.array] = None,
    batch_size: int = 8,
    progress: bool = True,
) -> List[float]:
    """For each block, the increase of the mean next-token loss on ``windows`` (N, L) when that
    block's MLP alone is quantized by GPTQ to ``bits`` (its Hessians from the float model's inputs
    on ``hessian_windows``, default ``windows``), the rest of the model unchanged."""
    inner = model.model
    batches = [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]
    calib = (
        batches
        if hessian_windows is None
        else [hessian_windows[i : i + batch_size] for i in range(0, hessian_windows.shape[0], batch_size)]
    )
    xs = [inner.embed_tokens(b[:, :-1]) for b in batches]
    hs = [inner.embed_tokens(b) for b in calib]

    def loss_from(start: int, states: List[mx.array]) -> float:
        total, count = 0.0, 0
        for x, b in zip(states, batches):
            logits = model.head(inner.run(x, start))
            loss = nn.losses.cross_entropy(logits.astype(mx.float32), b[:, 1:], reduction="sum")
            total, count = total + loss.item(), count + b[:, 1:].size
        return total / count

    base = loss_from(0, xs)
    out = []
    names = [n for n in BLOCK_LINEARS if n.startswith("mlp.")]
    for i, block in enumerate(
        tqdm(inner.layers, desc=f"MLP sensitivity at {bits} bits", unit="block", leave=False, disable=not progress)
    ):
        prefix = f"model.layers.{i}"
        saved = {n: _module(block, n).weight for n in names}
        quantize_block(
            block,
            prefix,
            block_hessians(block, hs, lambda x: inner.run(x, i, i + 1)),
            {f"{prefix}.{n}": {"bits": bits, "group_size": group_size} for n in names},
        )
        out.append(loss_from(i, xs) - base)
        for n, w in saved.items():
            _module(block, n).weight = w
        xs, hs = [inner.run(x, i, i + 1) for x in xs], [inner.run(h, i, i + 1) for h in hs]
        mx.eval(xs, hs)
    return out
