"""Which sentence comes next? Multiple-choice accuracy on held-out text, a check beyond perplexity.

    python -m sharp_mlx.cloze --model A B --data data/*/test.jsonl [--items 10] [--choices 4]

Items come from the text alone (seeded; the same texts for every model and tokenizer):
- Text: each record of a file (sharp_mlx.data.batches formats) as plain text: "text" as it is, prompt
  and completion joined by a blank line, a conversation's contents joined by blank lines (no
  chat template).
- Sentences: a record is cut after a run of . ! ? (with any closing quotes or brackets) that is
  followed by whitespace, except after a few abbreviations (Mr. Dr. St. e.g. ...) and single
  capital initials, and at every newline; each piece is stripped. A sentence is usable if it
  has 4-40 whitespace-separated words.
- The true sentence of an item is a usable sentence with at least ``context_tokens`` words
  before it in its record; its context is the last ``context_tokens`` tokens of the record's
  text before it (a word is at least one token, so every context is full). When the whitespace
  before the sentence holds a newline, the context ends with that newline and each choice is a
  bare sentence; otherwise each choice is " " + sentence.
- Distractors: the ``choices - 1`` distinct usable sentences of the same file, text different
  from the true one and not in the context's text, with the closest word counts (ties broken
  at random).
- ``n_items`` true sentences are drawn without replacement by numpy's default_rng(seed), which
  also draws where the true one stands among the choices.

Score: the mean log-probability per token of a choice given the context; the model picks the
argmax. Accuracy per file and pooled, standard error sqrt(p(1-p)/n), chance 1/choices. The
context runs once into a KV cache; the choices then run together, right-padded (under the
causal mask padding after a choice's tokens cannot change them, and it is not counted).
"""

import argparse
import json
from pathlib import Path

from .errors import ArgumentParser, SharpError, cli
from .eval.cloze import evaluate, markdown_table, pooled
from .options import at_least
from .recipes import PAPER


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.cloze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, nargs="+", required=True, help="one or more model folders")
    p.add_argument(
        "--data", type=Path, nargs="+", required=True, help="text files: .txt, or .jsonl in mlx_lm.lora formats"
    )
    p.add_argument("--items", type=at_least(1), default=10, help="items per file (default: %(default)s)")
    p.add_argument(
        "--choices", type=at_least(2), default=4, help="choices per item, the true one included (default: %(default)s)"
    )
    p.add_argument(
        "--context-tokens",
        type=at_least(1),
        default=64,
        help="tokens of context before the choices (default: %(default)s)",
    )
    p.add_argument("--seed", type=at_least(0), default=PAPER.seed, help="seed of the items (default: %(default)s)")
    p.add_argument("--batch-items", type=at_least(1), default=1, help="items per forward pass (default: %(default)s)")
    p.add_argument(
        "--float-weights",
        action="store_true",
        help="run quantized models with their weights' float values (faster on CPU, same function)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print JSON: {file: {accuracy, n, stderr}, "overall": {...}} for one model, {model: {...}} for several',
    )
    return p


@cli("sharp_mlx.cloze")
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_items < 1:
        raise SharpError(f"--batch-items must be at least 1, got {args.batch_items}")
    results = evaluate(
        args.model,
        args.data,
        args.items,
        args.choices,
        args.context_tokens,
        args.seed,
        args.float_weights,
        args.batch_items,
    )
    if args.json:
        out = {model: {**per_file, "overall": pooled(per_file)} for model, per_file in results.items()}
        print(json.dumps(next(iter(out.values())) if len(out) == 1 else out, indent=2))
    else:
        print(markdown_table(results, args.choices, args.context_tokens, args.seed))


if __name__ == "__main__":
    raise SystemExit(main())
