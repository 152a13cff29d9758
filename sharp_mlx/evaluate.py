"""Perplexity of one or more models on text files, over fixed-length non-overlapping windows.

    python -m sharp_mlx.evaluate --model models/smollm2-135m-instruct --data data/*/test.jsonl
    python -m sharp_mlx.evaluate --model A B C --data data/*/test.jsonl --json --plot ppl.png

Each file's records become one token stream (see sharp_mlx.data.batches); every window of
``--seq-len`` + 1 tokens scores its last ``--seq-len`` tokens, and perplexity is
exp(mean next-token loss) over all scored tokens of the file.
"""

import argparse
import json
from pathlib import Path

from .errors import ArgumentParser, SharpError, cli
from .eval.perplexity import evaluate, markdown_table, plot
from .io.outputs import check_room
from .options import at_least
from .recipes import PAPER


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, nargs="+", required=True, help="one or more model folders")
    p.add_argument(
        "--data", type=Path, nargs="+", required=True, help="text files: .txt, or .jsonl in mlx_lm.lora formats"
    )
    p.add_argument("--seq-len", type=at_least(2), default=PAPER.seq_len, help="window length (default: %(default)s)")
    p.add_argument(
        "--batch-size",
        type=at_least(1),
        default=PAPER.batch_size,
        help="windows per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--eval-windows",
        type=at_least(1),
        default=PAPER.eval_windows,
        help="score at most this many test windows per file (default: %(default)s)",
    )
    p.add_argument(
        "--float-weights",
        action="store_true",
        help=(
            "run quantized models with their weights' float values: the same function to float16 precision, "
            "much faster where quantized matmuls are slow (MLX's CPU backend)"
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
    results = evaluate(args.model, args.data, args.seq_len, args.batch_size, args.eval_windows, args.float_weights)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps(next(iter(results.values())) if len(results) == 1 else results, indent=2))
    else:
        print(markdown_table(results, args.seq_len))


if __name__ == "__main__":
    raise SystemExit(main())
