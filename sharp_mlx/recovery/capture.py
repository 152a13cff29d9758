"""Capture what the original model feeds into its MLPs, in bounded memory.

SLW fits each target's recovery on the real inputs of MLP_t (the post-attention-norm hidden
states at layer t), and the analysis compares MLPs on those same inputs. Both come from one
pass of the original model over calibration windows, batch by batch, each layer's inputs
written to a float16 memmap (N * L, hidden) on disk so memory stays at one batch.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..data.batches import load_records, tokenize_record
from ..errors import SharpError


def run_with_taps(model, tokens: mx.array, layers: Sequence[int]) -> Dict[str, object]:
    """One forward pass of ``model`` over tokens (B, L); returns the MLP inputs of ``layers``
    ({layer: (B, L, D)}) and the residual stream entering every layer plus the final one."""
    mlp_inputs, residual = {}, []

    def tapped(mlp, i):
        def run(y):  # an MLP stand-in that records its input, then runs the real MLP
            mlp_inputs[i] = y
            return mlp(y)

        return run

    def hook(i, block, h, mask, cache, mlp):
        residual.append(h)
        return block(h, mask, cache=cache, mlp=tapped(mlp, i) if i in layers else mlp)

    residual.append(model.model.run(model.model.embed_tokens(tokens), hook=hook))
    return {"mlp_inputs": mlp_inputs, "residual": residual}


def mlp_inputs_of(model, windows: mx.array, layer: int, batch_size: int = 4) -> np.ndarray:
    """The inputs ``model`` itself feeds the MLP of ``layer`` over token windows (N, L), one row
    per token, float16 (N * L, D). Unlike ``capture_mlp_inputs`` it works for a target layer of a
    shared model, and runs only the blocks up to ``layer``."""
    return StudentInputs(windows, [layer], batch_size)(model, layer)


@dataclass
class StudentInputs:
    """Each target's MLP inputs read, when SLW asks, from the model being fitted (SLW in sequence).

    Targets are asked for in ascending order, each once the ones before it are fitted; the
    hidden states entering the last target asked for are kept, since fitting that target does
    not change them, so each call runs only the blocks since then.

    Given the ``original`` model, each call returns (inputs, outputs): the block-output
    objective. The outputs are what the target's MLP must add to the student's post-attention
    residual stream for the block to give the original's output there, so the fit also undoes
    the error that the earlier targets (and this block's attention, on their states) let in."""

    windows: mx.array
    targets: List[int]
    batch_size: int = 4
    original: Optional[object] = None
    _states: Optional[List[mx.array]] = field(default=None, repr=False)
    _teacher: Optional[List[mx.array]] = field(default=None, repr=False)  # the original's states ...
    _teacher_at: int = field(default=0, repr=False)  # ... entering this block (past the last target: unchanged)
    _at: int = field(default=0, repr=False)  # the block the kept states enter

    def __call__(self, model, layer: int):
        inner = model.model
        if self._states is None or layer < self._at:
            n, b = self.windows.shape[0], self.batch_size
            self._states, self._at = [inner.embed_tokens(self.windows[i : i + b]) for i in range(0, n, b)], 0
            # a shared model keeps the original's embedding: both walks start from the same states
            self._teacher, self._teacher_at = list(self._states), 0
        rows, outs = [], []

        def record(i, block, h, mask, cache, mlp):
            r = block.attend(h, mask, cache)
            rows.append(block.post_attention_layernorm(r).astype(mx.float16))
            return r

        for k, h in enumerate(self._states):
            self._states[k] = inner.run(h, self._at, layer)
            residual = inner.run(self._states[k], layer, layer + 1, hook=record)
            if self.original is None:
                mx.eval(self._states[k], rows[-1])
                continue
            # the original block's output; the original is never fitted, so its walk goes on from there
            self._teacher[k] = self.original.model.run(self._teacher[k], self._teacher_at, layer + 1)
            outs.append((self._teacher[k] - residual).astype(mx.float32))
            mx.eval(self._states[k], self._teacher[k], rows[-1], outs[-1])
        self._at, self._teacher_at = layer, layer + 1
        x = np.concatenate([np.array(r).reshape(-1, r.shape[-1]) for r in rows])
        if self.original is None:
            return x
        return x, np.concatenate([np.array(o).reshape(-1, o.shape[-1]) for o in outs])


def capture_mlp_inputs(
    model,
    windows: mx.array,
    layers: Sequence[int],
    out_dir: Optional[Path] = None,
    batch_size: int = 4,
) -> Dict[str, object]:
    """MLP inputs of ``layers`` over token windows (N, L), one row per token, as float16
    memmaps under ``out_dir`` (in memory when None), plus per-layer residual-stream cosine
    similarity between each layer's input and output (mean over tokens)."""
    n, length = windows.shape
    dim = model.args.hidden_size
    store: Dict[int, np.ndarray] = {}
    for i in layers:
        if out_dir is None:
            store[i] = np.zeros((n * length, dim), dtype=np.float16)
        else:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            store[i] = np.lib.format.open_memmap(
                Path(out_dir) / f"mlp_in_{i}.npy", mode="w+", dtype=np.float16, shape=(n * length, dim)
            )
    cos_sum = np.zeros(model.args.num_hidden_layers)
    for start in tqdm(range(0, n, batch_size), desc="capture", unit="batch", leave=False):
        batch = windows[start : start + batch_size]
        taps = run_with_taps(model, batch, layers)
        res = taps["residual"]
        cos = mx.stack([_cosine(a, b).sum() for a, b in zip(res[:-1], res[1:])])
        mx.eval(taps["mlp_inputs"], cos)
        rows = slice(start * length, (start + batch.shape[0]) * length)
        for i in layers:
            store[i][rows] = np.array(taps["mlp_inputs"][i].astype(mx.float16)).reshape(-1, dim)
        cos_sum += np.array(cos)
    for arr in store.values():
        if isinstance(arr, np.memmap):
            arr.flush()
    return {"mlp_inputs": store, "residual_cosine": (cos_sum / (n * length)).tolist()}


def _cosine(a: mx.array, b: mx.array) -> mx.array:
    """Cosine similarity along the last axis."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (a * b).sum(-1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1) + 1e-8)


def calibration_windows(token_streams: List[np.ndarray], length: int, total_tokens: int, seed: int = 0) -> mx.array:
    """About ``total_tokens`` tokens as windows (N, length), drawn evenly from each stream."""
    rng = np.random.default_rng(seed)
    n_windows = max(1, -(-total_tokens // length))  # rounded up
    rows = []
    for k, tokens in enumerate(token_streams):
        # Spread the windows evenly; the first streams take the remainder.
        share = n_windows // len(token_streams) + (k < n_windows % len(token_streams))
        starts = np.arange(0, len(tokens) - length, length)
        for s in rng.choice(starts, size=min(share, len(starts)), replace=False):
            rows.append(tokens[s : s + length])
    return mx.array(np.stack(rows).astype(np.int32))


def sample_stream(path: Path, tokenizer, n_tokens: int, seed: int = 0) -> np.ndarray:
    """At least ``n_tokens`` tokens (if the file has them) from records drawn at random."""
    fmt, records = load_records(path)
    tokens: List[int] = []
    for i in np.random.default_rng(seed).permutation(len(records)):
        tokens += tokenize_record(tokenizer, records[i], fmt)[0]
        if len(tokens) >= n_tokens:
            break
    return np.array(tokens, dtype=np.int32)


def calibration_text(files: Sequence[Path], tokenizer, total_tokens: int, seq_len: int, seed: int = 0) -> mx.array:
    """About ``total_tokens`` tokens as windows (N, seq_len), drawn evenly from the files."""
    # A margin of two windows per file, so each yields its share of whole windows.
    streams = [sample_stream(f, tokenizer, total_tokens // len(files) + 2 * seq_len, seed) for f in files]
    if not any(len(s) > seq_len for s in streams):
        raise SharpError(f"the data files hold no window of {seq_len} tokens: use longer files or a smaller --seq-len")
    return calibration_windows([s for s in streams if len(s) > seq_len], seq_len, total_tokens, seed)
