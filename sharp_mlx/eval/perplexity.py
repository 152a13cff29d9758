"""Perplexity over fixed windows of text files, for one or several models.

The command is ``python -m sharp_mlx.evaluate`` (``sharp_mlx/evaluate.py``)."""

import math
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from ..data.batches import DataError, load_tokens, windows
from ..errors import SharpError
from ..io.checkpoint import load, load_model
from ..quant.codes import dequantized
from ..reports import markdown_table as table
from ..reports import save_figure


def window_losses(model, batch: mx.array) -> mx.array:
    """Summed next-token loss of each window (B, L+1) -> (B,)."""
    logits = model(batch[:, :-1])
    return nn.losses.cross_entropy(logits.astype(mx.float32), batch[:, 1:], reduction="none").sum(axis=1)


def perplexity(
    model,
    tokens: Sequence[int],
    seq_len: int = 512,
    batch_size: int = 4,
    max_windows: Optional[int] = None,
    desc: str = "ppl",
) -> Dict[str, float]:
    """{"ppl", "tokens"} of a token stream; raises DataError if it is shorter than one window."""
    wins, scored = windows(tokens, seq_len)
    if max_windows is not None and wins.shape[0] > max_windows:
        wins, scored = wins[:max_windows], max_windows * seq_len
    if wins.shape[0] == 0:
        raise DataError(
            f"{desc}: {len(tokens)} tokens are fewer than one window of {seq_len}+1: use more text or a smaller "
            "--seq-len"
        )
    total = 0.0
    for i in tqdm(range(0, wins.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        loss = window_losses(model, wins[i : i + batch_size]).sum()
        mx.eval(loss)
        total += loss.item()
    if not math.isfinite(total) or total / scored > 700:  # exp(700) is about the largest float
        raise SharpError(
            f"{desc}: the loss is {total / scored} per token, so the perplexity is not a finite number: the model's "
            "outputs overflow (try float32 weights) or the model is broken"
        )
    return {"ppl": math.exp(total / scored), "tokens": scored}


def over_models(
    models: List[Path], prepare: Callable, float_weights: bool = False
) -> Iterator[Tuple[Path, object, object]]:
    """(path, model, inputs) for each model folder in turn; ``inputs = prepare(tokenizer)`` runs
    once, with the first model's tokenizer. ``float_weights``: quantized models run with their
    weights' float values (``quantize.dequantized``: the same function to float16 precision;
    MLX's CPU quantized matmul is ~25x slower for many-token batches)."""
    inputs = None
    for path in models:
        if inputs is None:
            model, tokenizer = load(path)
            inputs = prepare(tokenizer)
        else:
            model = load_model(path)[0]
        if float_weights:
            dequantized(model)
        yield Path(path), model, inputs


def evaluate(
    models: List[Path],
    files: List[Path],
    seq_len: int = 512,
    batch_size: int = 4,
    max_windows: Optional[int] = None,
    float_weights: bool = False,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{model: {file: {"ppl", "tokens"}}}; files are tokenized once (see ``over_models``)."""
    return {
        str(path): {
            str(f): perplexity(model, streams[f], seq_len, batch_size, max_windows, desc=f"{f} on {path.name}")
            for f in files
        }
        for path, model, streams in over_models(
            models, lambda tok: {f: load_tokens(f, tok)[0] for f in files}, float_weights
        )
    }


def markdown_table(results: Dict[str, Dict[str, Dict[str, float]]], seq_len: int) -> str:
    files = list(next(iter(results.values())))
    rows = [[model, *(f"{per_file[f]['ppl']:.2f}" for f in files)] for model, per_file in results.items()]
    tokens = ", ".join(f"{f}: {next(iter(results.values()))[f]['tokens']}" for f in files)
    return (
        table(["model", *files], rows)
        + f"\n\nPerplexity over non-overlapping {seq_len}-token windows; scored tokens per file: {tokens}."
    )


def plot(results: Dict[str, Dict[str, Dict[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = list(next(iter(results.values())))
    x = np.arange(len(files))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(files)), 4))
    for i, (model, per_file) in enumerate(results.items()):
        ax.bar(x + i * width, [per_file[f]["ppl"] for f in files], width, label=Path(model).name)
    ax.set_xticks(x + width * (len(results) - 1) / 2, [Path(f).parent.name or Path(f).name for f in files])
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
