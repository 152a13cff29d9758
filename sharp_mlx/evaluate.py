"""Perplexity of one or more models on text files, over fixed-length non-overlapping windows.

    python -m sharp_mlx.evaluate --model models/smollm2-135m-instruct --data data/*/test.jsonl
    python -m sharp_mlx.evaluate --model A B C --data data/*/test.jsonl --json --plot ppl.png

Each file's records become one token stream (see sharp_mlx.data); every window of
``--seq-len`` + 1 tokens scores its last ``--seq-len`` tokens, and perplexity is
exp(mean next-token loss) over all scored tokens of the file.
"""

import argparse
import json
import math
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from .checkpoint import load, load_model
from .data import DataError, load_tokens, windows
from .errors import ArgumentParser, SharpError, cli
from .outputs import check_room
from .quantize import dequantized


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
    weights' float values (``quantize.dequantized``: the same function; MLX's CPU quantized
    matmul is ~25x slower for many-token batches)."""
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
    head = "| model | " + " | ".join(files) + " |"
    rows = [head, "|" + "---|" * (len(files) + 1)]
    for model, per_file in results.items():
        rows.append(f"| {model} | " + " | ".join(f"{per_file[f]['ppl']:.2f}" for f in files) + " |")
    tokens = ", ".join(f"{f}: {next(iter(results.values()))[f]['tokens']}" for f in files)
    return (
        "\n".join(rows)
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
    fig.savefig(out, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, nargs="+", required=True, help="one or more model folders")
    p.add_argument(
        "--data", type=Path, nargs="+", required=True, help="text files: .txt, or .jsonl in mlx_lm.lora formats"
    )
    p.add_argument("--seq-len", type=int, default=512, help="window length in scored tokens (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--max-windows", type=int, help="score at most this many windows per file (default: all)")
    p.add_argument(
        "--float-weights",
        action="store_true",
        help=(
            "run quantized models with their weights' float values: the same function, much faster where quantized "
            "matmuls are slow (MLX's CPU backend)"
        ),
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON: {file: {ppl, tokens}} for one model, {model: {...}} for several",
    )
    p.add_argument("--plot", type=Path, help="also write a bar chart (PNG) of the table")
    return p


@cli("sharp_mlx.evaluate")
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.seq_len < 1 or args.batch_size < 1:
        raise SharpError(f"--seq-len and --batch-size must be at least 1, got {args.seq_len} and {args.batch_size}")
    if args.plot:
        check_room(args.plot, 1_000_000)  # before the work: a plot is well under 1 MB
    results = evaluate(args.model, args.data, args.seq_len, args.batch_size, args.max_windows, args.float_weights)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps(next(iter(results.values())) if len(results) == 1 else results, indent=2))
    else:
        print(markdown_table(results, args.seq_len))


if __name__ == "__main__":
    raise SystemExit(main())
